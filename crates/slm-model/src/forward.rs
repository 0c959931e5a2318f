//! The decoder forward pass over a batch of right-padded sequences, for every supported family.
//!
//! Per-layer shapes come from [`LayerSpec`], so a model whose layers differ in width runs as is; the family's
//! features (rotary variants, norms, biases, q/k norms, sandwich norms, GeGLU, sliding windows) come from
//! [`Arch`]. One layer function ([`layer`]) serves the batched pass, LoRA training (through a
//! [`LayerAdapter`]) and KV-cached generation (through [`Attend::cache`]); a [`LayerCtx`] carries what it needs
//! besides the input and the weights. The pieces (`Batch::new`, [`Model::embed`], [`decoder_layer`],
//! [`Model::final_norm`], [`Model::logits_at`]) are public so that pruning methods can run a sub-range of layers
//! (e.g. from a cached hidden state upward).
//!
//! Gradients: candle's fused ops (`rms_norm`, `rope`, `softmax_last_dim`) detach their outputs. With
//! [`Mode::Differentiable`] differentiable kernels are used instead ([`crate::fused`]: one pass forward, one
//! backward, checked against candle's slow twins); they compute the same values up to rounding.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{ModelError, Result};
use crate::spec::{Activation, Arch, LayerSpec, ModelSpec, Rope};
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
    /// The mask of sliding-window layers (also limited to the window), when the model has any.
    pub sliding_mask: Option<Tensor>,
    /// cos/sin per distinct (head_dim, rotary embedding) (usually one): `[T, head_dim/2]` when every sequence
    /// sits at positions `0..T`, `[B, T, head_dim/2]` for packed sequences.
    rotary: Vec<(usize, Rope, Tensor, Tensor)>,
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
        for (s, (seq, _, _)) in layouts.iter().enumerate() {
            ids[s * t..s * t + seq.len()].copy_from_slice(seq);
        }
        let build_mask = |window: Option<usize>| -> Result<Tensor> {
            let mut mask = vec![f32::NEG_INFINITY; b * t * t];
            for (s, (seq, pos, seg)) in layouts.iter().enumerate() {
                // Padded queries (i >= len) see the first key, so no row is fully masked; their outputs are never
                // read.
                for i in 0..t {
                    let row = &mut mask[(s * t + i) * t..(s * t + i + 1) * t];
                    if i >= seq.len() {
                        row[0] = 0.0;
                        continue;
                    }
                    for (j, m) in row.iter_mut().enumerate().take(i + 1) {
                        let same_segment = seg[j] == 0 || seg[j] == seg[i];
                        // A sliding-window layer sees the query's position and the window - 1 before it.
                        let in_window = window.is_none_or(|w| pos[i] - pos[j] < w);
                        if same_segment && in_window {
                            *m = 0.0;
                        }
                    }
                }
            }
            Ok(Tensor::from_vec(mask, (b, 1, 1, t, t), device)?)
        };
        let mask = build_mask(None)?;
        let sliding_mask = spec.sliding_window_in_use().map(|w| build_mask(Some(w))).transpose()?;
        let ids = Tensor::from_vec(ids, (b, t), device)?;
        let mut rotary: Vec<(usize, Rope, Tensor, Tensor)> = Vec::new();
        for (head_dim, rope) in rotary_kinds(spec) {
            let half = head_dim / 2;
            let (cos, sin) = rotary_tables(head_dim, t.max(max_pos + 1), &rope);
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
            rotary.push((head_dim, rope, cos, sin));
        }
        Ok(Batch { ids, lengths, seq_len: t, mask, sliding_mask, rotary })
    }

    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// What attention needs for a layer of shape `l` on the batch's first `t` positions: cos/sin (`[t, hd/2]`
    /// or `[B, t, hd/2]`) of its rotary embedding and its mask (`[B, 1, 1, t, t]`, sliding or global).
    pub fn attend(&self, l: &LayerSpec, arch: &Arch, t: usize) -> Result<Attend<'static>> {
        let (cos, sin) = rotary_of(&self.rotary, l, arch).ok_or_else(|| {
            ModelError::InvalidArgument(format!("no rotary table for head_dim {} of this batch", l.head_dim))
        })?;
        let (cos, sin) = match cos.rank() {
            2 => (cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?),
            _ => (cos.narrow(1, 0, t)?.contiguous()?, sin.narrow(1, 0, t)?.contiguous()?),
        };
        let mask = match (&self.sliding_mask, l.sliding) {
            (Some(m), true) => m,
            (None, true) => {
                return Err(ModelError::InvalidArgument(
                    "a sliding-window layer on a batch built for a model without one".into(),
                ))
            }
            _ => &self.mask,
        };
        let mask = mask.narrow(3, 0, t)?.narrow(4, 0, t)?;
        Ok(Attend { cos, sin, mask: Some(mask), cache: None })
    }
}

