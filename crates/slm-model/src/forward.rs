//! The Llama forward pass over a batch of right-padded sequences.
//!
//! Per-layer shapes come from [`LayerSpec`], so a model whose layers differ in width runs as is. The pieces
//! (`Batch::new`, [`Model::embed`], [`decoder_layer`], [`Model::final_norm`], [`Model::logits_at`]) are public so
//! that pruning methods can run a sub-range of layers (e.g. from a cached hidden state upward).
//!
//! Gradients: candle's fused ops (`rms_norm`, `rope`, `softmax_last_dim`) detach their outputs. With
//! [`Mode::Differentiable`] the slow, differentiable twins are used instead; they compute the same values.

use candle_core::{Device, Tensor, D};

use crate::error::{ModelError, Result};
use crate::spec::{LayerSpec, ModelSpec};
use crate::weights::LayerWeights;
use crate::Model;

/// Which kernels the forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Fused kernels, no gradient.
    #[default]
    Inference,
    /// Differentiable ops everywhere (for Taylor importance and LoRA training).
    Differentiable,
}

/// A prepared batch: padded ids, lengths, the causal + padding mask and the rotary tables.
pub struct Batch {
    /// `[B, T]` u32 token ids, right-padded.
    pub ids: Tensor,
    pub lengths: Vec<usize>,
    pub seq_len: usize,
    /// `[B, 1, 1, T, T]` additive mask (0 or -inf), broadcast over KV heads and query groups.
    pub mask: Tensor,
    /// `[T, head_dim/2]` per distinct head_dim (usually one).
    rotary: Vec<(usize, Tensor, Tensor)>,
}

impl Batch {
    /// Pads `sequences` on the right and builds the mask and rotary tables for every head_dim in `spec`.
    pub fn new(spec: &ModelSpec, sequences: &[Vec<u32>], device: &Device) -> Result<Self> {
        if sequences.is_empty() || sequences.iter().any(|s| s.is_empty()) {
            return Err(ModelError::InvalidArgument("forward needs at least one non-empty sequence".into()));
        }
        let lengths: Vec<usize> = sequences.iter().map(Vec::len).collect();
        let t = *lengths.iter().max().unwrap_or(&1);
        if t > spec.max_position_embeddings {
            return Err(ModelError::InvalidArgument(format!(
                "sequence of {t} tokens is longer than the model's max_position_embeddings {}",
                spec.max_position_embeddings
            )));
        }
        if let Some(bad) = sequences.iter().flatten().find(|&&id| id as usize >= spec.vocab_size) {
            return Err(ModelError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary ({})",
                spec.vocab_size
            )));
        }
        let b = sequences.len();
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![f32::NEG_INFINITY; b * t * t];
        for (s, seq) in sequences.iter().enumerate() {
            ids[s * t..s * t + seq.len()].copy_from_slice(seq);
            // Query i attends to keys j <= i that are real tokens. Padded queries (i >= len) still see every real
            // key, so no row is fully masked; their outputs are never read.
            for i in 0..t {
                let row = &mut mask[(s * t + i) * t..(s * t + i + 1) * t];
                for (j, m) in row.iter_mut().enumerate().take(seq.len()) {
                    if j <= i {
                        *m = 0.0;
                    }
                }
            }
        }
        let ids = Tensor::from_vec(ids, (b, t), device)?;
        let mask = Tensor::from_vec(mask, (b, 1, 1, t, t), device)?;
        let mut rotary: Vec<(usize, Tensor, Tensor)> = Vec::new();
        for l in &spec.layers {
            if !rotary.iter().any(|(d, _, _)| *d == l.head_dim) {
                let (cos, sin) = rotary_tables(l.head_dim, t, spec.rope_theta, device)?;
                rotary.push((l.head_dim, cos, sin));
            }
        }
        Ok(Batch {
            ids,
            lengths,
            seq_len: t,
            mask,
            rotary,
        })
    }

    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    fn rotary(&self, head_dim: usize) -> Result<(&Tensor, &Tensor)> {
        self.rotary
            .iter()
            .find(|(d, _, _)| *d == head_dim)
            .map(|(_, c, s)| (c, s))
            .ok_or_else(|| ModelError::InvalidArgument(format!("no rotary table for head_dim {head_dim}")))
    }
}

