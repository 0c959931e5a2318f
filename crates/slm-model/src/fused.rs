//! Fused CPU kernels with hand-written backward passes for [`crate::Mode::Differentiable`]: RMSNorm, softmax over
//! the last dimension, rotary embedding and SwiGLU. candle's composed slow ops give the same values but build a
//! dozen elementwise nodes each (a fresh buffer per node, and as many again in the backward pass); these run one
//! pass forward and one backward, row-parallel. Gradients reach every input that can carry one (RMSNorm's weight
//! too), so they are drop-in replacements for any gradient user. Off the CPU the composed ops are used.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The contiguous f32 data of a CPU storage (custom ops take f32, contiguous inputs only).
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{op}: only f32 is supported"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// `f` on the contiguous f32 data of a CPU tensor; `None` for any other tensor (another dtype or device, strided).
pub fn with_f32_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => layout.contiguous_offsets().map(|(a, b)| f(&v[a..b])),
        _ => None,
    }
}

/// `dst = scale · op(lhs) · op(rhs)`, or `dst += …` with `accumulate`, for row-major f32 matrices: `op(lhs)` is
/// `[m, k]` (stored `[k, m]` when `lhs_t`), `op(rhs)` is `[k, n]` (stored `[n, k]` when `rhs_t`), `dst` is
/// `[m, n]`. gemm's kernels on candle's threads, as candle's own matmul, but into a buffer the caller owns: no
/// zero-filled output, no copies in and out of tensors, and a sum into an existing result in the same pass.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_t: bool,
    rhs: &[f32],
    rhs_t: bool,
    scale: f32,
) {
    gemm_f32(true, mnk, dst, accumulate, lhs, lhs_t, rhs, rhs_t, scale)
}

/// candle's thread count, read once: without `RAYON_NUM_THREADS` candle counts the physical cores from
/// /proc/cpuinfo on every call, which costs more than a small product.
fn gemm_parallelism() -> gemm::Parallelism {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    match *THREADS.get_or_init(candle_core::utils::get_num_threads) {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// [`sgemm`], on candle's threads (`parallel`) or on the calling thread only (for products that are themselves
/// run in parallel).
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    parallel: bool,
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_t: bool,
    rhs: &[f32],
    rhs_t: bool,
    scale: f32,
) {
    assert!(dst.len() == m * n && lhs.len() == m * k && rhs.len() == k * n, "sgemm: operand sizes");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let par = if parallel { gemm_parallelism() } else { gemm::Parallelism::None };
    // SAFETY: the three slices hold exactly the m×n, m×k and k×n elements (asserted above), and `dst` is
    // borrowed mutably, so it overlaps neither operand.
    unsafe { gemm_raw((m, n, k), dst.as_mut_ptr(), accumulate, lhs, lhs_t, rhs, rhs_t, scale, par) }
}

/// gemm's `dst = [dst +] scale · op(lhs) · op(rhs)` on row-major operands (the layouts of [`sgemm`]).
///
/// # Safety
/// `dst` must be valid for writes of m×n f32 (and for reads with `accumulate`), not overlapping `lhs` or `rhs`,
/// which hold m×k and k×n elements; k ≥ 1.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    accumulate: bool,
    lhs: &[f32],
    lhs_t: bool,
    rhs: &[f32],
    rhs_t: bool,
    scale: f32,
    par: gemm::Parallelism,
) {
    let (lhs_cs, lhs_rs) = if lhs_t { (m as isize, 1) } else { (1, k as isize) };
    let (rhs_cs, rhs_rs) = if rhs_t { (k as isize, 1) } else { (1, n as isize) };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        accumulate,
        lhs.as_ptr(),
        lhs_cs,
        lhs_rs,
        rhs.as_ptr(),
        rhs_cs,
        rhs_rs,
        if accumulate { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        par,
    )
}

/// The f32 data of a CPU tensor, borrowed where it is contiguous (no copy), else copied.
struct Data<G> {
    guard: Option<G>,
    range: (usize, usize),
    owned: Vec<f32>,
}

impl<G: std::ops::Deref<Target = candle_core::Storage>> std::ops::Deref for Data<G> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self.guard.as_deref() {
            Some(candle_core::Storage::Cpu(CpuStorage::F32(v))) => &v[self.range.0..self.range.1],
            _ => &self.owned,
        }
    }
}

