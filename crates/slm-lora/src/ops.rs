//! Custom ops with hand-written backward passes, so training builds only the gradients it needs.
//!
//! candle's `matmul` backward always computes the gradient of both operands. For a frozen weight that is a second
//! full-size matmul per projection whose result is thrown away (PyTorch skips it for `requires_grad=False`).
//! [`frozen_linear`] (in `slm_model::fused`, shared with the width gradient pass) computes `x @ w^T` with a
//! backward that returns only `grad @ w`. The losses over the
//! vocabulary ([`token_cross_entropy`], [`token_kl`]) are fused row loops: one pass forward, one backward, no
//! `[N, vocab]` temporaries per elementary op.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;
use slm_model::fused::{f32_data, f32_slice, par_zip_map, sgemm, sgemm_new, times_w, times_wt, with_f32_data};

pub use slm_model::fused::frozen_linear;

/// The log-sum-exp of `row / t`; `row` is replaced by its softmax at temperature `t`.
fn softmax_in_place(row: &mut [f32], t: f32) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) / t;
    let mut sum = 0f64;
    for v in row.iter_mut() {
        let e = (*v / t - max).exp();
        *v = e;
        sum += e as f64;
    }
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|o| *o *= inv);
    max + (sum as f32).ln()
}

/// Per-row log-sum-exp of `logits[r] / t` and the row's softmax.
fn softmax_row(row: &[f32], t: f32, out: &mut [f32]) -> f32 {
    out.copy_from_slice(row);
    softmax_in_place(out, t)
}

struct CrossEntropy {
    targets: Vec<u32>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "token-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "token-cross-entropy")?;
        let (n, v) = l.shape().dims2()?;
        let losses = (0..n)
            .into_par_iter()
            .map_init(
                || vec![0f32; v],
                |tmp, r| {
                    let row = &x[r * v..(r + 1) * v];
                    softmax_row(row, 1.0, tmp) - row[self.targets[r] as usize]
                },
            )
            .collect();
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let x = arg.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v).enumerate().for_each(|(r, o)| {
            softmax_row(&x[r * v..(r + 1) * v], 1.0, o);
            o[self.targets[r] as usize] -= 1.0;
            o.iter_mut().for_each(|e| *e *= g[r]);
        });
        Ok(Some(Tensor::from_vec(out, (n, v), arg.device())?))
    }
}

/// Logit rows per chunk of [`head_cross_entropy`]: about 32 MiB of f32 logits at a time.
fn head_chunk_rows(vocab: usize) -> usize {
    ((8 << 20) / vocab.max(1)).max(1)
}

