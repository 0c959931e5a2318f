//! Every supported family against transformers (f32, CPU).
//!
//! `golden/archs/<family>/`: a tiny random model of each family saved by transformers 5.24 with its config in the
//! published style, and `golden.safetensors` with three token sequences `ids_i` and transformers' logits
//! `logits_i` at every position. `golden/gemma3_270m_golden.*`: Gemma-3-270M (the Q4_K_M GGUF that
//! `scripts/setup.sh` assembles) on four prompts.

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use slm_model::testing::{golden_dir, max_abs_diff};
use slm_model::{Family, Mode, Model, PackedSequence};

const FAMILIES: [(&str, Family); 6] = [
    ("llama3", Family::Llama),
    ("llama_headdim", Family::Llama),
    ("mistral", Family::Mistral),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("gemma3", Family::Gemma3),
];

fn arch_dir(name: &str) -> PathBuf {
    golden_dir().join("archs").join(name)
}

fn golden(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

#[test]
fn every_family_matches_transformers_at_every_position() {
    for (name, family) in FAMILIES {
        let dir = arch_dir(name);
        let model = Model::load(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(model.spec.arch.family, family, "{name}");
        let g = golden(&dir.join("golden.safetensors"));
        for i in 0..3 {
            let seq = ids(&g[&format!("ids_{i}")]);
            let logits = model.logits_all(&seq).unwrap();
            let want = &g[&format!("logits_{i}")];
            assert_eq!(logits.dims(), want.dims(), "{name} sequence {i}");
            let d = max_abs_diff(&logits, want);
            eprintln!("{name} sequence {i}: {} tokens, max |logit - golden| = {d:.2e}", seq.len());
            assert!(d <= 1e-4, "{name} sequence {i} ({} tokens): max |logit - golden| = {d}", seq.len());
        }
    }
}

/// The three paths through the one layer function agree on every family: a padded batch, packed sequences
/// (shared prefix, branches), and KV-cached greedy decoding.
#[test]
fn batched_packed_and_cached_paths_agree_on_every_family() {
    for (name, _) in FAMILIES {
        let model = Model::load(&arch_dir(name), &Device::Cpu).unwrap();
        let g = golden(&arch_dir(name).join("golden.safetensors"));
        let seqs: Vec<Vec<u32>> = (0..3).map(|i| ids(&g[&format!("ids_{i}")])).collect();
        // Padded batch vs each alone.
        let positions: Vec<Vec<usize>> = seqs.iter().map(|s| (0..s.len()).collect()).collect();
        let batched = model.forward(&seqs, &positions, false, Mode::Inference).unwrap().logits.unwrap();
        let mut row = 0;
        for s in &seqs {
            let alone = model.logits_all(s).unwrap();
            let d = max_abs_diff(&batched.narrow(0, row, s.len()).unwrap(), &alone);
            assert!(d <= 1e-4, "{name}: batched vs alone {d}");
            row += s.len();
        }
        // Packed: prefix = the first 5 tokens of sequence 0, two branches (the rest of it, and 4 other tokens).
        let prefix = seqs[0][..5].to_vec();
        let branches = vec![seqs[0][5..].to_vec(), seqs[1][..4].to_vec()];
        let packed = PackedSequence { prefix: prefix.clone(), branches: branches.clone() };
        let batch = slm_model::Batch::packed(&model.spec, std::slice::from_ref(&packed), &model.device).unwrap();
        for (b, br) in branches.iter().enumerate() {
            let full: Vec<u32> = prefix.iter().chain(br).copied().collect();
            let pos: Vec<usize> = (0..full.len()).map(|k| packed.index_of(b, k)).collect();
            let got = model.forward_batch(&batch, &[pos], false, Mode::Inference).unwrap().logits.unwrap();
            let d = max_abs_diff(&got, &model.logits_all(&full).unwrap());
            assert!(d <= 1e-4, "{name}: packed branch {b} vs alone {d}");
        }
        // KV cache: greedy decoding's logits equal the full pass over prompt + generated tokens.
        let prompt = &seqs[2][..6];
        let gen = model.generate_greedy(prompt, 12, true).unwrap();
        let full: Vec<u32> = prompt.iter().chain(&gen.tokens[..gen.tokens.len() - 1]).copied().collect();
        let all = model.logits_all(&full).unwrap();
        for (k, l) in gen.logits.iter().enumerate() {
            let d = max_abs_diff(l, &all.i(prompt.len() - 1 + k).unwrap());
            assert!(d <= 1e-4, "{name}: cached step {k} vs full pass {d}");
        }
    }
}

/// The published configs survive a save: the family's own model_type and architectures, the rotary scaling, the
/// layer types; the reloaded model is the same, bit for bit.
#[test]
fn every_family_exports_as_itself_and_reloads_bit_exact() {
    for (name, family) in FAMILIES {
        let model = Model::load(&arch_dir(name), &Device::Cpu).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("m");
        model.save(&dir, slm_model::StorageDType::F32, &[]).unwrap();
        let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["model_type"], family.model_type(), "{name}");
        assert_eq!(cfg["architectures"][0], family.architecture(), "{name}");
        // What transformers' strict config classes need: no slm-only key on a uniform model, integer fields as
        // integers (transformers 5.24 refuses `query_pre_attn_scalar: 32.0`).
        assert!(cfg.get("slm_layers").is_none(), "{name}: a uniform model needs no slm_layers");
        if family == Family::Gemma3 {
            assert!(cfg["query_pre_attn_scalar"].is_u64(), "{name}: {}", cfg["query_pre_attn_scalar"]);
        }
        let back = Model::load(&dir, &Device::Cpu).unwrap();
        assert_eq!(back.spec, model.spec, "{name}");
        let (a, b) = (
            model.weights.named_tensors(&model.spec.arch).unwrap(),
            back.weights.named_tensors(&back.spec.arch).unwrap(),
        );
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert_eq!(max_abs_diff(ta, tb), 0.0, "{name}: {na}");
        }
    }
    // The features the configs carry, read as published.
    let spec = |n: &str| Model::load(&arch_dir(n), &Device::Cpu).unwrap().spec;
    let l3 = spec("llama3");
    assert!(matches!(l3.arch.rope.scaling, slm_model::RopeScaling::Llama3 { factor, .. } if factor == 32.0));
    assert!(spec("qwen2").arch.qkv_bias && spec("qwen3").arch.qk_norm);
    let gm = spec("gemma3");
    assert_eq!(gm.layers.iter().map(|l| l.sliding).collect::<Vec<_>>(), [true, false, true]);
    assert_eq!((gm.arch.sliding_window, gm.arch.query_pre_attn_scalar), (Some(8), Some(32.0)));
    assert_eq!(gm.arch.local_rope.unwrap().theta, 10_000.0);
    assert_eq!(spec("llama_headdim").layers[0].head_dim, 32);
}