/// [`Data`] of `t`: what the backward passes read their inputs and incoming gradients through.
pub fn f32_data(t: &Tensor) -> candle_core::Result<impl std::ops::Deref<Target = [f32]> + '_> {
    let (guard, layout) = t.storage_and_layout();
    if let (candle_core::Storage::Cpu(CpuStorage::F32(_)), Some(range)) = (&*guard, layout.contiguous_offsets()) {
        return Ok(Data { guard: Some(guard), range, owned: Vec::new() });
    }
    drop(guard);
    Ok(Data { guard: None, range: (0, 0), owned: vec_of(t)? })
}

/// A fresh `[m, n]` buffer holding `scale · op(lhs) · op(rhs)` ([`sgemm`]'s layouts), written by the product
/// without being zero-filled first.
pub fn sgemm_new(
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    lhs_t: bool,
    rhs: &[f32],
    rhs_t: bool,
    scale: f32,
) -> Vec<f32> {
    assert!(lhs.len() == m * k && rhs.len() == k * n, "sgemm_new: operand sizes");
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `dst` has room for m×n elements and is fresh; with `accumulate` false the product writes every one
    // of them without reading any (k ≥ 1), so all are initialised before `set_len`.
    unsafe {
        gemm_raw((m, n, k), dst.as_mut_ptr(), false, lhs, lhs_t, rhs, rhs_t, scale, gemm_parallelism());
        dst.set_len(m * n);
    }
    dst
}

/// `x @ w^T` for `x` rows of `w`'s input width and a frozen `w: [out, in]`, as a fresh `[rows, out]` buffer;
/// `None` unless `w` is a contiguous f32 CPU tensor.
pub fn times_wt(x: &[f32], w: &Tensor) -> candle_core::Result<Option<Vec<f32>>> {
    let (out, inner) = w.dims2()?;
    Ok(with_f32_data(w, |w| sgemm_new((x.len() / inner, out, inner), x, false, w, true, 1.0)))
}

/// `dy @ w` for `dy` rows of `w`'s output width and a frozen `w: [out, in]` (the gradient through `x @ w^T`),
/// as a fresh `[rows, in]` buffer; `None` unless `w` is a contiguous f32 CPU tensor.
pub fn times_w(dy: &[f32], w: &Tensor) -> candle_core::Result<Option<Vec<f32>>> {
    let (out, inner) = w.dims2()?;
    Ok(with_f32_data(w, |w| sgemm_new((dy.len() / out, inner, out), dy, false, w, false, 1.0)))
}