struct HeadCrossEntropy {
    /// The frozen LM head `[vocab, hidden]`, f32.
    w: Tensor,
    targets: Vec<u32>,
    chunk: usize,
    /// Whether the rows take a gradient: the forward pass then forms it too.
    want_grad: bool,
    /// `(softmax − onehot) @ head` of every row, `[N, hidden]`, formed in the forward pass while each chunk's
    /// logits are at hand; the backward pass only scales its rows.
    grad: std::sync::OnceLock<Vec<f32>>,
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "head-cross-entropy")?;
        let (n, h) = l.shape().dims2()?;
        let v = self.w.dim(0)?;
        let mut losses = vec![0f32; n];
        let mut grad = if self.want_grad { vec![0f32; n * h] } else { Vec::new() };
        let mut logits = vec![0f32; self.chunk.min(n) * v];
        let done = with_f32_data(&self.w, |w| {
            let mut s = 0;
            while s < n {
                let len = self.chunk.min(n - s);
                let logits = &mut logits[..len * v];
                sgemm((len, v, h), logits, false, &x[s * h..(s + len) * h], false, w, true, 1.0);
                logits.par_chunks_mut(v).zip(losses[s..s + len].par_iter_mut()).enumerate().for_each(
                    |(r, (row, loss))| {
                        let t = self.targets[s + r] as usize;
                        let target_logit = row[t];
                        *loss = softmax_in_place(row, 1.0) - target_logit;
                        row[t] -= 1.0;
                    },
                );
                if self.want_grad {
                    // d loss_r / d rows_r = (softmax − onehot) @ W, scaled by the incoming gradient later.
                    sgemm((len, h, v), &mut grad[s * h..(s + len) * h], false, logits, false, w, false, 1.0);
                }
                s += len;
            }
        });
        if done.is_none() {
            candle_core::bail!("head-cross-entropy: the head must be a contiguous f32 CPU tensor");
        }
        if self.want_grad && self.grad.set(grad).is_err() {
            candle_core::bail!("head-cross-entropy: the op ran forward twice");
        }
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_vec1::<f32>()?;
        let h = arg.dim(1)?;
        let Some(rows) = self.grad.get() else {
            candle_core::bail!("head-cross-entropy: backward through rows that took no gradient");
        };
        let mut dx = vec![0f32; rows.len()];
        dx.par_chunks_mut(h).zip(rows.par_chunks(h)).zip(g.par_iter()).for_each(|((d, r), &g)| {
            d.iter_mut().zip(r).for_each(|(d, &r)| *d = g * r);
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Per-row cross-entropy of the logits `rows @ head^T` (`rows: [N, hidden]`, a frozen `head: [vocab, hidden]`)
/// without the `[N, vocab]` logits: [`head_chunk_rows`] rows at a time, each chunk's logits turned into the loss
/// and, while they are at hand, into the rows' gradient `(softmax − onehot) @ head` (`[N, hidden]`, kept for the
/// backward pass, which only scales it). So the memory of the 49,152-way softmax is one chunk's whatever N, and
/// the head's logits are formed once (two products over the head in all, as with kept logits). The gradient
/// flows to `rows` only. The same values as
/// `token_cross_entropy(rows @ head^T)` up to float rounding (tests). Off the CPU, or for a head not stored in f32,
/// it is that composition.
pub fn head_cross_entropy(rows: &Tensor, head: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let (n, v) = (rows.dim(0)?, head.dim(0)?);
    if targets.len() != n || targets.iter().any(|&t| t as usize >= v) {
        candle_core::bail!("head-cross-entropy: {} targets for {n} rows of a {v}-token head", targets.len());
    }
    if rows.rank() != 2 || head.rank() != 2 || rows.dim(1)? != head.dim(1)? {
        candle_core::bail!("head-cross-entropy: rows {:?} against a head {:?}", rows.dims(), head.dims());
    }
    if !rows.device().is_cpu() || head.dtype() != candle_core::DType::F32 || rows.dtype() != candle_core::DType::F32 {
        return token_cross_entropy(&frozen_linear(rows, head)?, targets);
    }
    rows.contiguous()?.apply_op1(HeadCrossEntropy {
        w: head.contiguous()?,
        targets: targets.to_vec(),
        chunk: head_chunk_rows(v),
        want_grad: rows.track_op(),
        grad: std::sync::OnceLock::new(),
    })
}

struct LoraLinear {
    /// The frozen weight `[out, in]`, a contiguous f32 CPU tensor.
    w: Tensor,
    /// α / r.
    scale: f32,
    /// Inverted-dropout multipliers of the LoRA branch's input, one per element of `x`.
    mask: Option<Vec<f32>>,
    /// Whether `x` takes a gradient (a layer's input does; the first layer's, from frozen embeddings, does not).
    x_grad: bool,
}

impl LoraLinear {
    /// The LoRA branch's input: `x`, or `x ⊙ mask`.
    fn dropped<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.mask {
            Some(m) => std::borrow::Cow::Owned(par_zip_map(x, m, |x, m| x * m)),
            None => std::borrow::Cow::Borrowed(x),
        }
    }
}

fn not_f32_weight() -> candle_core::Error {
    candle_core::Error::Msg("lora-linear: the weight must be contiguous f32".into())
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        let x = f32_slice(s1, l1, "lora-linear")?;
        let (a, b) = (f32_slice(s2, l2, "lora-linear")?, f32_slice(s3, l3, "lora-linear")?);
        let (out, inner) = self.w.dims2()?;
        let (r, rows) = (l2.shape().dims2()?.0, x.len() / inner);
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().expect("a matrix input") = out;
        let mut y = times_wt(x, &self.w)?.ok_or_else(not_f32_weight)?;
        let xa = sgemm_new((rows, r, inner), &self.dropped(x), false, a, true, self.scale);
        sgemm((rows, out, r), &mut y, true, &xa, false, b, true, 1.0);
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, inner) = self.w.dims2()?;
        let r = a.dim(0)?;
        let grad = grad.contiguous()?;
        let (xd, ad, bd, dyd) = (f32_data(x)?, f32_data(a)?, f32_data(b)?, f32_data(&grad)?);
        let (xv, av, bv, dy): (&[f32], &[f32], &[f32], &[f32]) = (&xd, &ad, &bd, &dyd);
        let rows = xv.len() / inner;
        let xd = self.dropped(xv);
        let xa = sgemm_new((rows, r, inner), &xd, false, av, true, self.scale);
        // d(x_d a^T), scaled: s · dy @ b.
        let gxa = sgemm_new((rows, r, out), dy, false, bv, false, self.scale);
        let db = sgemm_new((out, r, rows), dy, true, &xa, false, 1.0);
        let da = sgemm_new((r, inner, rows), &gxa, true, &xd, false, 1.0);
        let dx = if self.x_grad {
            let mut dx = times_w(dy, &self.w)?.ok_or_else(not_f32_weight)?;
            match &self.mask {
                None => sgemm((rows, inner, r), &mut dx, true, &gxa, false, av, false, 1.0),
                Some(m) => {
                    let t = sgemm_new((rows, inner, r), &gxa, false, av, false, 1.0);
                    dx.par_chunks_mut(4096)
                        .zip(t.par_chunks(4096).zip(m.par_chunks(4096)))
                        .for_each(|(d, (t, m))| d.iter_mut().zip(t).zip(m).for_each(|((d, &t), &m)| *d += t * m));
                }
            }
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        Ok((dx, Some(Tensor::from_vec(da, a.shape(), a.device())?), Some(Tensor::from_vec(db, b.shape(), b.device())?)))
    }
}