/// cos/sin tables `[T, head_dim/2]` for HF's (non-interleaved, rotate-half) rotary embedding.
fn rotary_tables(head_dim: usize, t: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|k| (1.0 / theta.powf(2.0 * k as f64 / head_dim as f64)) as f32)
        .collect();
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in 0..t {
        for f in &inv_freq {
            // Same rounding as PyTorch: the angle is an f32 product, then cos/sin in f32.
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, half), device)?,
        Tensor::from_vec(sin, (t, half), device)?,
    ))
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Inference => candle_nn::ops::rms_norm(x, w, eps as f32)?,
        Mode::Differentiable => candle_nn::ops::rms_norm_slow(x, w, eps as f32)?,
    })
}

/// `x @ w^T` for `x: [..., in]`, `w: [out, in]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(w.dim(0)?);
    Ok(y.reshape(out_dims)?)
}

/// One decoder layer: `x + attn(norm(x))`, then `h + mlp(norm(h))`. `x: [B, T, hidden]`.
pub fn decoder_layer(
    x: &Tensor,
    w: &LayerWeights,
    l: &LayerSpec,
    batch: &Batch,
    eps: f64,
    mode: Mode,
) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (nh, nkv, hd) = (l.num_attention_heads, l.num_key_value_heads, l.head_dim);
    let rep = nh / nkv;
    let xn = rms_norm(x, &w.input_layernorm, eps, mode)?;
    let q = linear(&xn, &w.q_proj)?.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
    let k = linear(&xn, &w.k_proj)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let v = linear(&xn, &w.v_proj)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let (cos, sin) = batch.rotary(hd)?;
    let (cos, sin) = (cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?);
    let (q, k) = match mode {
        Mode::Inference => (
            candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
            candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
        ),
        Mode::Differentiable => (
            candle_nn::rotary_emb::rope_slow(&q, &cos, &sin)?,
            candle_nn::rotary_emb::rope_slow(&k, &cos, &sin)?,
        ),
    };
    // Grouped-query attention without copying K/V: the `rep` query heads that share a KV head are adjacent, so
    // q [B, nh, T, hd] is viewed as [B, nkv, rep*T, hd] and multiplied by that head's K directly.
    let q = (q.reshape((b, nkv, rep * t, hd))? * (1.0 / (hd as f64).sqrt()))?;
    let scores = q.matmul(&k.t()?)?.reshape((b, nkv, rep, t, t))?;
    let scores = scores.broadcast_add(&batch.mask.narrow(3, 0, t)?.narrow(4, 0, t)?)?;
    let probs = match mode {
        Mode::Inference => candle_nn::ops::softmax_last_dim(&scores)?,
        Mode::Differentiable => candle_nn::ops::softmax(&scores, D::Minus1)?,
    };
    let ctx = probs.reshape((b, nkv, rep * t, t))?.matmul(&v)?;
    let ctx = ctx.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
    let h = (x + linear(&ctx, &w.o_proj)?)?;
    let hn = rms_norm(&h, &w.post_attention_layernorm, eps, mode)?;
    let gate = linear(&hn, &w.gate_proj)?.silu()?;
    let up = linear(&hn, &w.up_proj)?;
    Ok((&h + linear(&(gate * up)?, &w.down_proj)?)?)
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct ForwardOutput {
    /// `[N, vocab]` f32 logits at the requested positions, sequence by sequence in the order given.
    pub logits: Option<Tensor>,
    /// With `hidden_states`: `L + 1` tensors `[B, T, hidden]`: the embeddings, then each layer's output.
    pub hidden: Vec<Tensor>,
    /// With `hidden_states`: the output of the final RMSNorm `[B, T, hidden]` (HF's `hidden_states[-1]`).
    pub final_hidden: Option<Tensor>,
}

