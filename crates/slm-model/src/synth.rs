//! Synthetic Llama-shaped models for scale tests: an HF directory of any size with seeded random weights,
//! generated and written one tensor at a time (a 13B model never exists in memory), sharded, with another
//! model's tokenizer.
//!
//! Weights: every norm 1; every other tensor uniform on ±0.02·√3 (standard deviation 0.02, transformers'
//! `initializer_range`), from a ChaCha8 stream seeded by the seed, the tensor's name and the chunk of 2^20 values,
//! so the bytes depend on the seed and the shape only, not on the thread count.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::hf::{StorageDType, Tensors};
use crate::output::Replace;
use crate::shards::TensorEntry;
use crate::spec::{Family, LayerSpec, ModelSpec};
use crate::tokenizer::Tokenizer;
use crate::weights::LayerWeights;

/// The dimensions of a synthetic Llama.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
}

impl SynthShape {
    /// Llama-2-7B's shape (hidden 4096, 32 layers, 32 heads, MLP 11008).
    pub const LLAMA2_7B: SynthShape =
        SynthShape { hidden: 4096, layers: 32, heads: 32, kv_heads: 32, intermediate: 11008 };
    /// Llama-2-13B's shape (hidden 5120, 40 layers, 40 heads, MLP 13824).
    pub const LLAMA2_13B: SynthShape =
        SynthShape { hidden: 5120, layers: 40, heads: 40, kv_heads: 40, intermediate: 13824 };

    /// A named shape: `llama2-7b`, `llama2-13b`.
    pub fn preset(name: &str) -> Option<SynthShape> {
        match name {
            "llama2-7b" => Some(Self::LLAMA2_7B),
            "llama2-13b" => Some(Self::LLAMA2_13B),
            _ => None,
        }
    }

    /// The spec of a Llama of this shape over `vocab` tokens (untied LM head, as Llama-2; eps 1e-5; 4096
    /// positions), checked like any loaded config.
    pub fn spec(&self, vocab: usize, bos: Option<u32>, eos: Option<u32>) -> Result<ModelSpec> {
        if self.heads == 0
            || !self.hidden.is_multiple_of(self.heads)
            || self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
        {
            return Err(ModelError::InvalidArgument(format!(
                "heads {} must divide hidden {} and be a multiple of kv-heads {}",
                self.heads, self.hidden, self.kv_heads
            )));
        }
        let l = LayerSpec {
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            head_dim: self.hidden / self.heads,
            intermediate_size: self.intermediate,
            sliding: false,
        };
        let spec = ModelSpec {
            vocab_size: vocab,
            hidden_size: self.hidden,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            bos_token_id: bos,
            eos_token_id: eos,
            arch: Family::Llama.arch(),
            layers: vec![l; self.layers],
        };
        spec.validate(Path::new("<synthetic model>"))?;
        Ok(spec)
    }
}

/// FNV-1a of a tensor name: a stable per-tensor seed.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

const CHUNK: usize = 1 << 20;

/// The seeded values of one tensor, in `dtype`.
pub fn synthetic_tensor(seed: u64, entry: &TensorEntry, dtype: DType) -> Result<Tensor> {
    let n: usize = entry.shape.iter().product();
    if entry.name.ends_with("norm.weight") {
        return Ok(Tensor::ones(entry.shape.as_slice(), dtype, &Device::Cpu)?);
    }
    let a = 0.02f32 * 3f32.sqrt();
    let base = seed ^ name_hash(&entry.name);
    let fill = |k: usize, out: &mut dyn FnMut(usize, f32)| {
        let mut rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(base.wrapping_add((k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        let len = CHUNK.min(n - k * CHUNK);
        for i in 0..len {
            out(i, rng.random_range(-a..a));
        }
    };
    let t = match dtype {
        DType::BF16 => {
            let mut v = vec![half::bf16::ZERO; n];
            v.par_chunks_mut(CHUNK).enumerate().for_each(|(k, c)| fill(k, &mut |i, x| c[i] = half::bf16::from_f32(x)));
            Tensor::from_vec(v, entry.shape.as_slice(), &Device::Cpu)?
        }
        DType::F16 => {
            let mut v = vec![half::f16::ZERO; n];
            v.par_chunks_mut(CHUNK).enumerate().for_each(|(k, c)| fill(k, &mut |i, x| c[i] = half::f16::from_f32(x)));
            Tensor::from_vec(v, entry.shape.as_slice(), &Device::Cpu)?
        }
        _ => {
            let mut v = vec![0f32; n];
            v.par_chunks_mut(CHUNK).enumerate().for_each(|(k, c)| fill(k, &mut |i, x| c[i] = x));
            Tensor::from_vec(v, entry.shape.as_slice(), &Device::Cpu)?.to_dtype(dtype)?
        }
    };
    Ok(t)
}

/// Every tensor of `spec` under its HF name, with its shape, in the order they are written.
pub fn tensor_entries(spec: &ModelSpec) -> Vec<TensorEntry> {
    let (v, h) = (spec.vocab_size, spec.hidden_size);
    let mut out = vec![TensorEntry { name: "model.embed_tokens.weight".into(), shape: vec![v, h] }];
    for (i, l) in spec.layers.iter().enumerate() {
        for (part, shape) in LayerWeights::expected_shapes(l, h, &spec.arch) {
            out.push(TensorEntry { name: format!("model.layers.{i}.{}", part.hf_suffix(&spec.arch)), shape });
        }
    }
    out.push(TensorEntry { name: "model.norm.weight".into(), shape: vec![h] });
    if !spec.tie_word_embeddings {
        out.push(TensorEntry { name: "lm_head.weight".into(), shape: vec![v, h] });
    }
    out
}

/// How [`write_synthetic`] writes: the seed, the stored dtype, the largest shard and the replacement rule.
#[derive(Debug, Clone, Copy)]
pub struct SynthOptions {
    pub seed: u64,
    pub dtype: StorageDType,
    pub max_shard_bytes: u64,
    pub replace: Replace,
}

/// Writes a synthetic model of `spec` to `dir` atomically (see the module documentation), with `tokenizer`'s
/// files, as `opts` say. `on_tensor(done, total)` follows the writing.
pub fn write_synthetic(
    dir: &Path,
    spec: &ModelSpec,
    tokenizer: &Tokenizer,
    opts: SynthOptions,
    on_tensor: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let entries = tensor_entries(spec);
    let total = entries.len();
    let mut done = 0;
    let mut produce = |e: &TensorEntry| -> Result<Tensor> {
        let t = synthetic_tensor(opts.seed, e, opts.dtype.dtype())?;
        done += 1;
        on_tensor(done, total);
        Ok(t)
    };
    let tensors =
        Tensors { entries, dtype: opts.dtype.dtype(), max_shard_bytes: opts.max_shard_bytes, produce: &mut produce };
    let files = crate::hf_side_files(spec, Some(tokenizer), opts.dtype)?;
    crate::hf::write_dir_atomically(dir, tensors, &files, None, opts.replace)
}