/// The LoRA branch `s · (drop(x) @ a^T) @ b^T` composed of candle's ops (`mask`: the inverted-dropout
/// multipliers of `x`, `None`: no dropout).
pub fn lora_branch(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Vec<f32>>,
) -> candle_core::Result<Tensor> {
    let xd = match mask {
        Some(m) => x.mul(&Tensor::from_vec(m, x.shape(), x.device())?)?,
        None => x.clone(),
    };
    let linear = |x: &Tensor, w: &Tensor| slm_model::forward::linear(x, w).map_err(candle_core::Error::wrap);
    linear(&(linear(&xd, a)? * scale)?, b)
}

/// A LoRA projection in one op: `x @ w^T + s · (drop(x) @ a^T) @ b^T` for `x: [..., in]`, a frozen `w: [out, in]`,
/// `a: [r, in]`, `b: [out, r]` and `mask` the inverted-dropout multipliers of `x` (`None`: no dropout). One node
/// in the graph instead of seven (the mask's product, two matmuls with their transposes, the scaling, the sum and
/// the base product), so the backward pass makes no zero-filled gradient buffer and no sum per node, and the
/// frozen weight gets no gradient. Gradients flow to `x` (when it takes one), `a` and `b`; the same values as
/// that composition up to float rounding (tests). Needs f32 CPU tensors; anything else takes the composition.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Vec<f32>>,
) -> candle_core::Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !(f32_cpu(x) && f32_cpu(w) && f32_cpu(a) && f32_cpu(b)) {
        return frozen_linear(x, w)? + lora_branch(x, a, b, scale, mask)?;
    }
    let (out, inner) = w.dims2()?;
    let r = a.dim(0)?;
    if x.dim(candle_core::D::Minus1)? != inner || a.dims() != [r, inner] || b.dims() != [out, r] {
        candle_core::bail!("lora-linear: x {:?}, w {:?}, a {:?}, b {:?}", x.dims(), w.dims(), a.dims(), b.dims());
    }
    if mask.as_ref().is_some_and(|m| m.len() != x.elem_count()) {
        candle_core::bail!(
            "lora-linear: a dropout mask of {} for {} inputs",
            mask.map_or(0, |m| m.len()),
            x.elem_count()
        );
    }
    let op = LoraLinear { w: w.contiguous()?, scale: scale as f32, mask, x_grad: x.track_op() };
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// Per-row cross-entropy `-log softmax(logits[r])[targets[r]]`, `[N]`, for `logits: [N, vocab]`.
pub fn token_cross_entropy(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n || targets.iter().any(|&t| t as usize >= v) {
        candle_core::bail!("token-cross-entropy: {} targets for {n} rows of {v}", targets.len());
    }
    if !logits.device().is_cpu() {
        let logp = log_softmax_rows(logits)?;
        let idx = Tensor::from_slice(targets, (n, 1), logits.device())?;
        return logp.gather(&idx, 1)?.squeeze(1)?.neg();
    }
    logits.contiguous()?.apply_op1(CrossEntropy { targets: targets.to_vec() })
}

fn log_softmax_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(1)?;
    let d = x.broadcast_sub(&max)?;
    d.broadcast_sub(&d.exp()?.sum_keepdim(1)?.log()?)
}

struct Kl {
    /// Teacher probabilities at temperature `t`, row-major `[N, vocab]`.
    teacher: Vec<f32>,
    /// Σ p log p per row.
    neg_entropy: Vec<f64>,
    t: f32,
}

