//! Criterion benchmarks over slm's public APIs. Run: `cargo bench -p slm-benches` (needs `scripts/setup.sh`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use slm_model::{Mode, Model};

/// Prefill forward pass of the default model, batch 16 x 128 tokens, f32, logits at every position.
fn forward(c: &mut Criterion) {
    let model = Model::load(&slm_model::testing::default_model_path(), &candle_core::Device::Cpu).unwrap();
    let (batch, seq) = (16, 128);
    let seqs = slm_benches::bench_input(batch, seq, model.spec.vocab_size);
    let all: Vec<Vec<usize>> = seqs.iter().map(|s| (0..s.len()).collect()).collect();
    let last: Vec<Vec<usize>> = seqs.iter().map(|s| vec![s.len() - 1]).collect();
    let mut g = c.benchmark_group("forward");
    g.sample_size(10);
    g.throughput(Throughput::Elements((batch * seq) as u64));
    g.bench_function("b16x128_all_logits", |b| {
        b.iter(|| model.forward(&seqs, &all, false, Mode::Inference).unwrap())
    });
    g.bench_function("b16x128_last_logits", |b| {
        b.iter(|| model.forward(&seqs, &last, false, Mode::Inference).unwrap())
    });
    g.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
