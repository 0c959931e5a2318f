//! `slm-eval` against lm-evaluation-harness 0.4.13 on the first 25 documents of each task
//! (`golden/lm-eval-first25`, produced by lm-eval with transformers, f32, CPU).

use std::path::PathBuf;

use serde_json::Value;
use slm_eval::{build_token_requests, score_docs, Engine, Task, TokenRequest};
use slm_model::testing::{data_dir, default_model_path, golden_dir, test_device};
use slm_model::Model;

fn golden(set: &str, task: &str) -> Vec<Value> {
    let path: PathBuf = golden_dir().join(set).join(format!("{task}.jsonl"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn check_task(name: &str) {
    check(&default_model_path(), "lm-eval-first25", name)
}

fn gemma_path() -> PathBuf {
    let p = slm_model::testing::workspace_root().join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(p.is_file(), "Gemma-3-270M not found at {}: run `scripts/setup.sh` first", p.display());
    p
}

/// On `SLM_TEST_DEVICE` (cpu unless set; `scripts/gpu_check.sh` runs these on cuda).
fn check(model_path: &std::path::Path, set: &str, name: &str) {
    let model = Model::load(model_path, &test_device()).unwrap();
    let task = Task::from_name(name).unwrap();
    let gold = golden(set, name);
    let docs = task.load_docs(&data_dir(), Some(gold.len())).unwrap();
    assert_eq!(docs.len(), 25);

    // Requests: string-identical to lm-eval's.
    for (d, g) in docs.iter().zip(&gold) {
        assert_eq!(d.doc_id as u64, g["doc_id"].as_u64().unwrap());
        assert_eq!(d.gold as u64, g["gold"].as_u64().unwrap(), "{name} doc {}: gold", d.doc_id);
        let greq = g["requests"].as_array().unwrap();
        assert_eq!(d.requests.len(), greq.len(), "{name} doc {}: request count", d.doc_id);
        for (r, gr) in d.requests.iter().zip(greq) {
            assert_eq!(r.context, gr["context"].as_str().unwrap(), "{name} doc {}: context", d.doc_id);
            assert_eq!(r.continuation, gr["continuation"].as_str().unwrap(), "{name} doc {}", d.doc_id);
        }
    }

    // Log-likelihoods within 2e-3; per-document acc / acc_norm identical.
    let tok = slm_eval::LmEvalEncoder::for_model(&model).unwrap();
    let doc_requests = build_token_requests(&tok, &docs, model.spec.max_position_embeddings).unwrap();
    let flat: Vec<TokenRequest> = doc_requests.iter().flat_map(|d| d.requests.clone()).collect();
    let results = Engine::new(&model, 16).unwrap().score(&flat, &mut |_| {}).unwrap();
    let mut it = results.into_iter();
    let per_doc: Vec<Vec<_>> = doc_requests.iter().map(|d| it.by_ref().take(d.requests.len()).collect()).collect();
    let scored = score_docs(&task, &docs, &per_doc).unwrap();
    let mut worst = 0f64;
    for (s, g) in scored.iter().zip(&gold) {
        let gll: Vec<f64> = g["loglikelihood"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        for (ll, gl) in s.loglikelihoods.iter().zip(&gll) {
            worst = worst.max((ll - gl).abs());
        }
        assert_eq!(s.acc, g["metrics"]["acc"].as_f64().unwrap(), "{name} doc {}: acc", s.doc_id);
        match g["metrics"].get("acc_norm") {
            Some(v) => assert_eq!(s.acc_norm, v.as_f64(), "{name} doc {}: acc_norm", s.doc_id),
            None => assert_eq!(s.acc_norm, None),
        }
    }
    eprintln!("{set} {name}: worst |ll - golden| = {worst:.2e}");
    assert!(worst <= 2e-3, "{set} {name}: worst |ll - golden| = {worst:.2e} > 2e-3");
}

/// Gemma-3-270M (a second family: sentencepiece tokenizer with `<bos>` on every request, GeGLU, sandwich norms,
/// sliding-window layers) against lm-eval on the same documents (`golden/lm-eval-first25-gemma3`).
#[test]
fn gemma3_matches_lm_eval_on_every_task() {
    for name in ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"] {
        check(&gemma_path(), "lm-eval-first25-gemma3", name);
    }
}

#[test]
fn boolq_matches_lm_eval() {
    check_task("boolq");
}
#[test]
fn piqa_matches_lm_eval() {
    check_task("piqa");
}
#[test]
fn hellaswag_matches_lm_eval() {
    check_task("hellaswag");
}
#[test]
fn winogrande_matches_lm_eval() {
    check_task("winogrande");
}
#[test]
fn arc_easy_matches_lm_eval() {
    check_task("arc_easy");
}
#[test]
fn arc_challenge_matches_lm_eval() {
    check_task("arc_challenge");
}
#[test]
fn openbookqa_matches_lm_eval() {
    check_task("openbookqa");
}

/// Packing the continuations of a context into one sequence changes no log-likelihood beyond float noise.
#[test]
fn shared_context_equals_scoring_each_request_alone() {
    let model = Model::load(&default_model_path(), &candle_core::Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    let mut flat = Vec::new();
    for name in ["hellaswag", "arc_easy", "winogrande"] {
        let docs = Task::from_name(name).unwrap().load_docs(&data_dir(), Some(6)).unwrap();
        for d in build_token_requests(tok, &docs, 8192).unwrap() {
            flat.extend(d.requests);
        }
    }
    let shared = Engine::new(&model, 4).unwrap().score(&flat, &mut |_| {}).unwrap();
    let alone = Engine::new(&model, 1).unwrap().share_context(false).score(&flat, &mut |_| {}).unwrap();
    let mut worst = 0f64;
    for (a, b) in shared.iter().zip(&alone) {
        worst = worst.max((a.loglikelihood - b.loglikelihood).abs());
        assert_eq!(a.is_greedy, b.is_greedy);
    }
    eprintln!("shared vs alone: worst |diff| = {worst:.2e}");
    assert!(worst <= 1e-4, "shared vs alone: {worst:.2e}");
}

/// `wikitext2-128` perplexity equals exp(mean token loss) computed directly from the model's full logits.
#[test]
fn wikitext2_128_perplexity_equals_direct_token_loss() {
    use candle_core::D;
    let model = Model::load(&default_model_path(), &candle_core::Device::Cpu).unwrap();
    let settings = slm_eval::Settings {
        data_dir: &data_dir(),
        limit: Some(3),
        max_length: 8192,
        batch_size: 2,
        share_context: true,
    };
    let run = slm_eval::evaluate(&model, Task::from_name("wikitext2-128").unwrap(), &settings, &mut slm_eval::Silent)
        .unwrap();
    assert_eq!(run.report.n_effective, 3);
    let ppl = run.report.metrics[0].value;

    let text = slm_eval::wikitext2_text(&data_dir()).unwrap();
    let tokens = model.tokenizer().unwrap().encode(&text).unwrap();
    let (mut nll, mut n) = (0f64, 0usize);
    for w in tokens.chunks_exact(128).take(3) {
        let logp = candle_nn::ops::log_softmax(&model.logits_all(w).unwrap(), D::Minus1).unwrap();
        let rows: Vec<Vec<f32>> = logp.to_vec2().unwrap();
        for i in 0..127 {
            nll -= rows[i][w[i + 1] as usize] as f64;
            n += 1;
        }
    }
    let direct = (nll / n as f64).exp();
    assert!((ppl - direct).abs() / direct < 1e-5, "engine {ppl} vs direct {direct}");
}

/// Scores of every document of `name` (first 25) with `model`: per document its log-likelihoods, acc, acc_norm.
fn scores(model: &Model, name: &str) -> Vec<(Vec<f64>, f64, Option<f64>)> {
    let task = Task::from_name(name).unwrap();
    let docs = task.load_docs(&data_dir(), Some(25)).unwrap();
    let tok = slm_eval::LmEvalEncoder::for_model(model).unwrap();
    let doc_requests = build_token_requests(&tok, &docs, model.spec.max_position_embeddings).unwrap();
    let flat: Vec<TokenRequest> = doc_requests.iter().flat_map(|d| d.requests.clone()).collect();
    let results = Engine::new(model, 16).unwrap().score(&flat, &mut |_| {}).unwrap();
    let mut it = results.into_iter();
    let per_doc: Vec<Vec<_>> = doc_requests.iter().map(|d| it.by_ref().take(d.requests.len()).collect()).collect();
    score_docs(&task, &docs, &per_doc).unwrap().into_iter().map(|s| (s.loglikelihoods, s.acc, s.acc_norm)).collect()
}

/// A bf16 HF directory keeps its layer weights in bf16 (no f32 copy of the model: they are upcast while a layer
/// runs) and evaluates like the same weights held in f32: log-likelihoods within 1e-3, the same acc and acc_norm
/// on every golden document of every task.
#[test]
fn bf16_storage_evaluates_like_f32_storage() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bf16");
    Model::load(&default_model_path(), &candle_core::Device::Cpu)
        .unwrap()
        .save(&out, slm_model::StorageDType::BF16, &[])
        .unwrap();
    let bf16 = Model::load(&out, &candle_core::Device::Cpu).unwrap();
    for l in &bf16.weights.layers {
        let l = l.get().unwrap();
        for (part, t) in l.parts() {
            assert_eq!(t.dtype(), candle_core::DType::BF16, "{part:?} is not kept in its stored dtype");
        }
    }
    let f32 = bf16.to_device(&candle_core::Device::Cpu).unwrap();
    assert_eq!(f32.weights.layer(0).unwrap().q_proj.dtype(), candle_core::DType::F32);
    let mut worst = 0f64;
    for name in ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"] {
        let (a, b) = (scores(&bf16, name), scores(&f32, name));
        for (k, (x, y)) in a.iter().zip(&b).enumerate() {
            for (p, q) in x.0.iter().zip(&y.0) {
                worst = worst.max((p - q).abs());
            }
            assert_eq!((x.1, x.2), (y.1, y.2), "{name} doc {k}: acc / acc_norm");
        }
    }
    eprintln!("bf16 storage against f32 storage: worst |ll difference| = {worst:.2e}");
    assert!(worst <= 1e-3, "worst |ll difference| = {worst:.2e}");
}

/// `--compute-dtype bf16`: the layers compute in bf16 (the hidden states are bf16, the logits f32) and the
/// evaluation stays close to f32 compute on the golden documents of the seven tasks. The bounds are this
/// test's measured values with a margin (README: bf16 compute).
#[test]
fn bf16_compute_evaluates_close_to_f32_compute() {
    let f32 = Model::load(&default_model_path(), &candle_core::Device::Cpu).unwrap();
    let mut bf16 = f32.clone();
    bf16.set_compute_dtype(candle_core::DType::BF16).unwrap();
    assert_eq!(bf16.compute_dtype(), candle_core::DType::BF16);
    assert_eq!(f32.compute_dtype(), candle_core::DType::F32, "the copy must not change the original");
    // The hidden states are bf16 and the logits f32.
    let batch = slm_model::Batch::new(&bf16.spec, &[vec![1u32, 504, 3458, 282, 4771, 314]], &bf16.device).unwrap();
    let x = bf16.embed(&batch).unwrap();
    assert_eq!(x.dtype(), candle_core::DType::BF16);
    let h = bf16.run_layers(x, 0..bf16.spec.num_layers(), &batch, slm_model::Mode::Inference).unwrap();
    assert_eq!(h.dtype(), candle_core::DType::BF16);
    let rows = bf16.final_norm(&h, slm_model::Mode::Inference).unwrap().squeeze(0).unwrap();
    assert_eq!(bf16.head(&rows).unwrap().dtype(), candle_core::DType::F32);

    let (mut worst, mut sum, mut n, mut same, mut docs) = (0f64, 0f64, 0usize, 0usize, 0usize);
    for name in ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"] {
        let (a, b) = (scores(&bf16, name), scores(&f32, name));
        for (x, y) in a.iter().zip(&b) {
            for (p, q) in x.0.iter().zip(&y.0) {
                worst = worst.max((p - q).abs());
                sum += (p - q).abs();
                n += 1;
            }
            docs += 1;
            same += usize::from((x.1, x.2) == (y.1, y.2));
        }
    }
    let mean = sum / n as f64;
    eprintln!(
        "bf16 compute against f32 compute: mean |ll difference| {mean:.3e}, worst {worst:.3e} over {n} requests; \
         acc and acc_norm agree on {same} of {docs} documents"
    );
    // Measured: mean 0.106, worst 0.567 over 550 requests; 173 of 175 documents agree.
    assert!(mean <= 0.2 && worst <= 1.0, "mean {mean:.3e}, worst {worst:.3e}");
    assert!(same * 100 >= docs * 95, "decisions agree on only {same} of {docs} documents");
}
