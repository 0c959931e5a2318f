//! The synthetic-model maker: deterministic bytes (same seed and shape, same files; another seed, other
//! weights), the shape asked for, the default model's tokenizer, weights distributed as documented, sharded.

use candle_core::Device;
use slm_model::output::Replace;
use slm_model::synth::{tensor_entries, write_synthetic, SynthOptions, SynthShape};
use slm_model::testing::default_model_path;
use slm_model::{Model, StorageDType};

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn synthetic_models_are_deterministic_sharded_and_loadable() {
    let donor = Model::load(&default_model_path(), &Device::Cpu).unwrap();
    let shape = SynthShape { hidden: 128, layers: 3, heads: 4, kv_heads: 2, intermediate: 352 };
    let spec = shape.spec(donor.spec.vocab_size, donor.spec.bos_token_id, donor.spec.eos_token_id).unwrap();
    let tok = donor.tokenizer().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, seed: u64| {
        let out = dir.path().join(name);
        let mut calls = 0;
        let opts = SynthOptions {
            seed,
            dtype: StorageDType::BF16,
            max_shard_bytes: 6_000_000,
            replace: Replace::SlmOutputOfSameKind,
        };
        write_synthetic(&out, &spec, tok, opts, &mut |d, t| {
            calls += 1;
            assert!(d <= t);
        })
        .unwrap();
        assert_eq!(calls, tensor_entries(&spec).len());
        out
    };
    let (a, b, c) = (write("a", 5), write("b", 5), write("c", 6));
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    assert_eq!(fa, fb, "same seed and shape, same bytes");
    let shards: Vec<&String> = fa.iter().map(|(n, _)| n).filter(|n| n.starts_with("model-")).collect();
    assert!(shards.len() >= 2, "{shards:?}");
    for ((n, x), (_, y)) in fa.iter().zip(&fc) {
        if n.starts_with("model-") {
            assert_ne!(x, y, "{n}: another seed, other weights");
        }
    }
    let m = Model::load(&a, &Device::Cpu).unwrap();
    assert_eq!(m.spec, spec);
    assert_eq!(m.num_parameters(), spec.num_parameters());
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let text = "Synthetic weights, real tokens.";
    assert_eq!(m.tokenizer().unwrap().encode(text).unwrap(), tok.encode(text).unwrap());
    // Norms are 1; the rest uniform on ±0.02·√3 (std 0.02, mean 0), up to bf16 rounding.
    let w = &m.weights.layer(1).unwrap().into_owned();
    assert_eq!(w.q_proj.dtype(), candle_core::DType::BF16, "layer weights stay in their stored dtype");
    let f32 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
    assert_eq!(f32(&w.input_layernorm).min(0).unwrap().to_scalar::<f32>().unwrap(), 1.0);
    let q = f32(&w.q_proj).flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let a_max = 0.02f32 * 3f32.sqrt() * 1.004;
    assert!(q.iter().all(|x| x.abs() <= a_max));
    let n = q.len() as f64;
    let mean = q.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (q.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3, "mean {mean}, std {std}");
    let logits = m.logits_all(&tok.encode(text).unwrap()).unwrap();
    assert!(logits.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().is_finite());
    assert!(
        SynthShape::preset("llama2-7b").unwrap().spec(32000, None, None).unwrap().num_parameters() == 6_738_415_616
    );
}
