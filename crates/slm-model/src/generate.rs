//! Greedy generation for one sequence with a KV cache: what `slm bench` times (prefill and decode throughput,
//! the paper's efficiency table: batch 1, a fixed number of new tokens).
//!
//! Each step runs only the new tokens through the layers; their keys and values (after rotary) are appended to the
//! per-layer cache, and attention reads the whole cache. Per-layer widths come from [`crate::LayerSpec`], so a
//! width-pruned model decodes as is. The logits equal the full forward pass's at the same positions (tested).

use std::time::Instant;

use candle_core::{Tensor, D};

use crate::error::{ModelError, Result};
use crate::forward::{layer, rotary_kinds, rotary_of, rotary_tables, Attend, KvCache, Mode, NoAdapter};
use crate::spec::Rope;
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
    layers: Vec<KvCache>,
    /// (head_dim, rotary embedding, cos, sin), `[max_len, head_dim/2]`.
    rotary: Vec<(usize, Rope, Tensor, Tensor)>,
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
        let mut rotary: Vec<(usize, Rope, Tensor, Tensor)> = Vec::new();
        for (head_dim, rope) in rotary_kinds(&self.spec) {
            let (cos, sin) = rotary_tables(head_dim, total, &rope);
            let half = head_dim / 2;
            rotary.push((
                head_dim,
                rope,
                Tensor::from_vec(cos, (total, half), &self.device)?,
                Tensor::from_vec(sin, (total, half), &self.device)?,
            ));
        }
        let n = self.spec.num_layers();
        let mut cache = Cache { layers: (0..n).map(|_| KvCache::default()).collect(), rotary };
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
        let ids_t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &self.device)?;
        Ok(self.step_batch(cache, &ids_t, pos)?.squeeze(0)?)
    }

    /// Runs `ids: [B, t]` (every row at positions `pos..`) through every layer with the cache; returns the last
    /// position's logits `[B, vocab]`.
    fn step_batch(&self, cache: &mut Cache, ids_t: &Tensor, pos: usize) -> Result<Tensor> {
        let (b, t) = ids_t.dims2()?;
        let s = pos + t;
        let mut x = self.embed_ids(ids_t)?;
        // Query i (absolute position pos + i) sees keys 0..=pos + i, and a sliding-window layer only the last
        // `window` of them.
        let mask = |window: Option<usize>| -> Result<Option<Tensor>> {
            let visible = |i: usize, j: usize| j <= pos + i && window.is_none_or(|w| pos + i - j < w);
            if t == 1 && (0..s).all(|j| visible(0, j)) {
                return Ok(None); // one new token that sees every cached key
            }
            let m: Vec<f32> =
                (0..t).flat_map(|i| (0..s).map(move |j| if visible(i, j) { 0.0 } else { f32::NEG_INFINITY })).collect();
            Ok(Some(Tensor::from_vec(m, (t, s), &self.device)?))
        };
        let global = mask(None)?;
        let sliding = match self.spec.sliding_window_in_use() {
            Some(w) => mask(Some(w))?,
            None => None,
        };
        for (i, (w, l)) in self.weights.layers.iter().zip(&self.spec.layers).enumerate() {
            let (cos, sin) = rotary_of(&cache.rotary, l, &self.spec.arch).expect("a table per layer");
            let mut att = Attend {
                cos: cos.narrow(0, pos, t)?,
                sin: sin.narrow(0, pos, t)?,
                mask: if l.sliding { sliding.clone() } else { global.clone() },
                cache: Some(&mut cache.layers[i]),
            };
            let w = w.get()?;
            x = layer(&x, &w, l, &self.layer_ctx(i, Mode::Inference, &NoAdapter), &mut att)?;
        }
        let last = x.narrow(1, t - 1, 1)?.reshape((b, self.spec.hidden_size))?;
        let fin = self.final_norm(&last, Mode::Inference)?;
        self.head(&fin)
    }

    /// Generation for a batch of prompts of one length, `new_tokens` each, with a KV cache: one prefill of the
    /// whole batch, then one step per token for every row. `choose(row, logits)` picks row `row`'s next token from
    /// its f32 logits (greedy, or sampling with the row's own seeded generator). Returns the new tokens per row.
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        new_tokens: usize,
        choose: &mut dyn FnMut(usize, &[f32]) -> u32,
    ) -> Result<Vec<Vec<u32>>> {
        let p = prompts.first().map_or(0, Vec::len);
        if p == 0 || prompts.iter().any(|x| x.len() != p) {
            return Err(ModelError::InvalidArgument("batched generation needs non-empty prompts of one length".into()));
        }
        if new_tokens == 0 {
            return Ok(vec![Vec::new(); prompts.len()]);
        }
        let total = p + new_tokens;
        if total > self.spec.max_position_embeddings {
            return Err(ModelError::InvalidArgument(format!(
                "{p} prompt + {new_tokens} new tokens exceed max_position_embeddings {}",
                self.spec.max_position_embeddings
            )));
        }
        let mut rotary = Vec::new();
        for (head_dim, rope) in rotary_kinds(&self.spec) {
            let (cos, sin) = rotary_tables(head_dim, total, &rope);
            let half = head_dim / 2;
            rotary.push((
                head_dim,
                rope,
                Tensor::from_vec(cos, (total, half), &self.device)?,
                Tensor::from_vec(sin, (total, half), &self.device)?,
            ));
        }
        let n = self.spec.num_layers();
        let mut cache = Cache { layers: (0..n).map(|_| KvCache::default()).collect(), rotary };
        let b = prompts.len();
        let flat: Vec<u32> = prompts.iter().flatten().copied().collect();
        let mut logits = self.step_batch(&mut cache, &Tensor::from_vec(flat, (b, p), &self.device)?, 0)?;
        let mut out = vec![Vec::with_capacity(new_tokens); b];
        for step in 0..new_tokens {
            let rows = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
            let next: Vec<u32> = rows.iter().enumerate().map(|(r, l)| choose(r, l)).collect();
            for (o, &t) in out.iter_mut().zip(&next) {
                o.push(t);
            }
            if step + 1 == new_tokens {
                break;
            }
            logits = self.step_batch(&mut cache, &Tensor::from_vec(next, (b, 1), &self.device)?, p + step)?;
        }
        Ok(out)
    }
}
