//! Greedy generation for one sequence with a KV cache: what `slm bench` times (prefill and decode throughput,
//! the paper's efficiency table: batch 1, a fixed number of new tokens).
//!
//! Each step runs only the new tokens through the layers; their keys and values (after rotary) are appended to the
//! per-layer cache, and attention reads the whole cache. Per-layer widths come from [`crate::LayerSpec`], so a
//! width-pruned model decodes as is. The logits equal the full forward pass's at the same positions (tested).

use std::time::Instant;

use candle_core::{Tensor, D};

use crate::error::{ModelError, Result};
use crate::forward::{grouped_attention, linear, mlp_activations, rms_norm, rotary_tables, Mode};
use crate::Model;

/// What one greedy run produced and how long its phases took.
#[derive(Debug)]
pub struct Generation {
    /// The generated tokens (the prompt not included): one from the prefill, then one per decode step.
    pub tokens: Vec<u32>,
    /// The logits that chose each generated token, `[vocab]` each (only when asked for).
    pub logits: Vec<Tensor>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Decode steps run (`tokens.len() - 1`).
    pub decode_steps: usize,
}

struct Cache {
    k: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    /// (head_dim, cos, sin), `[max_len, head_dim/2]`.
    rotary: Vec<(usize, Tensor, Tensor)>,
}

impl Model {
    /// Greedy decoding: one prefill over `prompt`, then `decode_steps` steps of one token each.
    pub fn generate_greedy(&self, prompt: &[u32], decode_steps: usize, keep_logits: bool) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(ModelError::InvalidArgument("generation needs a non-empty prompt".into()));
        }
        let total = prompt.len() + decode_steps;
        if total > self.spec.max_position_embeddings {
            return Err(ModelError::InvalidArgument(format!(
                "{} prompt + {decode_steps} new tokens exceed max_position_embeddings {}",
                prompt.len(),
                self.spec.max_position_embeddings
            )));
        }
        let mut rotary: Vec<(usize, Tensor, Tensor)> = Vec::new();
        for l in &self.spec.layers {
            if rotary.iter().all(|(d, _, _)| *d != l.head_dim) {
                let (cos, sin) = rotary_tables(l.head_dim, total, self.spec.rope_theta);
                let half = l.head_dim / 2;
                rotary.push((
                    l.head_dim,
                    Tensor::from_vec(cos, (total, half), &self.device)?,
                    Tensor::from_vec(sin, (total, half), &self.device)?,
                ));
            }
        }
        let n = self.spec.num_layers();
        let mut cache = Cache { k: vec![None; n], v: vec![None; n], rotary };
        let mut out = Generation {
            tokens: Vec::with_capacity(decode_steps + 1),
            logits: Vec::new(),
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
            decode_steps,
        };
        let start = Instant::now();
        let mut logits = self.step(&mut cache, prompt, 0)?;
        for step in 0..=decode_steps {
            let next = logits.argmax(D::Minus1)?.to_scalar::<u32>()?;
            out.tokens.push(next);
            if keep_logits {
                out.logits.push(logits.clone());
            }
            if step == 0 {
                out.prefill_seconds = start.elapsed().as_secs_f64();
            }
            if step == decode_steps {
                break;
            }
            logits = self.step(&mut cache, &[next], prompt.len() + step)?;
        }
        out.decode_seconds = start.elapsed().as_secs_f64() - out.prefill_seconds;
        Ok(out)
    }

    /// Runs `ids` (at positions `pos..`) through every layer with the cache; returns the last position's logits.
    fn step(&self, cache: &mut Cache, ids: &[u32], pos: usize) -> Result<Tensor> {
        let t = ids.len();
        let s = pos + t;
        let ids_t = Tensor::from_vec(ids.to_vec(), t, &self.device)?;
        let mut x = self.weights.embed_tokens.index_select(&ids_t, 0)?.unsqueeze(0)?;
        // Query i (absolute position pos + i) sees keys 0..=pos + i.
        let mask = (t > 1)
            .then(|| {
                let m: Vec<f32> = (0..t)
                    .flat_map(|i| (0..s).map(move |j| if j <= pos + i { 0.0 } else { f32::NEG_INFINITY }))
                    .collect();
                Tensor::from_vec(m, (t, s), &self.device)
            })
            .transpose()?;
        let eps = self.spec.rms_norm_eps;
        for (i, (w, l)) in self.weights.layers.iter().zip(&self.spec.layers).enumerate() {
            let (nh, nkv, hd) = (l.num_attention_heads, l.num_key_value_heads, l.head_dim);
            let (_, cos, sin) = cache.rotary.iter().find(|(d, _, _)| *d == hd).expect("table per head_dim");
            let (cos, sin) = (cos.narrow(0, pos, t)?, sin.narrow(0, pos, t)?);
            let xn = rms_norm(&x, &w.input_layernorm, eps, Mode::Inference)?;
            let q = linear(&xn, &w.q_proj)?.reshape((1, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
            let k = linear(&xn, &w.k_proj)?.reshape((1, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let v = linear(&xn, &w.v_proj)?.reshape((1, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            let k = match cache.k[i].take() {
                Some(old) => Tensor::cat(&[&old, &k], 2)?,
                None => k,
            };
            let v = match cache.v[i].take() {
                Some(old) => Tensor::cat(&[&old, &v], 2)?,
                None => v,
            };
            let ctx = grouped_attention(&q, &k, &v, mask.as_ref(), Mode::Inference)?;
            let h = (&x + linear(&ctx, &w.o_proj)?)?;
            let a = mlp_activations(&h, w, eps, Mode::Inference)?;
            x = (&h + linear(&a, &w.down_proj)?)?;
            cache.k[i] = Some(k);
            cache.v[i] = Some(v);
        }
        let last = x.narrow(1, t - 1, 1)?.reshape((1, self.spec.hidden_size))?;
        let fin = rms_norm(&last, &self.weights.norm, eps, Mode::Inference)?;
        Ok(fin.matmul(&self.weights.lm_head().t()?)?.squeeze(0)?)
    }
}