impl Model {
    /// Token embeddings `[B, T, hidden]`.
    pub fn embed(&self, batch: &Batch) -> Result<Tensor> {
        let (b, t) = batch.ids.dims2()?;
        let flat = batch.ids.flatten_all()?;
        Ok(self.weights.embed_tokens.index_select(&flat, 0)?.reshape((b, t, self.spec.hidden_size))?)
    }

    /// Runs layers `range` of this model on `x`.
    pub fn run_layers(
        &self,
        mut x: Tensor,
        range: std::ops::Range<usize>,
        batch: &Batch,
        mode: Mode,
    ) -> Result<Tensor> {
        for i in range {
            x = decoder_layer(&x, &self.weights.layers[i], &self.spec.layers[i], batch, self.spec.rms_norm_eps, mode)?;
        }
        Ok(x)
    }

    pub fn final_norm(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        rms_norm(x, &self.weights.norm, self.spec.rms_norm_eps, mode)
    }

    /// Logits `[N, vocab]` at `positions[s]` of each sequence `s`, from final-norm outputs `[B, T, hidden]`.
    /// Only these rows go through the LM head (most of the cost of a small model's forward pass).
    pub fn logits_at(&self, final_hidden: &Tensor, batch: &Batch, positions: &[Vec<usize>]) -> Result<Tensor> {
        let (b, t, h) = final_hidden.dims3()?;
        if positions.len() != b {
            return Err(ModelError::InvalidArgument(format!(
                "{} position lists for a batch of {b}",
                positions.len()
            )));
        }
        let mut rows = Vec::new();
        for (s, ps) in positions.iter().enumerate() {
            for &p in ps {
                if p >= batch.lengths[s] {
                    return Err(ModelError::InvalidArgument(format!(
                        "logit position {p} is past the end of sequence {s} (length {})",
                        batch.lengths[s]
                    )));
                }
                rows.push((s * t + p) as u32);
            }
        }
        let idx = Tensor::from_vec(rows.clone(), rows.len(), final_hidden.device())?;
        let picked = final_hidden.reshape((b * t, h))?.index_select(&idx, 0)?;
        Ok(picked.matmul(&self.weights.lm_head().t()?)?)
    }

    /// Full forward pass. `positions[s]` lists where logits are wanted in sequence `s` (empty lists: no logits).
    pub fn forward(
        &self,
        sequences: &[Vec<u32>],
        positions: &[Vec<usize>],
        hidden_states: bool,
        mode: Mode,
    ) -> Result<ForwardOutput> {
        let batch = Batch::new(&self.spec, sequences, &self.device)?;
        let mut x = self.embed(&batch)?;
        let mut hidden = Vec::new();
        if hidden_states {
            hidden.push(x.clone());
        }
        for i in 0..self.spec.num_layers() {
            x = self.run_layers(x, i..i + 1, &batch, mode)?;
            if hidden_states {
                hidden.push(x.clone());
            }
        }
        let fin = self.final_norm(&x, mode)?;
        let logits = if positions.iter().any(|p| !p.is_empty()) {
            Some(self.logits_at(&fin, &batch, positions)?)
        } else {
            None
        };
        Ok(ForwardOutput {
            logits,
            hidden,
            final_hidden: hidden_states.then_some(fin),
        })
    }

    /// Logits at every real position of one sequence, `[len, vocab]`.
    pub fn logits_all(&self, ids: &[u32]) -> Result<Tensor> {
        let pos: Vec<usize> = (0..ids.len()).collect();
        let out = self.forward(&[ids.to_vec()], &[pos], false, Mode::Inference)?;
        out.logits.ok_or_else(|| ModelError::InvalidArgument("empty sequence".into()))
    }
}