/// Where one layer's attention takes its rotary tables, mask and (in generation) cached keys and values from.
pub struct Attend<'a> {
    /// cos/sin of the queries' positions, `[t, hd/2]` or `[B, t, hd/2]`.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Additive mask broadcast to `[B, nkv, rep, t, s]` (`s`: keys, cache included); None: every key visible.
    pub mask: Option<Tensor>,
    /// The layer's KV cache: the new keys and values (after rotary) are appended, attention reads all of it.
    pub cache: Option<&'a mut KvCache>,
}

/// One layer's cached keys and values, `[1, nkv, s, hd]` each.
#[derive(Debug, Default)]
pub struct KvCache {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

/// The distinct rotary embeddings of a model's layers, `(head_dim, rope)` in layer order: one cos/sin table each.
pub(crate) fn rotary_kinds(spec: &ModelSpec) -> Vec<(usize, Rope)> {
    let mut kinds = Vec::new();
    for l in &spec.layers {
        let kind = (l.head_dim, spec.arch.rope_of(l.sliding));
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    kinds
}

/// The cos/sin of layer `l` among tables built for [`rotary_kinds`].
pub(crate) fn rotary_of<'t>(
    tables: &'t [(usize, Rope, Tensor, Tensor)],
    l: &LayerSpec,
    arch: &Arch,
) -> Option<(&'t Tensor, &'t Tensor)> {
    let rope = arch.rope_of(l.sliding);
    tables.iter().find(|(d, r, _, _)| *d == l.head_dim && *r == rope).map(|(_, _, c, s)| (c, s))
}

/// cos/sin tables (row-major `[T, head_dim/2]`) for HF's (non-interleaved, rotate-half) rotary embedding.
pub(crate) fn rotary_tables(head_dim: usize, t: usize, rope: &Rope) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq = rope.inv_freq(head_dim);
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

/// `x @ w^T` for `x: [..., in]`, `w: [out, in]` (in any stored dtype; computed in `x`'s). A weight kept in its
/// stored dtype (bf16, f16) is upcast only while it is used; `to_dtype` hands back the same tensor, no copy, when
/// the dtypes already match.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = &w.to_dtype(x.dtype())?;
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
/// weight `w: [out, in]`. [`NoAdapter`] is the plain `x @ w^T` ([`linear`]). Biases are added after the hook.
pub trait LayerAdapter {
    fn project(&self, layer: usize, name: &'static str, x: &Tensor, w: &Tensor) -> Result<Tensor>;
}

/// The identity hook: every projection is exactly [`linear`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAdapter;

impl LayerAdapter for NoAdapter {
    #[inline]
    fn project(&self, _layer: usize, _name: &'static str, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        linear(x, w)
    }
}

/// What a decoder layer needs besides its input, its weights and its attention source.
#[derive(Clone, Copy)]
pub struct LayerCtx<'a> {
    pub arch: &'a Arch,
    pub eps: f64,
    pub mode: Mode,
    /// The layer's index as the adapter knows it.
    pub index: usize,
    pub adapter: &'a dyn LayerAdapter,
}

impl<'a> LayerCtx<'a> {
    /// Layer 0 of `spec`'s architecture, no adapter.
    pub fn new(spec: &'a ModelSpec, mode: Mode) -> Self {
        LayerCtx { arch: &spec.arch, eps: spec.rms_norm_eps, mode, index: 0, adapter: &NoAdapter }
    }

