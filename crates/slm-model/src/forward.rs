//! The Llama forward pass over a batch of right-padded sequences.
//!
//! Per-layer shapes come from [`LayerSpec`], so a model whose layers differ in width runs as is. The pieces
//! (`Batch::new`, [`Model::embed`], [`decoder_layer`], [`Model::final_norm`], [`Model::logits_at`]) are public so
//! that pruning methods can run a sub-range of layers (e.g. from a cached hidden state upward).
//!
//! Gradients: candle's fused ops (`rms_norm`, `rope`, `softmax_last_dim`) detach their outputs. With
//! [`Mode::Differentiable`] differentiable kernels are used instead ([`crate::fused`]: one pass forward, one
//! backward, checked against candle's slow twins); they compute the same values up to rounding.

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

/// A prepared batch: padded ids, lengths, the attention mask and the rotary tables.
pub struct Batch {
    /// `[B, T]` u32 token ids, right-padded.
    pub ids: Tensor,
    pub lengths: Vec<usize>,
    pub seq_len: usize,
    /// `[B, 1, 1, T, T]` additive mask (0 or -inf), broadcast over KV heads and query groups.
    pub mask: Tensor,
    /// cos/sin per distinct head_dim (usually one): `[T, head_dim/2]` when every sequence sits at positions
    /// `0..T`, `[B, T, head_dim/2]` for packed sequences.
    rotary: Vec<(usize, Tensor, Tensor)>,
}

/// One shared prefix followed by branches, packed into one sequence: the prefix once, then each branch. A branch
/// token attends to the prefix and to the earlier tokens of its own branch, and its position continues from the
/// end of the prefix, so every branch is computed exactly as if it followed the prefix alone. Scoring several
/// continuations of one context this way runs the context once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedSequence {
    pub prefix: Vec<u32>,
    pub branches: Vec<Vec<u32>>,
}