fn vec_of(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Rows big enough to be worth a task each.
fn min_rows(d: usize) -> usize {
    (4096 / d.max(1)).max(1)
}

/// `f(a[i], b[i])` for every `i`, in blocks on every core (same-length inputs).
pub fn par_zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut y = vec![0f32; a.len()];
    y.par_chunks_mut(4096).zip(a.par_chunks(4096).zip(b.par_chunks(4096))).for_each(|(y, (a, b))| {
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = f(a, b);
        }
    });
    y
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-diff"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms-norm")?;
        let w = f32_slice(s2, l2, "rms-norm")?;
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).with_min_len(min_rows(d)).for_each(|(y, x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (xd, wd, gd) = (f32_data(x)?, f32_data(w)?, f32_data(grad)?);
        let (xv, wv, gv): (&[f32], &[f32], &[f32]) = (&xd, &wd, &gd);
        let d = wv.len();
        let mut dx = vec![0f32; xv.len()];
        // Fixed blocks of rows, summed in order afterwards: the weight gradient does not depend on scheduling.
        let block = 64 * d;
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(block)
            .zip(xv.par_chunks(block).zip(gv.par_chunks(block)))
            .map(|(dx, (x, g))| {
                let mut dw = vec![0f32; d];
                for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                    let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                    let r = 1.0 / (ms + self.eps).sqrt();
                    let dot = x.iter().zip(g).zip(wv).map(|((x, g), w)| g * w * x).sum::<f32>() / d as f32;
                    for i in 0..d {
                        dx[i] = r * wv[i] * g[i] - r * r * r * x[i] * dot;
                        dw[i] += g[i] * x[i] * r;
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; d];
        for p in &partial {
            dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
    }
}

/// `x / sqrt(mean(x², last) + eps) * w`, differentiable in `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return candle_nn::ops::rms_norm_slow(x, w, eps);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-diff"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "softmax")?;
        let d = *l.shape().dims().last().unwrap_or(&1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).with_min_len(min_rows(d)).for_each(|(y, x)| {
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - max).exp();
                sum += *y;
            }
            y.iter_mut().for_each(|y| *y /= sum);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (yd, gd) = (f32_data(res)?, f32_data(grad)?);
        let (y, g): (&[f32], &[f32]) = (&yd, &gd);
        let d = arg.dim(candle_core::D::Minus1)?;
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(d).zip(y.par_chunks(d).zip(g.par_chunks(d))).with_min_len(min_rows(d)).for_each(
            |(dx, (y, g))| {
                let dot = y.iter().zip(g).map(|(y, g)| y * g).sum::<f32>();
                for i in 0..d {
                    dx[i] = y[i] * (g[i] - dot);
                }
            },
        );
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return candle_nn::ops::softmax(x, candle_core::D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

/// Rotate-half rotary embedding of `x: [B, H, T, hd]` with tables `[T, hd/2]`; the tables are constants.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// `sign` +1: the rotation; -1: its transpose (the backward pass).
    fn apply(&self, x: &[f32], dims: &[usize], sign: f32) -> Vec<f32> {
        let (t, hd) = (dims[2], dims[3]);
        let half = hd / 2;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(hd).zip(x.par_chunks(hd)).enumerate().with_min_len(64).for_each(|(row, (y, x))| {
            let p = row % t;
            let (c, s) = (&self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half]);
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                y[i] = a * c[i] - sign * b * s[i];
                y[i + half] = b * c[i] + sign * a * s[i];
            }
        });
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-diff"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "rope")?;
        Ok((CpuStorage::F32(self.apply(x, l.shape().dims(), 1.0)), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = f32_data(grad)?;
        Ok(Some(Tensor::from_vec(self.apply(&g, arg.dims(), -1.0), arg.shape(), arg.device())?))
    }
}

/// Differentiable rotary embedding for `x: [B, H, T, hd]`, `cos`/`sin: [T, hd/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || cos.rank() != 2 || x.rank() != 4 {
        return candle_nn::rotary_emb::rope_slow(x, cos, sin);
    }
    let t = x.dim(2)?;
    let (cos, sin) = (vec_of(&cos.narrow(0, 0, t)?)?, vec_of(&sin.narrow(0, 0, t)?)?);
    x.contiguous()?.apply_op1(Rope { cos, sin })
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu-diff"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (f32_slice(s1, l1, "swiglu")?, f32_slice(s2, l2, "swiglu")?);
        if g.len() != u.len() {
            candle_core::bail!("swiglu: gate and up differ in size");
        }
        let y = par_zip_map(g, u, |g, u| g / (1.0 + (-g).exp()) * u);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gd, ud, dd) = (f32_data(gate)?, f32_data(up)?, f32_data(grad)?);
        let (g, u, d): (&[f32], &[f32], &[f32]) = (&gd, &ud, &dd);
        let mut dg = vec![0f32; g.len()];
        let mut du = vec![0f32; g.len()];
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .zip(g.par_chunks(4096).zip(u.par_chunks(4096)).zip(d.par_chunks(4096)))
            .for_each(|((dg, du), ((g, u), d))| {
                for i in 0..dg.len() {
                    let s = 1.0 / (1.0 + (-g[i]).exp());
                    du[i] = d[i] * g[i] * s;
                    dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                }
            });
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

/// `silu(gate) * up`, differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if !gate.device().is_cpu() || gate.dtype() != DType::F32 || gate.shape() != up.shape() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct MaskedSoftmax;

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::cpu::kernels::VecOps;
        let x = f32_slice(s1, l1, "masked-softmax")?;
        let m = match s2 {
            CpuStorage::F32(v) => v.as_slice(),
            _ => candle_core::bail!("masked-softmax: the mask must be f32"),
        };
        let (d, md) = (l1.shape().dims(), l2.shape().dims());
        let (st, off) = (l2.stride(), l2.start_offset());
        let (t, s) = (d[3], d[4]);
        let per_b = d[1] * d[2] * t;
        // Mask element (batch `bi`, query `i`, key `j`), batch broadcast when the mask has one.
        let bstride = if md[0] == 1 { 0 } else { st[0] };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(s).zip(x.par_chunks(s)).enumerate().with_min_len(min_rows(s)).for_each(|(r, (y, x))| {
            let base = off + (r / per_b) * bstride + (r % t) * st[3];
            for (j, (y, x)) in y.iter_mut().zip(x).enumerate() {
                *y = x + m[base + j * st[4]];
            }
            // The arithmetic of candle's `softmax_last_dim`, step for step, so that the result is the same bits.
            let mut max = f32::NEG_INFINITY;
            // SAFETY: `y` holds `s > 0` elements and `max` is a valid f32.
            unsafe { f32::vec_reduce_max(y.as_ptr(), &mut max, s) };
            y.iter_mut().for_each(|v| *v = (*v - max).exp());
            let mut sum = 0f32;
            // SAFETY: as above.
            unsafe { f32::vec_reduce_sum(y.as_ptr(), &mut sum, s) };
            y.iter_mut().for_each(|v| *v /= sum);
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// `softmax_last_dim(scores + mask)` for `scores: [B, H, R, T, S]` and an additive `mask: [B or 1, 1, 1, T, S]`
/// (any strides), in one pass without the broadcast sum as a tensor: the same values, bit for bit, as candle's
/// `broadcast_add` then `softmax_last_dim`. Inference only (no backward); other shapes, dtypes and devices take the
/// composed ops.
pub fn masked_softmax_last_dim(scores: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let (d, md) = (scores.dims(), mask.dims());
    let fits = d.len() == 5
        && md.len() == 5
        && (md[0] == d[0] || md[0] == 1)
        && md[1] == 1
        && md[2] == 1
        && md[3] == d[3]
        && md[4] == d[4]
        && d[4] > 0;
    if !fits || !scores.device().is_cpu() || scores.dtype() != DType::F32 || mask.dtype() != DType::F32 {
        return candle_nn::ops::softmax_last_dim(&scores.broadcast_add(mask)?);
    }
    scores.contiguous()?.apply_op2_no_bwd(mask, &MaskedSoftmax)
}

/// Causal (masked) attention with grouped queries, forward and backward in one op. Its inputs are
/// q `[B, nh, T, hd]`, k and v `[B, nkv, S, hd]`; its output is the context `[B, T, nh·hd]`.
struct Attention {
    /// The additive mask `[B, 1, 1, T, S]` (0 or -inf), broadcast over the heads.
    mask: Tensor,
    scale: f32,
    /// The probabilities `[B, nkv, rep·T, S]`, kept from the forward pass for the backward pass.
    probs: std::sync::OnceLock<Vec<f32>>,
}

/// The dimensions of an [`Attention`]'s operands: (b, nh, nkv, t, s, hd).
type AttentionDims = (usize, usize, usize, usize, usize, usize);

fn attention_dims(q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<AttentionDims> {
    match (q, k) {
        (&[b, nh, t, hd], &[kb, nkv, s, khd]) if k == v && kb == b && khd == hd && nkv > 0 && nh % nkv == 0 => {
            Ok((b, nh, nkv, t, s, hd))
        }
        _ => candle_core::bail!("attention: q {q:?}, k {k:?}, v {v:?}"),
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention-diff"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) =
            (f32_slice(s1, l1, "attention")?, f32_slice(s2, l2, "attention")?, f32_slice(s3, l3, "attention")?);
        let (b, nh, nkv, t, s, hd) = attention_dims(l1.dims(), l2.dims(), l3.dims())?;
        let mask = f32_data(&self.mask)?;
        if mask.len() != b * t * s {
            candle_core::bail!("attention: a mask of {} for [{b}, {t}, {s}]", mask.len());
        }
        let mask: &[f32] = &mask;
        let rep = nh / nkv;
        let (qb, kb, pb) = (rep * t * hd, s * hd, rep * t * s);
        let mut probs = vec![0f32; b * nkv * pb];
        let mut ctx = vec![0f32; b * nkv * rep * t * hd];
        probs.par_chunks_mut(pb).zip(ctx.par_chunks_mut(qb)).enumerate().for_each(|(g, (p, c))| {
            let bi = g / nkv;
            gemm_f32(
                false,
                (rep * t, s, hd),
                p,
                false,
                &q[g * qb..(g + 1) * qb],
                false,
                &k[g * kb..(g + 1) * kb],
                true,
                self.scale,
            );
            for (r, row) in p.chunks_mut(s).enumerate() {
                let m = &mask[(bi * t + r % t) * s..(bi * t + r % t + 1) * s];
                let mut max = f32::NEG_INFINITY;
                for (x, &m) in row.iter_mut().zip(m) {
                    *x += m;
                    max = max.max(*x);
                }
                let mut sum = 0f32;
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                row.iter_mut().for_each(|x| *x /= sum);
            }
            gemm_f32(false, (rep * t, hd, s), c, false, p, false, &v[g * kb..(g + 1) * kb], false, 1.0);
        });
        // [B, nkv, rep, T, hd] (= [B, nh, T, hd]) to [B, T, nh·hd].
        let mut out = vec![0f32; ctx.len()];
        out.par_chunks_mut(nh * hd).enumerate().for_each(|(row, o)| {
            let (bi, ti) = (row / t, row % t);
            for h in 0..nh {
                let src = ((bi * nh + h) * t + ti) * hd;
                o[h * hd..(h + 1) * hd].copy_from_slice(&ctx[src..src + hd]);
            }
        });
        if self.probs.set(probs).is_err() {
            candle_core::bail!("attention: the op ran forward twice");
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, nh * hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, nh, nkv, t, s, hd) = attention_dims(q.dims(), k.dims(), v.dims())?;
        let Some(probs) = self.probs.get() else { candle_core::bail!("attention: backward before forward") };
        let (qd, kd, vd, gd) = (f32_data(q)?, f32_data(k)?, f32_data(v)?, f32_data(grad)?);
        let (qv, kv, vv, g): (&[f32], &[f32], &[f32], &[f32]) = (&qd, &kd, &vd, &gd);
        let rep = nh / nkv;
        let (qb, kb, pb) = (rep * t * hd, s * hd, rep * t * s);
        // The incoming gradient [B, T, nh·hd] back to [B, nh, T, hd].
        let mut dctx = vec![0f32; g.len()];
        dctx.par_chunks_mut(t * hd).enumerate().for_each(|(bh, d)| {
            let (bi, h) = (bh / nh, bh % nh);
            for ti in 0..t {
                let src = (bi * t + ti) * nh * hd + h * hd;
                d[ti * hd..(ti + 1) * hd].copy_from_slice(&g[src..src + hd]);
            }
        });
        let (mut dq, mut dk, mut dv) = (vec![0f32; qv.len()], vec![0f32; kv.len()], vec![0f32; vv.len()]);
        dq.par_chunks_mut(qb).zip(dk.par_chunks_mut(kb).zip(dv.par_chunks_mut(kb))).enumerate().for_each(
            |(gi, (dq, (dk, dv)))| {
                let p = &probs[gi * pb..(gi + 1) * pb];
                let dc = &dctx[gi * qb..(gi + 1) * qb];
                // dV = Pᵀ dC; dP = dC Vᵀ; dS = P ⊙ (dP − rowsum(dP ⊙ P)); dQ = s dS K; dK = s dSᵀ Q.
                gemm_f32(false, (s, hd, rep * t), dv, false, p, true, dc, false, 1.0);
                let mut ds = vec![0f32; pb];
                gemm_f32(false, (rep * t, s, hd), &mut ds, false, dc, false, &vv[gi * kb..(gi + 1) * kb], true, 1.0);
                for (d, p) in ds.chunks_mut(s).zip(p.chunks(s)) {
                    let dot = d.iter().zip(p).map(|(d, p)| d * p).sum::<f32>();
                    d.iter_mut().zip(p).for_each(|(d, &p)| *d = p * (*d - dot));
                }
                gemm_f32(
                    false,
                    (rep * t, hd, s),
                    dq,
                    false,
                    &ds,
                    false,
                    &kv[gi * kb..(gi + 1) * kb],
                    false,
                    self.scale,
                );
                gemm_f32(false, (s, hd, rep * t), dk, false, &ds, true, &qv[gi * qb..(gi + 1) * qb], false, self.scale);
            },
        );
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Differentiable attention with grouped queries: softmax(scale · q kᵀ + mask) v, as the context `[B, T, nh·hd]`
/// (the input of o_proj), for q `[B, nh, T, hd]`, k and v `[B, nkv, S, hd]` and an additive `mask` `[B, 1, 1, T,
/// S]`. One op with a hand-written backward instead of the dozen nodes of the composition (each a fresh score-sized
/// buffer forward, and again with a zero-filled gradient and a sum backward). `None` where it does not apply
/// (not f32 on the CPU, another mask shape): the caller composes the ops.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Option<Tensor>> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(cpu_f32(q) && cpu_f32(k) && cpu_f32(v) && cpu_f32(mask)) || q.rank() != 4 || k.rank() != 4 {
        return Ok(None);
    }
    let (b, _, t, _) = q.dims4()?;
    let s = k.dim(2)?;
    if mask.dims() != [b, 1, 1, t, s] {
        return Ok(None);
    }
    let op = Attention { mask: mask.contiguous()?, scale: scale as f32, probs: std::sync::OnceLock::new() };
    Ok(Some(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?))
}

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "par-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (f32_slice(s1, l1, "add")?, f32_slice(s2, l2, "add")?);
        if a.len() != b.len() {
            candle_core::bail!("add: the operands differ in size");
        }
        Ok((CpuStorage::F32(par_zip_map(a, b, |a, b| a + b)), l1.shape().clone()))
    }
}

/// `a + b` of two f32 CPU tensors of one shape, row-parallel (candle's elementwise ops run on one thread).
/// Inference only (no backward); anything else takes candle's add.
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !a.device().is_cpu() || a.dtype() != DType::F32 || b.dtype() != DType::F32 || a.shape() != b.shape() {
        return a + b;
    }
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add)
}

