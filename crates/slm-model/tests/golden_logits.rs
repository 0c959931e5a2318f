//! The GGUF model against Hugging Face transformers (f32, CPU): `golden/smollm2_logits.safetensors`
//! holds, for four prompts, the reference token ids and the logits at every position.

use candle_core::{DType, Device, IndexOp, Tensor};
use slm_model::testing::{default_model_path, golden_dir, test_device};
use slm_model::{Mode, Model};

const PROMPTS: [&str; 4] = [
    "The capital of Italy is",
    "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer: Provide the guinea pig with a cage",
    " = Robert Boulter = \n\n Robert Boulter is an English film , television and theatre actor .",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
];

fn golden() -> std::collections::HashMap<String, Tensor> {
    let p = golden_dir().join("smollm2_logits.safetensors");
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn argmax_rows(t: &Tensor) -> Vec<u32> {
    t.argmax(1).unwrap().to_vec1::<u32>().unwrap()
}

#[test]
fn gguf_logits_and_token_ids_match_transformers() {
    // On `SLM_TEST_DEVICE` (cpu unless set; `scripts/gpu_check.sh` runs this on cuda).
    let model = Model::load(&default_model_path(), &test_device()).unwrap();
    let g = golden();
    let tok = model.tokenizer().unwrap();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let want_ids: Vec<u32> = g[&format!("ids_{i}")]
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        let ids = tok.encode(prompt).unwrap();
        assert_eq!(ids, want_ids, "token ids of prompt {i}");

        let logits = model.logits_all(&ids).unwrap().to_device(&Device::Cpu).unwrap();
        let want = &g[&format!("logits_{i}")];
        assert_eq!(logits.dims(), want.dims());
        let diff = (&logits - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-3, "prompt {i}: max |logit - golden| = {diff}");
        assert_eq!(argmax_rows(&logits), argmax_rows(want), "argmax of prompt {i}");
    }
}

#[test]
fn batched_padded_forward_equals_each_sequence_alone() {
    let model = Model::load(&default_model_path(), &Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    let seqs: Vec<Vec<u32>> = PROMPTS.iter().map(|p| tok.encode(p).unwrap()).collect();
    let positions: Vec<Vec<usize>> = seqs.iter().map(|s| (0..s.len()).collect()).collect();
    let out = model.forward(&seqs, &positions, true, Mode::Inference).unwrap();
    let batched = out.logits.unwrap();
    let mut row = 0;
    for (i, s) in seqs.iter().enumerate() {
        let alone = model.logits_all(s).unwrap();
        let part = batched.i(row..row + s.len()).unwrap();
        let diff = (&part - &alone).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-4, "sequence {i}: batched vs alone differ by {diff}");
        row += s.len();
    }
    // Hidden states: embeddings + one per layer, and the final norm.
    assert_eq!(out.hidden.len(), model.spec.num_layers() + 1);
    assert!(out.final_hidden.is_some());
}

#[test]
fn differentiable_mode_gives_the_same_logits() {
    let model = Model::load(&default_model_path(), &Device::Cpu).unwrap();
    let ids = model.tokenizer().unwrap().encode(PROMPTS[1]).unwrap();
    let pos = vec![(0..ids.len()).collect::<Vec<_>>()];
    let fast = model.forward(std::slice::from_ref(&ids), &pos, false, Mode::Inference).unwrap().logits.unwrap();
    let slow = model.forward(&[ids], &pos, false, Mode::Differentiable).unwrap().logits.unwrap();
    let diff = (&fast - &slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff <= 1e-4, "fast vs differentiable ops differ by {diff}");
}

#[test]
fn matches_candle_transformers_quantized_llama_last_position() {
    // An independent implementation of the same GGUF: candle-transformers' quantized Llama (it runs the
    // quantised matmuls directly, so agreement is looser than against the dequantised f32 reference).
    use candle_transformers::models::quantized_llama::ModelWeights;
    let path = default_model_path();
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let ids = model.tokenizer().unwrap().encode(PROMPTS[1]).unwrap();
    let ours = model.logits_all(&ids).unwrap().i(ids.len() - 1).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let theirs = reference.forward(&input, 0).unwrap().squeeze(0).unwrap();
    let a = ours.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    let b = theirs.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(a, b, "last-position argmax differs from candle-transformers");
    let diff = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    // Measured: 0.66 (its Q8 activation quantisation); a wrong rotary layout or norm gives differences of 10+.
    assert!(diff < 1.0, "last-position logits differ from candle-transformers by {diff}");
}