impl PackedSequence {
    /// Tokens in the packed layout.
    pub fn len(&self) -> usize {
        self.prefix.len() + self.branches.iter().map(Vec::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Index, in the packed layout, of token `k` of the sequence `prefix ++ branches[b]` (`k` counts prefix
    /// tokens too, so `k < prefix.len()` is a prefix token).
    pub fn index_of(&self, b: usize, k: usize) -> usize {
        if k < self.prefix.len() {
            return k;
        }
        self.prefix.len() + self.branches[..b].iter().map(Vec::len).sum::<usize>() + (k - self.prefix.len())
    }

    /// Ids, rotary positions and the segment of each packed token (0: prefix, b + 1: branch b).
    fn layout(&self) -> (Vec<u32>, Vec<usize>, Vec<usize>) {
        let mut ids = self.prefix.clone();
        let mut pos: Vec<usize> = (0..self.prefix.len()).collect();
        let mut seg = vec![0; self.prefix.len()];
        for (b, br) in self.branches.iter().enumerate() {
            ids.extend_from_slice(br);
            pos.extend(self.prefix.len()..self.prefix.len() + br.len());
            seg.extend(std::iter::repeat_n(b + 1, br.len()));
        }
        (ids, pos, seg)
    }
}

impl Batch {
    /// Pads `sequences` on the right and builds the causal + padding mask and rotary tables for every head_dim in
    /// `spec`.
    pub fn new(spec: &ModelSpec, sequences: &[Vec<u32>], device: &Device) -> Result<Self> {
        let layouts: Vec<(Vec<u32>, Vec<usize>, Vec<usize>)> =
            sequences.iter().map(|s| (s.clone(), (0..s.len()).collect(), vec![0; s.len()])).collect();
        Self::build(spec, layouts, false, device)
    }

    /// Packs each [`PackedSequence`] (see there) and pads on the right.
    pub fn packed(spec: &ModelSpec, sequences: &[PackedSequence], device: &Device) -> Result<Self> {
        let layouts = sequences.iter().map(PackedSequence::layout).collect();
        Self::build(spec, layouts, true, device)
    }

    /// `layouts[s] = (ids, rotary positions, segments)`: token i attends to token j iff `j <= i` and j is in the
    /// prefix (segment 0) or in i's segment.
    fn build(
        spec: &ModelSpec,
        layouts: Vec<(Vec<u32>, Vec<usize>, Vec<usize>)>,
        per_sequence_positions: bool,
        device: &Device,
    ) -> Result<Self> {
        if layouts.is_empty() || layouts.iter().any(|(ids, _, _)| ids.is_empty()) {
            return Err(ModelError::InvalidArgument("forward needs at least one non-empty sequence".into()));
        }
        let lengths: Vec<usize> = layouts.iter().map(|(ids, _, _)| ids.len()).collect();
        let t = *lengths.iter().max().unwrap_or(&1);
        let max_pos = layouts.iter().flat_map(|(_, p, _)| p.iter().copied()).max().unwrap_or(0);
        if max_pos >= spec.max_position_embeddings {
            return Err(ModelError::InvalidArgument(format!(
                "sequence of {} tokens is longer than the model's max_position_embeddings {}",
                max_pos + 1,
                spec.max_position_embeddings
            )));
        }
        if let Some(bad) = layouts.iter().flat_map(|(ids, _, _)| ids).find(|&&id| id as usize >= spec.vocab_size) {
            return Err(ModelError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary ({})",
                spec.vocab_size
            )));
        }
        let b = layouts.len();
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![f32::NEG_INFINITY; b * t * t];
        for (s, (seq, _, seg)) in layouts.iter().enumerate() {
            ids[s * t..s * t + seq.len()].copy_from_slice(seq);
            // Padded queries (i >= len) see every real key of the prefix, so no row is fully masked; their
            // outputs are never read.
            for i in 0..t {
                let own = seg.get(i).copied().unwrap_or(0);
                let row = &mut mask[(s * t + i) * t..(s * t + i + 1) * t];
                for (j, m) in row.iter_mut().enumerate().take(seq.len()) {
                    if j <= i && (seg[j] == 0 || seg[j] == own) {
                        *m = 0.0;
                    }
                }
            }
        }
        let ids = Tensor::from_vec(ids, (b, t), device)?;
        let mask = Tensor::from_vec(mask, (b, 1, 1, t, t), device)?;
        let mut rotary: Vec<(usize, Tensor, Tensor)> = Vec::new();
        for l in &spec.layers {
            if rotary.iter().any(|(d, _, _)| *d == l.head_dim) {
                continue;
            }
            let half = l.head_dim / 2;
            let (cos, sin) = rotary_tables(l.head_dim, t.max(max_pos + 1), spec.rope_theta);
            let (cos, sin) = if per_sequence_positions {
                let gather = |table: &[f32]| {
                    let mut out = vec![0f32; b * t * half];
                    for (s, (_, pos, _)) in layouts.iter().enumerate() {
                        for (i, &p) in pos.iter().enumerate() {
                            out[(s * t + i) * half..(s * t + i + 1) * half]
                                .copy_from_slice(&table[p * half..(p + 1) * half]);
                        }
                    }
                    Tensor::from_vec(out, (b, t, half), device)
                };
                (gather(&cos)?, gather(&sin)?)
            } else {
                let n = cos.len() / half;
                (Tensor::from_vec(cos, (n, half), device)?, Tensor::from_vec(sin, (n, half), device)?)
            };
            rotary.push((l.head_dim, cos, sin));
        }
        Ok(Batch { ids, lengths, seq_len: t, mask, rotary })
    }

    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// cos/sin for the batch's `t` positions: `[t, hd/2]` or `[B, t, hd/2]`.
    fn rotary(&self, head_dim: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let (_, cos, sin) = self
            .rotary
            .iter()
            .find(|(d, _, _)| *d == head_dim)
            .ok_or_else(|| ModelError::InvalidArgument(format!("no rotary table for head_dim {head_dim}")))?;
        Ok(match cos.rank() {
            2 => (cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?),
            _ => (cos.narrow(1, 0, t)?.contiguous()?, sin.narrow(1, 0, t)?.contiguous()?),
        })
    }
}

/// cos/sin tables (row-major `[T, head_dim/2]`) for HF's (non-interleaved, rotate-half) rotary embedding.
pub(crate) fn rotary_tables(head_dim: usize, t: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half).map(|k| (1.0 / theta.powf(2.0 * k as f64 / head_dim as f64)) as f32).collect();
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
    (cos, sin)
}

