//! Shared inputs for slm's benchmarks (criterion benches in `benches/`, throughput tools in `src/bin/`).

/// `batch` deterministic token sequences of `seq` ids below `vocab` (the same ids the transformers side of
/// `scripts/bench_forward.sh` uses: id = (7919 * (b * seq + t) + 13) mod vocab).
pub fn bench_input(batch: usize, seq: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch).map(|b| (0..seq).map(|t| ((7919 * (b * seq + t) + 13) % vocab) as u32).collect()).collect()
}