    /// The same context for layer `index`.
    pub fn at(self, index: usize) -> Self {
        LayerCtx { index, ..self }
    }

    /// The same context with every projection going through `adapter`.
    pub fn with_adapter(self, adapter: &'a dyn LayerAdapter) -> Self {
        LayerCtx { adapter, ..self }
    }

    /// RMSNorm with the architecture's convention (`w`, or Gemma's `1 + w`).
    pub fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let w = w.to_dtype(x.dtype())?;
        if self.arch.norm_plus_one {
            rms_norm(x, &(w + 1.0)?, self.eps, self.mode)
        } else {
            rms_norm(x, &w, self.eps, self.mode)
        }
    }

    fn project(&self, name: &'static str, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let y = self.adapter.project(self.index, name, x, w)?;
        Ok(match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }

    /// The residual sum `x + y`: on every core in inference (candle's add runs on one), the tracked add otherwise.
    fn residual(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(match self.mode {
            Mode::Inference => crate::fused::add(x, y)?,
            Mode::Differentiable => (x + y)?,
        })
    }

    fn norm_opt(&self, x: Tensor, w: Option<&Tensor>) -> Result<Tensor> {
        match w {
            Some(w) => self.norm(&x, w),
            None => Ok(x),
        }
    }
}

/// One decoder layer: `x + attn(norm(x))`, then `h + mlp(norm(h))` (with Gemma-3's norms of each branch's output
/// before its residual add). `x: [B, T, hidden]`. The one layer function: the batched pass, the `_adapted` paths
/// and KV-cached generation all come here.
pub fn layer(x: &Tensor, w: &LayerWeights, l: &LayerSpec, ctx: &LayerCtx, att: &mut Attend) -> Result<Tensor> {
    let h = attention(x, w, l, ctx, att)?;
    let a = mlp_activations(&h, w, ctx)?;
    let y = ctx.project("down_proj", &a, &w.down_proj, None)?;
    ctx.residual(&h, &ctx.norm_opt(y, w.mlp_out_norm.as_ref())?)
}

/// The attention half of a layer: `x + [out_norm](o_proj(attn(input_layernorm(x))))`.
pub fn attention(x: &Tensor, w: &LayerWeights, l: &LayerSpec, ctx: &LayerCtx, att: &mut Attend) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (nh, nkv, hd) = (l.num_attention_heads, l.num_key_value_heads, l.head_dim);
    let xn = ctx.norm(x, &w.input_layernorm)?;
    let heads = |name: &'static str, wt: &Tensor, bias: Option<&Tensor>, qk_norm: Option<&Tensor>, n: usize| {
        let y = ctx.project(name, &xn, wt, bias)?.reshape((b, t, n, hd))?;
        Ok::<Tensor, ModelError>(ctx.norm_opt(y, qk_norm)?.transpose(1, 2)?.contiguous()?)
    };
    let q = heads("q_proj", &w.q_proj, w.q_bias.as_ref(), w.q_norm.as_ref(), nh)?;
    let k = heads("k_proj", &w.k_proj, w.k_bias.as_ref(), w.k_norm.as_ref(), nkv)?;
    let v = heads("v_proj", &w.v_proj, w.v_bias.as_ref(), None, nkv)?;
    // The rotary tables are f32; a narrower compute dtype (`--compute-dtype bf16`) takes them in its own.
    let (cos, sin) = (att.cos.to_dtype(q.dtype())?, att.sin.to_dtype(q.dtype())?);
    let (q, k) = match ctx.mode {
        Mode::Inference => (candle_nn::rotary_emb::rope(&q, &cos, &sin)?, candle_nn::rotary_emb::rope(&k, &cos, &sin)?),
        Mode::Differentiable => (rope_differentiable(&q, &cos, &sin)?, rope_differentiable(&k, &cos, &sin)?),
    };
    let (k, v) = match att.cache.as_deref_mut() {
        Some(cache) => {
            let cat = |old: Option<Tensor>, new: Tensor| -> Result<Tensor> {
                Ok(match old {
                    Some(old) => Tensor::cat(&[&old, &new], 2)?,
                    None => new,
                })
            };
            let (k, v) = (cat(cache.k.take(), k)?, cat(cache.v.take(), v)?);
            cache.k = Some(k.clone());
            cache.v = Some(v.clone());
            (k, v)
        }
        None => (k, v),
    };
    let ctx_out = grouped_attention(&q, &k, &v, att.mask.as_ref(), ctx.arch.attn_scale(hd), ctx.mode)?;
    let o = ctx.project("o_proj", &ctx_out, &w.o_proj, None)?;
    ctx.residual(x, &ctx.norm_opt(o, w.attn_out_norm.as_ref())?)
}