/// Differentiable rotary embedding (rotate-half) for `x: [B, H, T, hd]` and cos/sin `[T, hd/2]` or
/// `[B, T, hd/2]`.
fn rope_differentiable(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cos.rank() == 2 {
        return Ok(crate::fused::rope(x, cos, sin)?);
    }
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let half = x.dim(D::Minus1)? / 2;
    let rotated = Tensor::cat(&[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Inference => candle_nn::ops::rms_norm(x, w, eps as f32)?,
        Mode::Differentiable => crate::fused::rms_norm(x, w, eps as f32)?,
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

/// A hook on the seven projections of every decoder layer (LoRA adapters, for instance): it computes the output
/// of projection `name` (one of [`crate::PROJECTIONS`]) of layer `layer` from its input `x: [..., in]` and frozen
/// weight `w: [out, in]`. [`NoAdapter`] is the plain `x @ w^T` ([`linear`]).
pub trait LayerAdapter {
    fn project(&self, layer: usize, name: &'static str, x: &Tensor, w: &Tensor) -> Result<Tensor>;
}

/// The identity hook: every projection is exactly [`linear`], so the `_adapted` functions with it are the plain
/// ones, op for op.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAdapter;

impl LayerAdapter for NoAdapter {
    #[inline]
    fn project(&self, _layer: usize, _name: &'static str, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        linear(x, w)
    }
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
    decoder_layer_adapted(x, w, l, batch, eps, mode, 0, &NoAdapter)
}

/// [`decoder_layer`] with every projection going through `adapter` (as layer `index`).
#[allow(clippy::too_many_arguments)]
pub fn decoder_layer_adapted<A: LayerAdapter + ?Sized>(
    x: &Tensor,
    w: &LayerWeights,
    l: &LayerSpec,
    batch: &Batch,
    eps: f64,
    mode: Mode,
    index: usize,
    adapter: &A,
) -> Result<Tensor> {
    let h = attention_block_adapted(x, w, l, batch, eps, mode, index, adapter)?;
    let a = mlp_activations_adapted(&h, w, eps, mode, index, adapter)?;
    Ok((&h + adapter.project(index, "down_proj", &a, &w.down_proj)?)?)
}

/// The attention half of a decoder layer: `x + o_proj(attn(input_layernorm(x)))`.
pub fn attention_block(
    x: &Tensor,
    w: &LayerWeights,
    l: &LayerSpec,
    batch: &Batch,
    eps: f64,
    mode: Mode,
) -> Result<Tensor> {
    attention_block_adapted(x, w, l, batch, eps, mode, 0, &NoAdapter)
}

/// [`attention_block`] with q/k/v/o going through `adapter` (as layer `index`).
#[allow(clippy::too_many_arguments)]
pub fn attention_block_adapted<A: LayerAdapter + ?Sized>(
    x: &Tensor,
    w: &LayerWeights,
    l: &LayerSpec,
    batch: &Batch,
    eps: f64,
    mode: Mode,
    index: usize,
    adapter: &A,
) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (nh, nkv, hd) = (l.num_attention_heads, l.num_key_value_heads, l.head_dim);
    let xn = rms_norm(x, &w.input_layernorm, eps, mode)?;
    let q = adapter.project(index, "q_proj", &xn, &w.q_proj)?.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
    let k =
        adapter.project(index, "k_proj", &xn, &w.k_proj)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let v =
        adapter.project(index, "v_proj", &xn, &w.v_proj)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let (cos, sin) = batch.rotary(hd, t)?;
    let (q, k) = match mode {
        Mode::Inference => (candle_nn::rotary_emb::rope(&q, &cos, &sin)?, candle_nn::rotary_emb::rope(&k, &cos, &sin)?),
        Mode::Differentiable => (rope_differentiable(&q, &cos, &sin)?, rope_differentiable(&k, &cos, &sin)?),
    };
    let mask = batch.mask.narrow(3, 0, t)?.narrow(4, 0, t)?;
    let ctx = grouped_attention(&q, &k, &v, Some(&mask), mode)?;
    Ok((x + adapter.project(index, "o_proj", &ctx, &w.o_proj)?)?)
}

/// Scaled dot-product attention with grouped queries, without copying K/V: the `rep` query heads that share a KV
/// head are adjacent, so q `[B, nh, T, hd]` is viewed as `[B, nkv, rep*T, hd]` and multiplied by that head's K
/// directly. k, v: `[B, nkv, S, hd]`; `mask`: additive, broadcast to `[B, nkv, rep, T, S]`. Returns the context
/// `[B, T, nh*hd]` (the input of o_proj). Shared by the batched forward pass and KV-cached generation.
pub(crate) fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    mode: Mode,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let rep = nh / nkv;
    let q = (q.reshape((b, nkv, rep * t, hd))? * (1.0 / (hd as f64).sqrt()))?;
    let mut scores = q.matmul(&k.t()?)?.reshape((b, nkv, rep, t, s))?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let probs = match mode {
        Mode::Inference => candle_nn::ops::softmax_last_dim(&scores)?,
        Mode::Differentiable => crate::fused::softmax_last_dim(&scores)?,
    };
    let ctx = probs.reshape((b, nkv, rep * t, s))?.matmul(v)?;
    Ok(ctx.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?)
}

/// The MLP's hidden activations `silu(gate(n)) * up(n)`, `n = post_attention_layernorm(h)`: the input of
/// `down_proj`, `[B, T, intermediate]`.
pub fn mlp_activations(h: &Tensor, w: &LayerWeights, eps: f64, mode: Mode) -> Result<Tensor> {
    mlp_activations_adapted(h, w, eps, mode, 0, &NoAdapter)
}

/// [`mlp_activations`] with gate/up going through `adapter` (as layer `index`).
pub fn mlp_activations_adapted<A: LayerAdapter + ?Sized>(
    h: &Tensor,
    w: &LayerWeights,
    eps: f64,
    mode: Mode,
    index: usize,
    adapter: &A,
) -> Result<Tensor> {
    let hn = rms_norm(h, &w.post_attention_layernorm, eps, mode)?;
    let gate = adapter.project(index, "gate_proj", &hn, &w.gate_proj)?;
    let up = adapter.project(index, "up_proj", &hn, &w.up_proj)?;
    Ok(match mode {
        Mode::Inference => (gate.silu()? * up)?,
        Mode::Differentiable => crate::fused::swiglu(&gate, &up)?,
    })
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
    pub fn run_layers(&self, x: Tensor, range: std::ops::Range<usize>, batch: &Batch, mode: Mode) -> Result<Tensor> {
        self.run_layers_adapted(x, range, batch, mode, &NoAdapter)
    }

    /// [`Model::run_layers`] with every projection going through `adapter`.
    pub fn run_layers_adapted<A: LayerAdapter + ?Sized>(
        &self,
        mut x: Tensor,
        range: std::ops::Range<usize>,
        batch: &Batch,
        mode: Mode,
        adapter: &A,
    ) -> Result<Tensor> {
        for i in range {
            let (w, l) = (&self.weights.layers[i], &self.spec.layers[i]);
            x = decoder_layer_adapted(&x, w, l, batch, self.spec.rms_norm_eps, mode, i, adapter)?;
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
            return Err(ModelError::InvalidArgument(format!("{} position lists for a batch of {b}", positions.len())));
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
        self.forward_batch(&batch, positions, hidden_states, mode)
    }

    /// [`Model::forward`] on a prepared batch (e.g. [`Batch::packed`]); `positions` index the batch's layout.
    pub fn forward_batch(
        &self,
        batch: &Batch,
        positions: &[Vec<usize>],
        hidden_states: bool,
        mode: Mode,
    ) -> Result<ForwardOutput> {
        self.forward_batch_adapted(batch, positions, hidden_states, mode, &NoAdapter)
    }

    /// [`Model::forward_batch`] with every projection going through `adapter`.
    pub fn forward_batch_adapted<A: LayerAdapter + ?Sized>(
        &self,
        batch: &Batch,
        positions: &[Vec<usize>],
        hidden_states: bool,
        mode: Mode,
        adapter: &A,
    ) -> Result<ForwardOutput> {
        let mut x = self.embed(batch)?;
        let mut hidden = Vec::new();
        if hidden_states {
            hidden.push(x.clone());
        }
        for i in 0..self.spec.num_layers() {
            x = self.run_layers_adapted(x, i..i + 1, batch, mode, adapter)?;
            if hidden_states {
                hidden.push(x.clone());
            }
        }
        let fin = self.final_norm(&x, mode)?;
        let logits =
            if positions.iter().any(|p| !p.is_empty()) { Some(self.logits_at(&fin, batch, positions)?) } else { None };
        Ok(ForwardOutput { logits, hidden, final_hidden: hidden_states.then_some(fin) })
    }

    /// Logits at every real position of one sequence, `[len, vocab]`.
    pub fn logits_all(&self, ids: &[u32]) -> Result<Tensor> {
        let pos: Vec<usize> = (0..ids.len()).collect();
        let out = self.forward(&[ids.to_vec()], &[pos], false, Mode::Inference)?;
        out.logits.ok_or_else(|| ModelError::InvalidArgument("empty sequence".into()))
    }
}