/// `x @ w^T` as a plain matmul (no autograd op recorded for `w`).
fn plain_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    crate::forward::linear(x, w).map_err(candle_core::Error::wrap)
}

struct FrozenLinear {
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "frozen-linear")?;
        let (out, inner) = self.w.dims2()?;
        let mut dims = l.shape().dims().to_vec();
        if dims.last() != Some(&inner) {
            candle_core::bail!("frozen-linear: input {:?} against a [{out}, {inner}] weight", l.shape().dims());
        }
        *dims.last_mut().expect("checked") = out;
        // An f32 weight: the product straight into the output buffer.
        if let Some(y) = times_wt(x, &self.w)? {
            return Ok((CpuStorage::F32(y), Shape::from(dims)));
        }
        let x = Tensor::from_slice(x, l.shape(), &candle_core::Device::Cpu)?;
        let y = plain_linear(&x, &self.w)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let out = self.w.dim(0)?;
        let rows = grad.elem_count() / out;
        let grad = grad.contiguous()?;
        if grad.dtype() == DType::F32 && grad.device().is_cpu() {
            if let Some(g) = times_w(&f32_data(&grad)?, &self.w)? {
                return Ok(Some(Tensor::from_vec(g, arg.shape(), arg.device())?));
            }
        }
        // The weight stays in its stored dtype in the graph (a bf16 7B's f32 copies of every layer would not fit),
        // upcast here only while the gradient is formed.
        let g = grad.reshape((rows, out))?.matmul(&self.w.to_dtype(grad.dtype())?)?;
        Ok(Some(g.reshape(arg.shape())?))
    }
}

