//! One width gradient pass on a model, in its own process, printing a JSON line with its wall time and the
//! process's peak RSS (VmHWM; the model is read into memory, not mapped). For `scripts/bench_width_grad.sh`.
//!
//!   cargo run --release -p slm-width --example grad_memory -- MODEL layerwise|whole N LEN [fisher]

use std::time::Instant;

fn status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: grad_memory MODEL layerwise|whole N LEN [fisher]";
    let (model, how, n, len) = match &args[1..] {
        [m, h, n, l, ..] => (m.clone(), h.clone(), n.parse::<usize>()?, l.parse::<usize>()?),
        _ => anyhow::bail!(usage),
    };
    let fisher = args.get(5).is_some_and(|a| a == "fisher");
    let model = slm_model::Model::load(std::path::Path::new(&model), &candle_core::Device::Cpu)?;
    let corpus = slm_model::testing::data_dir().join("lambada_openai.test.jsonl");
    let windows = slm_model::calib::calibration_windows(&corpus, model.tokenizer()?, n, len, 1234)?;
    let layers: Vec<usize> = slm_width::default_layer_range(model.spec.num_layers()).collect();
    let before = status_kib("VmHWM:").unwrap_or(0);
    let t = Instant::now();
    let importance = if fisher { slm_width::Importance::Element2 } else { slm_width::Importance::Element1 };
    let agg = slm_width::Aggregation::Sum;
    // `layerwise` is `slm width`'s path: scores folded layer by layer; `whole` the earlier whole-graph pass.
    let loss = match how.as_str() {
        "layerwise" => slm_width::gradient_scores(&model, &windows, importance, agg, &layers, &mut || {})?.loss,
        "whole" => slm_width::gradients_whole_graph(&model, &windows, &layers, fisher, &mut || {})?.loss,
        _ => anyhow::bail!(usage),
    };
    let secs = t.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM:").unwrap_or(0);
    println!(
        "{{\"how\": \"{how}\", \"fisher\": {fisher}, \"seconds\": {secs:.3}, \"peak_rss_mib\": {:.0}, \
         \"rss_before_mib\": {:.0}, \"loss\": {:.6}}}",
        peak as f64 / 1024.0,
        before as f64 / 1024.0,
        loss
    );
    Ok(())
}