impl CustomOp1 for Kl {
    fn name(&self) -> &'static str {
        "token-kl"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "token-kl")?;
        let (n, v) = l.shape().dims2()?;
        let losses = (0..n)
            .into_par_iter()
            .map_init(
                || vec![0f32; v],
                |q, r| {
                    let lse = softmax_row(&x[r * v..(r + 1) * v], self.t, q);
                    let p = &self.teacher[r * v..(r + 1) * v];
                    // KL = Σ p log p − Σ p log q, with log q = z/t − lse and Σ p = 1.
                    let cross: f64 =
                        p.iter().zip(&x[r * v..(r + 1) * v]).map(|(&pj, &z)| pj as f64 * (z / self.t) as f64).sum();
                    let kl = self.neg_entropy[r] - cross + lse as f64;
                    (kl as f32) * self.t * self.t
                },
            )
            .collect();
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let x = arg.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v).enumerate().for_each(|(r, o)| {
            softmax_row(&x[r * v..(r + 1) * v], self.t, o);
            // d(t^2 KL)/dz = t (q - p).
            let p = &self.teacher[r * v..(r + 1) * v];
            for (e, &pj) in o.iter_mut().zip(p) {
                *e = (*e - pj) * self.t * g[r];
            }
        });
        Ok(Some(Tensor::from_vec(out, (n, v), arg.device())?))
    }
}