/// `x @ w^T` for `x: [..., in]`, `w: [out, in]`, with the gradient flowing to `x` only. Off the CPU (no custom
/// kernel) it falls back to a plain matmul, whose backward also computes the unused weight gradient.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    // A weight kept in its stored dtype (bf16, f16) is upcast while it is used ([`plain_linear`], the backward).
    if !x.device().is_cpu() || !x.track_op() {
        return plain_linear(x, w);
    }
    x.contiguous()?.apply_op1(FrozenLinear { w: w.contiguous()? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Forward values and every input gradient of a fused op against its composed twin.
    fn check(name: &str, inputs: &[Tensor], fused: impl Fn(&[&Tensor]) -> Tensor, slow: impl Fn(&[&Tensor]) -> Tensor) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let (a, b) = (fused(&ts), slow(&ts));
        assert!(diff(&a, &b) < 1e-5, "{name}: forward differs by {}", diff(&a, &b));
        let w = Tensor::randn(0f32, 1., a.shape(), &Device::Cpu).unwrap();
        let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, t) in ts.iter().enumerate() {
            let (x, y) = (ga.get(t).expect("fused grad"), gb.get(t).expect("slow grad"));
            assert!(diff(x, y) < 1e-4, "{name}: gradient of input {i} differs by {}", diff(x, y));
        }
    }

    #[test]
    fn fused_attention_matches_the_composed_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let (b, nh, nkv, t, hd, scale) = (2, 6, 2, 5, 4, 0.5);
        // Causal, with sequence 1 padded after 3 tokens: its padded queries see the first key only (as `Batch`).
        let lens = [5, 3];
        let mut mask = vec![f32::NEG_INFINITY; b * t * t];
        for (bi, &len) in lens.iter().enumerate() {
            for i in 0..t {
                for j in 0..t {
                    if (i < len && j <= i) || (i >= len && j == 0) {
                        mask[(bi * t + i) * t + j] = 0.0;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, 1, t, t), &dev).unwrap();
        let inputs = [
            Tensor::randn(0f32, 1., (b, nh, t, hd), &dev).unwrap(),
            Tensor::randn(0f32, 1., (b, nkv, t, hd), &dev).unwrap(),
            Tensor::randn(0f32, 1., (b, nkv, t, hd), &dev).unwrap(),
        ];
        check(
            "attention",
            &inputs,
            |x| attention(x[0], x[1], x[2], &mask, scale).unwrap().expect("applies"),
            |x| {
                // Each query head reads KV head h / (nh / nkv): the composition repeats K and V per query head.
                let rep = |kv: &Tensor| {
                    let heads: Vec<Tensor> = (0..nh).map(|h| kv.narrow(1, h / (nh / nkv), 1).unwrap()).collect();
                    Tensor::cat(&heads, 1).unwrap()
                };
                let (k, v) = (rep(x[1]), rep(x[2]));
                let scores = (x[0].matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
                let scores = scores.broadcast_add(&mask.squeeze(1).unwrap()).unwrap();
                let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap();
                let ctx = probs.matmul(&v).unwrap();
                ctx.transpose(1, 2).unwrap().reshape((b, t, nh * hd)).unwrap()
            },
        );
        // Shapes it does not take: the caller composes.
        let other = Tensor::zeros((b, 1, t, t), DType::F32, &dev).unwrap();
        assert!(attention(&inputs[0], &inputs[1], &inputs[2], &other, scale).unwrap().is_none());
    }

    #[test]
    fn sgemm_matches_a_triple_loop_for_every_operand_layout() {
        let (m, n, k) = (7, 5, 300);
        let val = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 25.0;
        let (a, b): (Vec<f32>, Vec<f32>) = ((0..m * k).map(val).collect(), (0..k * n).map(|i| val(i + 7)).collect());
        let at = |i: usize, j: usize, t: bool| if t { a[j * m + i] } else { a[i * k + j] };
        let bt = |i: usize, j: usize, t: bool| if t { b[j * k + i] } else { b[i * n + j] };
        for (lt, rt, acc) in [(false, false, false), (true, false, true), (false, true, false), (true, true, true)] {
            let start: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
            let mut dst = start.clone();
            sgemm((m, n, k), &mut dst, acc, &a, lt, &b, rt, 0.5);
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k).map(|p| at(i, p, lt) as f64 * bt(p, j, rt) as f64).sum();
                    let want = 0.5 * dot + if acc { start[i * n + j] as f64 } else { 0.0 };
                    let got = dst[i * n + j] as f64;
                    assert!((got - want).abs() < 1e-3, "lhs_t {lt} rhs_t {rt} acc {acc} [{i},{j}]: {got} vs {want}");
                }
            }
        }
        // No inner dimension: the product is zero, and an accumulated result is left as it was.
        let mut dst = vec![3f32; 4];
        sgemm((2, 2, 0), &mut dst, true, &[], false, &[], false, 1.0);
        assert_eq!(dst, vec![3.0; 4]);
        sgemm((2, 2, 0), &mut dst, false, &[], false, &[], false, 1.0);
        assert_eq!(dst, vec![0.0; 4]);
    }

    #[test]
    fn frozen_linear_matches_matmul_and_its_input_gradient_with_an_f32_or_bf16_weight() {
        let dev = candle_core::Device::Cpu;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 5), &dev).unwrap()).unwrap();
        let w32 = Tensor::randn(0f32, 1., (4, 5), &dev).unwrap();
        for w in [w32.clone(), w32.to_dtype(candle_core::DType::BF16).unwrap()] {
            let reference = w.to_dtype(DType::F32).unwrap();
            let y1 = frozen_linear(x.as_tensor(), &w).unwrap();
            let y2 = x.as_tensor().broadcast_matmul(&reference.t().unwrap()).unwrap();
            let d = |a: &Tensor, b: &Tensor| {
                (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
            };
            assert!(d(&y1, &y2) <= 1e-6);
            let g1 = y1.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = y2.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            assert!(d(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) <= 1e-5);
            assert!(g1.get(&w).is_none(), "a frozen weight gets no gradient");
        }
    }

    #[test]
    fn fused_ops_match_the_composed_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let r = |s: &[usize]| Tensor::randn(0f32, 1., s, &dev).unwrap();
        check(
            "rms_norm",
            &[r(&[2, 5, 16]), r(&[16])],
            |t| rms_norm(t[0], t[1], 1e-5).unwrap(),
            |t| candle_nn::ops::rms_norm_slow(t[0], t[1], 1e-5).unwrap(),
        );
        let mask = Tensor::from_vec(
            (0..2 * 3 * 7 * 7)
                .map(|i| if (i % 7) > (i / 7) % 7 { f32::NEG_INFINITY } else { 0. })
                .collect::<Vec<f32>>(),
            (2, 3, 7, 7),
            &dev,
        )
        .unwrap();
        check(
            "softmax",
            &[r(&[2, 3, 7, 7])],
            |t| softmax_last_dim(&t[0].broadcast_add(&mask).unwrap()).unwrap(),
            |t| candle_nn::ops::softmax(&t[0].broadcast_add(&mask).unwrap(), candle_core::D::Minus1).unwrap(),
        );
        let (cos, sin) = (r(&[9, 4]), r(&[9, 4]));
        check(
            "rope",
            &[r(&[2, 3, 6, 8])],
            |t| rope(t[0], &cos, &sin).unwrap(),
            |t| {
                candle_nn::rotary_emb::rope_slow(t[0], &cos.narrow(0, 0, 6).unwrap(), &sin.narrow(0, 0, 6).unwrap())
                    .unwrap()
            },
        );
        check(
            "swiglu",
            &[r(&[3, 5000]), r(&[3, 5000])],
            |t| swiglu(t[0], t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * t[1]).unwrap(),
        );
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn inference_kernels_give_the_composed_ops_bit_for_bit() {
        let dev = Device::Cpu;
        let r = |s: &[usize]| Tensor::randn(0f32, 3., s, &dev).unwrap();
        // A causal + padding mask [B, 1, 1, 9, 9] narrowed to 6 queries and keys (strided, as `Batch::attend`
        // gives it for a shorter layer input), per sequence and shared by the batch.
        let (b, t) = (3, 9);
        let full: Vec<f32> = (0..b * t * t)
            .map(|n| {
                let (s, i, j) = (n / (t * t), (n / t) % t, n % t);
                if j > i || j >= t - 2 * s {
                    f32::NEG_INFINITY
                } else {
                    0.
                }
            })
            .collect();
        let full = Tensor::from_vec(full, (b, 1, 1, t, t), &dev).unwrap();
        let narrowed = full.narrow(3, 0, 6).unwrap().narrow(4, 0, 6).unwrap();
        let shared = full.narrow(0, 0, 1).unwrap();
        for (scores, mask) in
            [(r(&[b, 2, 3, t, t]), full.clone()), (r(&[b, 2, 3, 6, 6]), narrowed), (r(&[b, 2, 3, t, t]), shared)]
        {
            let fused = masked_softmax_last_dim(&scores, &mask).unwrap();
            let composed = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
            assert_eq!(bits(&fused), bits(&composed), "masked softmax, mask {:?}", mask.dims());
        }
        let (g, u) = (r(&[4, 3000]), r(&[4, 3000]));
        assert_eq!(bits(&swiglu(&g, &u).unwrap()), bits(&(g.silu().unwrap() * &u).unwrap()), "swiglu");
        assert_eq!(bits(&add(&g, &u).unwrap()), bits(&(&g + &u).unwrap()), "add");
        // A transposed (strided) operand is made contiguous first.
        let gt = r(&[3000, 4]).t().unwrap();
        assert_eq!(bits(&add(&gt, &u).unwrap()), bits(&(&gt + &u).unwrap()), "add, strided");
    }
}
