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
    g.bench_function("b16x128_all_logits", |b| b.iter(|| model.forward(&seqs, &all, false, Mode::Inference).unwrap()));
    g.bench_function("b16x128_last_logits", |b| {
        b.iter(|| model.forward(&seqs, &last, false, Mode::Inference).unwrap())
    });
    g.finish();
}

/// Log-likelihood scoring as the evaluator runs it: 16 requests of 4 choices sharing a 96-token context, each
/// choice 8 tokens (a HellaSwag-like batch); shared contexts are packed, logits only at continuation positions.
fn loglikelihood(c: &mut Criterion) {
    let model = Model::load(&slm_model::testing::default_model_path(), &candle_core::Device::Cpu).unwrap();
    let ctx = slm_benches::bench_input(16, 96, model.spec.vocab_size);
    let cont = slm_benches::bench_input(64, 8, model.spec.vocab_size);
    let requests: Vec<slm_eval::request::TokenRequest> = (0..64)
        .map(|i| slm_eval::request::TokenRequest { context: ctx[i / 4].clone(), continuation: cont[i].clone() })
        .collect();
    let engine = slm_eval::engine::Engine::new(&model, 16).unwrap();
    let mut g = c.benchmark_group("loglikelihood");
    g.sample_size(10);
    g.throughput(Throughput::Elements(requests.len() as u64));
    g.bench_function("16ctx96_x4choices8", |b| b.iter(|| engine.score(&requests, &mut |_| {}).unwrap()));
    g.finish();
}

/// One sliding-merge candidate: merge layers 20..=24 and run from layer 20 up from the cached dense hidden state
/// (10 calibration windows of 128 tokens), against the same candidate recomputed from the embeddings.
fn merge_candidate(c: &mut Criterion) {
    let model = Model::load(&slm_model::testing::default_model_path(), &candle_core::Device::Cpu).unwrap();
    let windows = slm_benches::bench_input(10, 128, model.spec.vocab_size);
    let mut cal = slm_depth::Calibration::new(&model, windows, slm_depth::MergeOp::Reference).unwrap();
    let cand = slm_depth::score::Candidate { merges: vec![[20, 24]], removed: vec![] };
    let mut g = c.benchmark_group("merge_candidate");
    g.sample_size(10);
    g.bench_function("merge_20_24_incremental", |b| b.iter(|| cal.candidate_final(&cand).unwrap()));
    cal.incremental = false;
    g.bench_function("merge_20_24_full", |b| b.iter(|| cal.candidate_final(&cand).unwrap()));
    g.finish();
}

/// The width-pruning gradient pass (first order): loss and backward over 10 windows of 128 tokens, gradients for
/// the projections of layers 4..28.
fn width_gradients(c: &mut Criterion) {
    let model = Model::load(&slm_model::testing::default_model_path(), &candle_core::Device::Cpu).unwrap();
    let windows = slm_benches::bench_input(10, 128, model.spec.vocab_size);
    let layers: Vec<usize> = (4..28).collect();
    let mut g = c.benchmark_group("width_gradients");
    g.sample_size(10);
    g.throughput(Throughput::Elements(10 * 128));
    g.bench_function("forward_loss_10x128", |b| b.iter(|| slm_width::importance::lm_loss(&model, &windows).unwrap()));
    g.bench_function("gradients_10x128_layers4to28", |b| {
        b.iter(|| slm_width::gradients(&model, &windows, &layers, false, &mut || {}).unwrap())
    });
    g.finish();
}

/// One LoRA micro-batch step as `slm lora` runs it: forward with adapters (r 8, α 16, dropout 0.05) on 4
/// sequences of 256 tokens, the mean token loss, and the backward pass to the A/B matrices.
fn lora_step(c: &mut Criterion) {
    let model = Model::load(&slm_model::testing::default_model_path(), &candle_core::Device::Cpu).unwrap();
    let lora = slm_lora::Lora::new(&model.spec, slm_lora::LoraConfig::default(), 42, &model.device).unwrap();
    let examples: Vec<slm_lora::Example> = slm_benches::bench_input(4, 256, model.spec.vocab_size)
        .into_iter()
        .map(|ids| slm_lora::Example { target: (0..ids.len()).map(|p| p > 0).collect(), ids })
        .collect();
    let mut g = c.benchmark_group("lora_step");
    g.sample_size(10);
    g.throughput(Throughput::Elements(4 * 256));
    g.bench_function("micro_batch_4x256_forward_backward", |b| {
        b.iter(|| {
            let losses = slm_lora::train::token_losses(&model, &lora, &examples, true, 7).unwrap();
            losses.mean_all().unwrap().backward().unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, forward, loglikelihood, merge_candidate, width_gradients, lora_step);
criterion_main!(benches);
