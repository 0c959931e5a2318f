//! Forward-pass throughput of slm on one model: prints the median tokens/s over `--iters` timed runs (after one
//! warm-up), as one JSON line. `scripts/bench_forward.sh` runs it beside transformers on the same input.
//!
//! Usage: forward_tps [MODEL] [--batch 16] [--seq 128] [--iters 5] [--last]
//! (`--last`: logits at the last position only, as the evaluator's long contexts need, so the layers dominate)

use std::time::Instant;

use slm_model::{Mode, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut model_path, mut batch, mut seq, mut iters, mut last) = (None, 16usize, 128usize, 5usize, false);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize, Box<dyn std::error::Error>> {
            Ok(args.next().ok_or(format!("{name} needs a value"))?.parse()?)
        };
        match a.as_str() {
            "--batch" => batch = num("--batch")?,
            "--seq" => seq = num("--seq")?,
            "--iters" => iters = num("--iters")?,
            "--last" => last = true,
            p => model_path = Some(std::path::PathBuf::from(p)),
        }
    }
    let path = model_path.unwrap_or_else(slm_model::testing::default_model_path);
    let model = Model::load(&path, &candle_core::Device::Cpu)?;
    let seqs = slm_benches::bench_input(batch, seq, model.spec.vocab_size);
    let positions: Vec<Vec<usize>> =
        seqs.iter().map(|s| if last { vec![s.len() - 1] } else { (0..s.len()).collect() }).collect();
    model.forward(&seqs, &positions, false, Mode::Inference)?;
    let mut times = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        let out = model.forward(&seqs, &positions, false, Mode::Inference)?;
        std::hint::black_box(out.logits);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{{\"impl\": \"slm\", \"batch\": {batch}, \"seq\": {seq}, \"last\": {last}, \"median_s\": {median:.4}, \"tokens_per_s\": {:.1}}}",
        (batch * seq) as f64 / median
    );
    Ok(())
}