/// Unsupported features are refused naming the key, never ignored.
#[test]
fn unsupported_configs_are_refused_by_key() {
    let base: serde_json::Value =
        serde_json::from_slice(&std::fs::read(arch_dir("llama3").join("config.json")).unwrap()).unwrap();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("model_type", serde_json::json!("mixtral"), "mixture of experts"),
        ("model_type", serde_json::json!("gemma3"), "vision tower"),
        ("model_type", serde_json::json!("phi3"), "`model_type` `phi3` is not supported"),
        ("rope_scaling", serde_json::json!({"rope_type": "yarn", "factor": 4.0}), "`rope_scaling.rope_type` `yarn`"),
        ("rope_scaling", serde_json::json!({"rope_type": "llama3", "factor": 8.0}), "rope_scaling.low_freq_factor"),
        ("num_local_experts", serde_json::json!(8), "`num_local_experts`"),
        ("vision_config", serde_json::json!({}), "`vision_config`"),
        ("hidden_act", serde_json::json!("relu"), "`hidden_act`"),
        ("attention_bias", serde_json::json!(true), "`attention_bias: true`"),
    ];
    for (key, value, want) in cases {
        let mut v = base.clone();
        v[key] = value.clone();
        let e = slm_model::ModelSpec::from_hf_value(&v, std::path::Path::new("/m/config.json")).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("/m/config.json") && e.contains(want), "{key}={value}: {e}");
    }
}