/// Per-row `t² · KL(softmax(teacher/t) ‖ softmax(student/t))`, `[N]` (Hinton et al.'s scaling, so the gradient
/// size does not depend on `t`). Gradient flows to `student` only.
pub fn token_kl(student: &Tensor, teacher: &Tensor, t: f64) -> candle_core::Result<Tensor> {
    let (n, v) = student.dims2()?;
    if teacher.dims2()? != (n, v) {
        candle_core::bail!("token-kl: student {:?} and teacher {:?} differ", student.dims(), teacher.dims());
    }
    let t = t as f32;
    let tl = teacher.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let mut probs = vec![0f32; n * v];
    probs.par_chunks_mut(v).enumerate().for_each(|(r, p)| {
        softmax_row(&tl[r * v..(r + 1) * v], t, p);
    });
    if !student.device().is_cpu() {
        let p = Tensor::from_vec(probs, (n, v), student.device())?;
        let logq = log_softmax_rows(&(student / t as f64)?)?;
        let plogp = (&p * p.clamp(1e-30, 1.0)?.log()?)?;
        return (plogp - (&p * logq)?)?.sum(1)? * (t * t) as f64;
    }
    let neg_entropy = probs
        .par_chunks(v)
        .map(|p| p.iter().filter(|&&x| x > 0.0).map(|&x| x as f64 * (x as f64).ln()).sum())
        .collect();
    student.contiguous()?.apply_op1(Kl { teacher: probs, neg_entropy, t })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= tol, "max diff {d}");
    }

    #[test]
    fn chunked_head_cross_entropy_matches_the_full_logits() {
        let dev = Device::Cpu;
        // 9000-token head: 932 rows per chunk, so 2100 rows take three chunks (the last partial).
        let (n, h, v) = (2100, 16, 9000);
        let rows = Var::from_tensor(&Tensor::randn(0f32, 1., (n, h), &dev).unwrap()).unwrap();
        let head = Tensor::randn(0f32, 0.5, (v, h), &dev).unwrap();
        let targets: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
        assert!(head_chunk_rows(v) < n && n % head_chunk_rows(v) != 0);
        let chunked = head_cross_entropy(rows.as_tensor(), &head, &targets).unwrap();
        let full = token_cross_entropy(&rows.as_tensor().matmul(&head.t().unwrap()).unwrap(), &targets).unwrap();
        close(&chunked, &full, 1e-4);
        let w = Tensor::from_vec((0..n).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<_>>(), n, &dev).unwrap();
        let g1 = (&chunked * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&full * &w).unwrap().sum_all().unwrap().backward().unwrap();
        close(g1.get(rows.as_tensor()).unwrap(), g2.get(rows.as_tensor()).unwrap(), 1e-5);
        assert!(head_cross_entropy(rows.as_tensor(), &head, &targets[1..]).is_err());
        assert!(head_cross_entropy(rows.as_tensor(), &head.narrow(1, 0, h - 1).unwrap(), &targets).is_err());
        // Rows that take no gradient: the same losses, and no gradient formed.
        let plain = head_cross_entropy(&rows.as_tensor().detach(), &head, &targets).unwrap();
        assert_eq!(plain.to_vec1::<f32>().unwrap(), chunked.to_vec1::<f32>().unwrap());
    }

    #[test]
    fn lora_linear_matches_the_composed_projection_and_its_gradients() {
        let dev = Device::Cpu;
        let (rows, inner, out, r, s) = (6, 9, 5, 3, 2.5);
        let w = Tensor::randn(0f32, 1., (out, inner), &dev).unwrap();
        let a = Var::from_tensor(&Tensor::randn(0f32, 1., (r, inner), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., (out, r), &dev).unwrap()).unwrap();
        let x0 = Tensor::randn(0f32, 1., (2, rows / 2, inner), &dev).unwrap();
        let mask: Vec<f32> = (0..rows * inner).map(|i| if i % 4 == 1 { 0.0 } else { 1.25 }).collect();
        let weights = Tensor::randn(0f32, 1., (2, rows / 2, out), &dev).unwrap();
        for (m, x_var) in [(None, true), (Some(mask.clone()), true), (Some(mask), false)] {
            let xv = Var::from_tensor(&x0).unwrap();
            let x = if x_var { xv.as_tensor().clone() } else { x0.clone() };
            let fused = lora_linear(&x, &w, a.as_tensor(), b.as_tensor(), s, m.clone()).unwrap();
            // The composition, written out: x w^T + s (x ⊙ mask) a^T b^T.
            let xd = match &m {
                Some(m) => x.mul(&Tensor::from_vec(m.clone(), x.shape(), &dev).unwrap()).unwrap(),
                None => x.clone(),
            };
            let lin = |x: &Tensor, w: &Tensor| x.broadcast_matmul(&w.t().unwrap()).unwrap();
            let composed = (lin(&x, &w) + (lin(&lin(&xd, a.as_tensor()), b.as_tensor()) * s).unwrap()).unwrap();
            assert_eq!(fused.dims(), &[2, rows / 2, out]);
            close(&fused, &composed, 1e-5);
            let g1 = (&fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&composed * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            for t in [a.as_tensor(), b.as_tensor()] {
                close(g1.get(t).unwrap(), g2.get(t).unwrap(), 1e-4);
            }
            if x_var {
                close(g1.get(xv.as_tensor()).unwrap(), g2.get(xv.as_tensor()).unwrap(), 1e-4);
            }
            assert!(g1.get(&w).is_none(), "the frozen weight gets no gradient");
        }
        assert!(lora_linear(&x0, &w, a.as_tensor(), b.as_tensor(), s, Some(vec![1.0; 3])).is_err());
        // Operands that do not fit each other are errors, not panics.
        assert!(lora_linear(&x0, &w.t().unwrap(), a.as_tensor(), b.as_tensor(), s, None).is_err());
        assert!(lora_linear(&x0, &w, b.as_tensor(), a.as_tensor(), s, None).is_err());
    }

    #[test]
    fn fused_losses_match_composed_ops_and_gradients() {
        let dev = Device::Cpu;
        let z = Var::from_tensor(&(Tensor::randn(0f32, 3., (4, 7), &dev).unwrap())).unwrap();
        let targets = [0u32, 6, 3, 3];
        let fused = token_cross_entropy(z.as_tensor(), &targets).unwrap();
        let logp = log_softmax_rows(z.as_tensor()).unwrap();
        let idx = Tensor::from_slice(&targets, (4, 1), &dev).unwrap();
        let composed = logp.gather(&idx, 1).unwrap().squeeze(1).unwrap().neg().unwrap();
        close(&fused, &composed, 1e-5);
        let w = Tensor::new(&[1f32, 2., 3., 4.], &dev).unwrap();
        let g1 = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
        close(g1.get(z.as_tensor()).unwrap(), g2.get(z.as_tensor()).unwrap(), 1e-5);

        let teacher = Tensor::randn(0f32, 3., (4, 7), &dev).unwrap();
        let t = 2.0;
        let fused = token_kl(z.as_tensor(), &teacher, t).unwrap();
        let p = candle_core::Tensor::exp(&log_softmax_rows(&(&teacher / t).unwrap()).unwrap()).unwrap();
        let logp = log_softmax_rows(&(&teacher / t).unwrap()).unwrap();
        let logq = log_softmax_rows(&(z.as_tensor() / t).unwrap()).unwrap();
        let composed = ((&p * (logp - logq).unwrap()).unwrap().sum(1).unwrap() * (t * t)).unwrap();
        close(&fused, &composed, 1e-5);
        let g1 = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
        close(g1.get(z.as_tensor()).unwrap(), g2.get(z.as_tensor()).unwrap(), 1e-5);
    }
}