/// [`layer`] on a prepared batch.
pub fn decoder_layer(x: &Tensor, w: &LayerWeights, l: &LayerSpec, batch: &Batch, ctx: &LayerCtx) -> Result<Tensor> {
    let mut att = batch.attend(l, ctx.arch, x.dim(1)?)?;
    layer(x, w, l, ctx, &mut att)
}

/// [`attention`] on a prepared batch.
pub fn attention_block(x: &Tensor, w: &LayerWeights, l: &LayerSpec, batch: &Batch, ctx: &LayerCtx) -> Result<Tensor> {
    let mut att = batch.attend(l, ctx.arch, x.dim(1)?)?;
    attention(x, w, l, ctx, &mut att)
}

/// Scaled dot-product attention with grouped queries, without copying K/V: the `rep` query heads that share a KV
/// head are adjacent, so q `[B, nh, T, hd]` is viewed as `[B, nkv, rep*T, hd]` and multiplied by that head's K
/// directly. k, v: `[B, nkv, S, hd]`; `mask`: additive, broadcast to `[B, nkv, rep, T, S]`. Returns the context
/// `[B, T, nh*hd]` (the input of o_proj).
pub(crate) fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    mode: Mode,
) -> Result<Tensor> {
    if let (Mode::Differentiable, Some(m)) = (mode, mask) {
        if let Some(ctx) = crate::fused::attention(q, k, v, m, scale)? {
            return Ok(ctx);
        }
    }
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let rep = nh / nkv;
    let q = (q.reshape((b, nkv, rep * t, hd))? * scale)?;
    // Scores, mask and softmax in f32 whatever the compute dtype (as transformers' eager attention does for
    // bf16): a bf16 softmax over long rows loses the small probabilities. The probabilities go back to v's dtype.
    let mut scores = q.matmul(&k.t()?)?.reshape((b, nkv, rep, t, s))?.to_dtype(DType::F32)?;
    let probs = match (mode, mask) {
        (Mode::Inference, Some(m)) => crate::fused::masked_softmax_last_dim(&scores, m)?,
        (Mode::Inference, None) => candle_nn::ops::softmax_last_dim(&scores)?,
        (Mode::Differentiable, m) => {
            if let Some(m) = m {
                scores = scores.broadcast_add(m)?;
            }
            crate::fused::softmax_last_dim(&scores)?
        }
    }
    .to_dtype(v.dtype())?;
    let ctx = probs.reshape((b, nkv, rep * t, s))?.matmul(v)?;
    Ok(ctx.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?)
}

/// The MLP's hidden activations `act(gate(n)) * up(n)`, `n` the pre-MLP norm of `h`: the input of `down_proj`,
/// `[B, T, intermediate]`.
pub fn mlp_activations(h: &Tensor, w: &LayerWeights, ctx: &LayerCtx) -> Result<Tensor> {
    let hn = ctx.norm(h, &w.post_attention_layernorm)?;
    let gate = ctx.project("gate_proj", &hn, &w.gate_proj, None)?;
    let up = ctx.project("up_proj", &hn, &w.up_proj, None)?;
    Ok(match (ctx.arch.activation, ctx.mode) {
        // The fused kernel computes candle's `silu(gate) * up` with the same arithmetic, on every core.
        (Activation::Silu, _) => crate::fused::swiglu(&gate, &up)?,
        // candle's `gelu` is the tanh approximation (PyTorch's gelu(approximate="tanh")), differentiable.
        (Activation::GeluTanh, _) => (gate.gelu()? * up)?,
    })
}