fn gemma_path() -> PathBuf {
    let p = slm_model::testing::workspace_root().join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(p.is_file(), "Gemma-3-270M not found at {}: run `scripts/setup.sh` first", p.display());
    p
}

/// Gemma-3-270M from its GGUF against transformers' reading of the same file: token ids equal (BOS added), the
/// last position's logits within 2e-3, the same argmax at every position, next-token log-probabilities within
/// 2e-3.
#[test]
fn gemma3_270m_matches_transformers() {
    let model = Model::load(&gemma_path(), &Device::Cpu).unwrap();
    assert_eq!(model.spec.arch.family, Family::Gemma3);
    let g = golden(&golden_dir().join("gemma3_270m_golden.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden_dir().join("gemma3_270m_golden.json")).unwrap()).unwrap();
    let tok = model.tokenizer().unwrap();
    let bos = tok.bos_to_prepend().expect("Gemma adds <bos>");
    for (i, prompt) in meta["prompts"].as_array().unwrap().iter().enumerate() {
        let mut seq = vec![bos];
        seq.extend(tok.encode(prompt.as_str().unwrap()).unwrap());
        assert_eq!(seq, ids(&g[&format!("ids_{i}")]), "token ids of prompt {i}");
        let logits = model.logits_all(&seq).unwrap();
        let t = seq.len();
        let d = max_abs_diff(&logits.i(t - 1).unwrap(), &g[&format!("last_logits_{i}")]);
        eprintln!("gemma3-270m prompt {i}: {t} tokens, last-position max |logit - golden| = {d:.2e}");
        assert!(d <= 2e-3, "prompt {i}: last-position logits differ by {d}");
        let argmax = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(argmax, ids(&g[&format!("argmax_{i}")]), "argmax of prompt {i}");
        let logp = candle_nn::ops::log_softmax(&logits, 1).unwrap();
        let next: Vec<f32> =
            (0..t - 1).map(|p| logp.i((p, seq[p + 1] as usize)).unwrap().to_scalar().unwrap()).collect();
        let want = g[&format!("next_logprob_{i}")].to_vec1::<f32>().unwrap();
        let d = next.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("gemma3-270m prompt {i}: next-token log-probability max diff {d:.2e}");
        assert!(d <= 2e-3, "prompt {i}: next-token log-probabilities differ by {d}");
    }
}

/// Every family through `slm export --out FILE.gguf` (f32) and back: the family's llama.cpp architecture, and
/// transformers' logits at every position within the HF load's tolerance (Llama-3.1's scaling travels as the
/// `rope_freqs.weight` divisors, Mistral as `llama` with its window). A Gemma-3 whose sliding layers are not
/// llama.cpp's every-sixth-global pattern is refused by name instead.
#[test]
fn every_family_survives_a_gguf_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, _) in FAMILIES {
        let dir = arch_dir(name);
        let model = Model::load(&dir, &Device::Cpu).unwrap();
        let out = tmp.path().join(format!("{name}.gguf"));
        let r = slm_model::gguf_write::export_gguf(
            &model,
            &out,
            slm_model::gguf_write::OutType::F32,
            slm_model::output::Replace::SlmOutputOfSameKind,
            None,
            &mut |_, _| {},
        );
        let pattern = model.spec.layers.iter().enumerate().all(|(i, l)| l.sliding == ((i + 1) % 6 != 0));
        if model.spec.arch.family == Family::Gemma3 && !pattern {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("every sixth global"), "{name}: {e}");
            assert!(!out.exists());
            continue;
        }
        let r = r.unwrap_or_else(|e| panic!("{name}: {e}"));
        let back = Model::load(&out, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back.spec.layers, model.spec.layers, "{name}");
        let g = golden(&dir.join("golden.safetensors"));
        for i in 0..3 {
            let seq = ids(&g[&format!("ids_{i}")]);
            let d = max_abs_diff(&back.logits_all(&seq).unwrap(), &g[&format!("logits_{i}")]);
            eprintln!(
                "{name} ({}) sequence {i}: max |logit - golden| = {d:.2e} after the GGUF round trip",
                r.architecture
            );
            assert!(d <= 1e-4, "{name} sequence {i}: {d} after the GGUF round trip");
        }
    }
}