/// Vocabulary rows of an LM head upcast at a time by [`Model::head`] (32 MiB of f32 at hidden 1,024).
pub const HEAD_CHUNK: usize = 8192;

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
        self.embed_ids(&batch.ids)
    }

    /// Embeddings of `ids: [B, T]` (scaled by √hidden where the architecture says so, in f32 as transformers).
    pub fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        // Embeddings kept in their stored dtype (bf16, f16) are upcast row by row as they are picked.
        let x = self
            .weights
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(self.compute_dtype())?
            .reshape((b, t, self.spec.hidden_size))?;
        Ok(if self.spec.arch.embed_scale { (x * (self.spec.hidden_size as f32).sqrt() as f64)? } else { x })
    }

    /// The context of layer `index` of this model.
    pub fn layer_ctx<'a>(&'a self, index: usize, mode: Mode, adapter: &'a dyn LayerAdapter) -> LayerCtx<'a> {
        LayerCtx::new(&self.spec, mode).at(index).with_adapter(adapter)
    }

    /// Runs layers `range` of this model on `x`.
    pub fn run_layers(&self, x: Tensor, range: std::ops::Range<usize>, batch: &Batch, mode: Mode) -> Result<Tensor> {
        self.run_layers_adapted(x, range, batch, mode, &NoAdapter)
    }

    /// [`Model::run_layers`] with every projection going through `adapter`.
    pub fn run_layers_adapted(
        &self,
        mut x: Tensor,
        range: std::ops::Range<usize>,
        batch: &Batch,
        mode: Mode,
        adapter: &dyn LayerAdapter,
    ) -> Result<Tensor> {
        for i in range {
            let (w, l) = (self.weights.layer(i)?, &self.spec.layers[i]);
            x = decoder_layer(&x, &w, l, batch, &self.layer_ctx(i, mode, adapter))?;
        }
        Ok(x)
    }

    /// The dtype activations are computed in: that of the final norm (f32 as loaded; [`Weights::to`] changes
    /// it with the rest). Embeddings and LM head kept in a narrower stored dtype are upcast to it while used.
    pub fn compute_dtype(&self) -> candle_core::DType {
        self.weights.norm.dtype()
    }

    /// Sets the dtype activations are computed in (`--compute-dtype`): f32, bf16 or f16. Only the final norm is
    /// converted (it names the compute dtype); every other weight stays in its held dtype and is converted while
    /// used, as a bf16-stored layer is upcast for f32 compute. Attention scores and softmax stay in f32 and the
    /// LM head's logits are f32 whatever the compute dtype ([`Model::head`]).
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(ModelError::InvalidArgument(format!("compute dtype {dtype:?}: f32, bf16 or f16")));
        }
        self.weights.norm = self.weights.norm.to_dtype(dtype)?;
        Ok(())
    }

    /// Logits `[N, vocab]` of final-norm rows `[N, hidden]`. An LM head stored in another dtype than the rows
    /// (bf16 embeddings of a mapped model) is upcast [`HEAD_CHUNK`] vocabulary rows at a time, so no
    /// compute-dtype copy of the whole head is made (1.6 GB in f32 for a 7B with a 49,152-token vocabulary).
    /// Not for a differentiable head: the chunks would be kept for backward ([`Model::head_ce_gradient`]).
    pub fn head(&self, rows: &Tensor) -> Result<Tensor> {
        let head = self.weights.lm_head();
        // Logits are f32 whatever the compute dtype: rows computed in bf16 are upcast first (f32 rows: no copy).
        let rows = &rows.to_dtype(DType::F32)?;
        if head.dtype() == rows.dtype() {
            return Ok(rows.matmul(&head.t()?)?);
        }
        let mut parts = Vec::new();
        self.head_by_vocab_chunk(rows, |_, logits| -> Result<()> {
            parts.push(logits);
            Ok(())
        })?;
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// Streams the f32 logits of `rows: [N, hidden]` by vocabulary chunks: `f(start, logits)` gets the
    /// `[N, len]` logits of vocabulary rows `start..start + len`, in order, [`HEAD_CHUNK`] at a time. Each head
    /// chunk is upcast once for all N rows, so a caller that reduces over the vocabulary (a log-sum-exp, a KL)
    /// on a narrower stored head pays one upcast of the head in all, with `[N, HEAD_CHUNK]` logits held.
    pub fn head_by_vocab_chunk<E: From<ModelError>>(
        &self,
        rows: &Tensor,
        mut f: impl FnMut(usize, Tensor) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let head = self.weights.lm_head();
        let rows = rows.to_dtype(DType::F32).map_err(ModelError::from)?;
        let v = head.dim(0).map_err(ModelError::from)?;
        for s in (0..v).step_by(HEAD_CHUNK) {
            let len = HEAD_CHUNK.min(v - s);
            let chunk = head.narrow(0, s, len).and_then(|h| h.to_dtype(DType::F32));
            f(s, chunk.and_then(|h| rows.matmul(&h.t()?)).map_err(ModelError::from)?)?;
        }
        Ok(())
    }

    /// `scale ×` the mean next-token cross-entropy of final-norm rows `[N, hidden]` against `targets`, and its
    /// gradient with respect to the rows. A head in the rows' dtype goes through candle's autodiff (the kernels
    /// of the whole-graph pass, so the two agree bit for bit); a head stored narrower (bf16) is upcast
    /// [`HEAD_CHUNK`] vocabulary rows at a time and the gradient `scale/N · (softmax − onehot) · H` formed by
    /// hand, the softmax in f64: memory is the `[N, vocab]` logits, never a compute-dtype copy of the head.
    pub fn head_ce_gradient(&self, rows: &Tensor, targets: &[u32], scale: f64) -> Result<(f64, Tensor)> {
        let (n, _) = rows.dims2()?;
        let head = self.weights.lm_head();
        let v = head.dim(0)?;
        if targets.len() != n || n == 0 {
            return Err(ModelError::InvalidArgument(format!("{} targets for {n} rows", targets.len())));
        }
        if rows.dtype() != DType::F32 {
            return Err(ModelError::InvalidArgument(format!(
                "gradients are computed in f32, not {:?} (no --compute-dtype for gradient work)",
                rows.dtype()
            )));
        }
        if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
            return Err(ModelError::InvalidArgument(format!("target token {bad} is outside the vocabulary ({v})")));
        }
        if head.dtype() == rows.dtype() {
            let x = candle_core::Var::from_tensor(rows)?;
            let tgt = Tensor::new(targets, rows.device())?;
            let part = (candle_nn::loss::cross_entropy(&x.as_tensor().matmul(&head.t()?)?, &tgt)? * scale)?;
            let grad = part.backward()?.remove(x.as_tensor());
            let grad = grad.ok_or_else(|| ModelError::InvalidArgument("the LM head gave no gradient".into()))?;
            return Ok((part.to_dtype(DType::F64)?.to_scalar::<f64>()?, grad));
        }
        let mut p = self.head(rows)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (mut loss, w) = (0f64, scale / n as f64);
        for (r, &t) in targets.iter().enumerate() {
            let row = &mut p[r * v..(r + 1) * v];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            let pt = (row[t as usize] as f64 - lse).exp();
            loss += lse - row[t as usize] as f64;
            row.iter_mut().for_each(|x| *x = (w * (*x as f64 - lse).exp()) as f32);
            row[t as usize] = (w * (pt - 1.0)) as f32; // p − 1 in f64: no cancellation in f32
        }
        let p = Tensor::from_vec(p, (n, v), rows.device())?.to_dtype(rows.dtype())?;
        let mut grad = rows.zeros_like()?;
        for s in (0..v).step_by(HEAD_CHUNK) {
            let len = HEAD_CHUNK.min(v - s);
            // A column block of `p` has row stride `v`: cuBLAS takes only tight operands (the CPU gemm any).
            let block = p.narrow(1, s, len)?.contiguous()?;
            grad = (grad + block.matmul(&head.narrow(0, s, len)?.to_dtype(rows.dtype())?)?)?;
        }
        Ok((loss * w, grad))
    }

    pub fn final_norm(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        LayerCtx::new(&self.spec, mode).norm(x, &self.weights.norm)
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
        self.head(&picked)
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
    pub fn forward_batch_adapted(
        &self,
        batch: &Batch,
        positions: &[Vec<usize>],
        hidden_states: bool,
        mode: Mode,
        adapter: &dyn LayerAdapter,
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
