//! Custom ops with hand-written backward passes, so training builds only the gradients it needs.
//!
//! candle's `matmul` backward always computes the gradient of both operands. For a frozen weight that is a second
//! full-size matmul per projection whose result is thrown away (PyTorch skips it for `requires_grad=False`).
//! [`frozen_linear`] (in `slm_model::fused`, shared with the width gradient pass) computes `x @ w^T` with a
//! backward that returns only `grad @ w`. The losses over the
//! vocabulary ([`token_cross_entropy`], [`token_kl`]) are fused row loops: one pass forward, one backward, no
//! `[N, vocab]` temporaries per elementary op.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;
use slm_model::fused::{f32_data, f32_slice, par_zip_map, sgemm, sgemm_new, times_w, times_wt};

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

/// Logit rows per chunk of [`head_objective`]: about 32 MiB of f32 logits at a time.
fn head_chunk_rows(vocab: usize) -> usize {
    ((8 << 20) / vocab.max(1)).max(1)
}

/// The KL term of [`head_objective`]: the teacher's logits at the same rows, its temperature and weight.
#[derive(Clone, Copy)]
pub struct KlTerm<'a> {
    /// The teacher's logits `[N, vocab]` at the scored rows.
    pub teacher: &'a Tensor,
    pub temperature: f64,
    pub weight: f64,
}

/// What [`HeadLoss`]'s forward pass keeps for its backward pass.
enum Kept {
    /// The rows' gradient `c @ head` (`[N, hidden]`): only the rows take a gradient.
    RowsGrad(Vec<f32>),
    /// The logits' gradient `c` (`[N, vocab]`): the head trains, so both products need it.
    LogitsGrad(Vec<f32>),
}

struct HeadLoss {
    targets: Vec<u32>,
    lm: f32,
    /// Teacher logits (f32, contiguous, on the CPU), temperature, weight.
    kl: Option<(Tensor, f32, f32)>,
    chunk: usize,
    rows_grad: bool,
    head_grad: bool,
    kept: std::sync::OnceLock<Kept>,
}

impl HeadLoss {
    /// One logit row `z` in, its loss out; `z` is replaced by the loss's gradient with respect to it, `c`.
    /// `p`, `q`: scratch rows of the vocabulary's size.
    fn row(&self, r: usize, z: &mut [f32], teacher: Option<&[f32]>, p: &mut [f32], q: &mut [f32]) -> f32 {
        let target = self.targets[r] as usize;
        let z_target = z[target];
        let mut loss = 0f64;
        // KL(p ‖ q) at temperature τ, times τ²: τ² (Σ p log p − Σ p z/τ + lse(z/τ)); its z-gradient τ (q − p).
        let kl = match (&self.kl, teacher) {
            (Some((_, tau, w)), Some(tl)) => {
                let (tau, w) = (*tau, *w);
                softmax_row(&tl[r * z.len()..(r + 1) * z.len()], tau, p);
                let neg_entropy: f64 = p.iter().filter(|&&x| x > 0.0).map(|&x| x as f64 * (x as f64).ln()).sum();
                let cross: f64 = p.iter().zip(z.iter()).map(|(&pj, &zj)| pj as f64 * (zj / tau) as f64).sum();
                let lse = softmax_row(z, tau, q) as f64;
                loss += (w * tau * tau) as f64 * (neg_entropy - cross + lse);
                Some((tau, w))
            }
            _ => None,
        };
        // Cross-entropy lse(z) − z_target; its z-gradient softmax(z) − onehot.
        if self.lm > 0.0 {
            loss += self.lm as f64 * (softmax_in_place(z, 1.0) as f64 - z_target as f64);
            z.iter_mut().for_each(|c| *c *= self.lm);
            z[target] -= self.lm;
        } else {
            z.fill(0.0);
        }
        if let Some((tau, w)) = kl {
            for ((c, &qj), &pj) in z.iter_mut().zip(q.iter()).zip(p.iter()) {
                *c += w * tau * (qj - pj);
            }
        }
        loss as f32
    }
}

impl CustomOp2 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-objective"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "head-objective")?;
        let w = f32_slice(s2, l2, "head-objective")?;
        let (n, h) = l1.shape().dims2()?;
        let v = l2.shape().dims2()?.0;
        let teacher = match &self.kl {
            Some((t, _, _)) => Some(f32_data(t)?),
            None => None,
        };
        let mut losses = vec![0f32; n];
        let mut rows_grad = if self.rows_grad && !self.head_grad { vec![0f32; n * h] } else { Vec::new() };
        let mut logits_grad = if self.head_grad { vec![0f32; n * v] } else { Vec::new() };
        let mut chunk_buf = if self.head_grad { Vec::new() } else { vec![0f32; self.chunk.min(n) * v] };
        let mut s = 0;
        while s < n {
            let len = self.chunk.min(n - s);
            let z = if self.head_grad { &mut logits_grad[s * v..(s + len) * v] } else { &mut chunk_buf[..len * v] };
            sgemm((len, v, h), z, false, &x[s * h..(s + len) * h], false, w, true, 1.0);
            z.par_chunks_mut(v).zip(losses[s..s + len].par_iter_mut()).enumerate().for_each_init(
                || (vec![0f32; v], vec![0f32; v]),
                |(p, q), (r, (z, loss))| *loss = self.row(s + r, z, teacher.as_deref(), p, q),
            );
            if self.rows_grad && !self.head_grad {
                // d loss_r / d rows_r = c_r @ W, scaled by the incoming gradient in the backward pass.
                sgemm((len, h, v), &mut rows_grad[s * h..(s + len) * h], false, z, false, w, false, 1.0);
            }
            s += len;
        }
        let kept = if self.head_grad {
            Some(Kept::LogitsGrad(logits_grad))
        } else if self.rows_grad {
            Some(Kept::RowsGrad(rows_grad))
        } else {
            None
        };
        if let Some(k) = kept {
            if self.kept.set(k).is_err() {
                candle_core::bail!("head-objective: the op ran forward twice");
            }
        }
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(
        &self,
        rows: &Tensor,
        head: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_vec1::<f32>()?;
        let (n, h) = rows.dims2()?;
        let v = head.dim(0)?;
        match self.kept.get() {
            Some(Kept::RowsGrad(c_w)) => {
                let mut dx = vec![0f32; n * h];
                dx.par_chunks_mut(h).zip(c_w.par_chunks(h)).zip(g.par_iter()).for_each(|((d, c), &g)| {
                    d.iter_mut().zip(c).for_each(|(d, &c)| *d = g * c);
                });
                Ok((Some(Tensor::from_vec(dx, (n, h), rows.device())?), None))
            }
            Some(Kept::LogitsGrad(c)) => {
                let (x, w) = (f32_data(rows)?, f32_data(head)?);
                let mut dx = if self.rows_grad { vec![0f32; n * h] } else { Vec::new() };
                let mut dw = vec![0f32; v * h];
                let mut scaled = vec![0f32; self.chunk.min(n) * v];
                let mut s = 0;
                while s < n {
                    let len = self.chunk.min(n - s);
                    let sc = &mut scaled[..len * v];
                    sc.par_chunks_mut(v)
                        .zip(c[s * v..(s + len) * v].par_chunks(v))
                        .zip(g[s..s + len].par_iter())
                        .for_each(|((o, c), &g)| o.iter_mut().zip(c).for_each(|(o, &c)| *o = g * c));
                    if self.rows_grad {
                        sgemm((len, h, v), &mut dx[s * h..(s + len) * h], false, sc, false, &w, false, 1.0);
                    }
                    // dW += (g ⊙ c)^T @ rows.
                    sgemm((v, h, len), &mut dw, s > 0, sc, true, &x[s * h..(s + len) * h], false, 1.0);
                    s += len;
                }
                let dx = if self.rows_grad { Some(Tensor::from_vec(dx, (n, h), rows.device())?) } else { None };
                Ok((dx, Some(Tensor::from_vec(dw, (v, h), head.device())?)))
            }
            None => candle_core::bail!("head-objective: backward through an op that took no gradient"),
        }
    }
}

/// The token terms of a training objective at the rows `rows: [N, hidden]` through the LM head `head: [vocab,
/// hidden]`, per row: `lm · CE(rows @ head^T, targets)` plus, with `kl`, `weight · τ² · KL(softmax(teacher/τ) ‖
/// softmax(logits/τ))`. `[N]`, without the `[N, vocab]` logits of the composition: [`head_chunk_rows`] rows at a
/// time, each chunk's logits turned into the losses and their gradient `c` while they are at hand. With a frozen
/// head (one that takes no gradient) the forward pass also forms the rows' gradient `c @ head` (`[N, hidden]`) and
/// keeps only that, so the softmax's memory is one chunk's whatever N; with a trained head it keeps `c` (`[N,
/// vocab]`, the size of the logits the composition keeps) and the backward pass forms both products. The head's
/// logits are formed once either way. The same values and gradients as the composition of [`token_cross_entropy`]
/// and [`token_kl`] over `rows @ head^T`, up to float rounding (tests); off the CPU, or for operands not stored in
/// f32, it is that composition.
pub fn head_objective(
    rows: &Tensor,
    head: &Tensor,
    targets: &[u32],
    lm: f64,
    kl: Option<KlTerm>,
) -> candle_core::Result<Tensor> {
    let (n, v) = (rows.dim(0)?, head.dim(0)?);
    if targets.len() != n || targets.iter().any(|&t| t as usize >= v) {
        candle_core::bail!("head-objective: {} targets for {n} rows of a {v}-token head", targets.len());
    }
    if rows.rank() != 2 || head.rank() != 2 || rows.dim(1)? != head.dim(1)? {
        candle_core::bail!("head-objective: rows {:?} against a head {:?}", rows.dims(), head.dims());
    }
    if let Some(k) = &kl {
        if k.teacher.dims() != [n, v] {
            candle_core::bail!(
                "head-objective: teacher logits {:?} for {n} rows of a {v}-token head",
                k.teacher.dims()
            );
        }
        if !(k.temperature > 0.0) {
            candle_core::bail!("head-objective: temperature {} is not positive", k.temperature);
        }
    }
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !(f32_cpu(rows) && f32_cpu(head) && kl.as_ref().is_none_or(|k| f32_cpu(k.teacher))) {
        let logits = if head.track_op() { rows.matmul(&head.t()?)? } else { frozen_linear(rows, head)? };
        let mut out = (token_cross_entropy(&logits, targets)? * lm)?;
        if let Some(k) = kl {
            out = (out + (token_kl(&logits, k.teacher, k.temperature)? * k.weight)?)?;
        }
        return Ok(out);
    }
    let op = HeadLoss {
        targets: targets.to_vec(),
        lm: lm as f32,
        kl: kl
            .map(|k| Ok::<_, candle_core::Error>((k.teacher.contiguous()?, k.temperature as f32, k.weight as f32)))
            .transpose()?,
        chunk: head_chunk_rows(v),
        rows_grad: rows.track_op(),
        head_grad: head.track_op(),
        kept: std::sync::OnceLock::new(),
    };
    rows.contiguous()?.apply_op2(&head.contiguous()?, op)
}

/// Per-row cross-entropy of the logits `rows @ head^T` without the `[N, vocab]` logits: [`head_objective`] with
/// the LM term alone.
pub fn head_cross_entropy(rows: &Tensor, head: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    head_objective(rows, head, targets, 1.0, None)
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
    fn head_objective_matches_the_composed_losses_and_their_gradients() {
        let dev = Device::Cpu;
        // 9000-token head: 932 rows per chunk, so 2000 rows take three chunks (the last partial).
        let (n, h, v) = (2000, 12, 9000);
        let x0 = Tensor::randn(0f32, 1., (n, h), &dev).unwrap();
        let w0 = Tensor::randn(0f32, 0.5, (v, h), &dev).unwrap();
        let teacher = Tensor::randn(0f32, 2., (n, v), &dev).unwrap();
        let targets: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
        let g = Tensor::from_vec((0..n).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<_>>(), n, &dev).unwrap();
        // (lm weight, KL (temperature, weight)), for a frozen and a trained head.
        let mixes = [(1.0, None), (0.0, Some((2.0, 1.0))), (0.5, Some((1.0, 2.0))), (1.0, Some((3.0, 0.25)))];
        for (lm, kl) in mixes {
            for trained in [false, true] {
                let (xv, wv) = (Var::from_tensor(&x0).unwrap(), Var::from_tensor(&w0).unwrap());
                let w = if trained { wv.as_tensor().clone() } else { w0.clone() };
                let term = kl.map(|(t, k)| KlTerm { teacher: &teacher, temperature: t, weight: k });
                let fused = head_objective(xv.as_tensor(), &w, &targets, lm, term).unwrap();
                // The composition, written out: log-softmax rows of the full logits.
                let logits = xv.as_tensor().matmul(&w.t().unwrap()).unwrap();
                let idx = Tensor::from_slice(&targets, (n, 1), &dev).unwrap();
                let ce = log_softmax_rows(&logits).unwrap().gather(&idx, 1).unwrap().squeeze(1).unwrap().neg().unwrap();
                let mut composed = (ce * lm).unwrap();
                if let Some((t, k)) = kl {
                    let logp = log_softmax_rows(&(&teacher / t).unwrap()).unwrap();
                    let logq = log_softmax_rows(&(&logits / t).unwrap()).unwrap();
                    let p = logp.exp().unwrap();
                    let kl = ((&p * (logp - logq).unwrap()).unwrap().sum(1).unwrap() * (t * t * k)).unwrap();
                    composed = (composed + kl).unwrap();
                }
                close(&fused, &composed, 2e-4);
                let g1 = (&fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (&composed * &g).unwrap().sum_all().unwrap().backward().unwrap();
                close(g1.get(xv.as_tensor()).unwrap(), g2.get(xv.as_tensor()).unwrap(), 1e-4);
                if trained {
                    close(g1.get(wv.as_tensor()).unwrap(), g2.get(wv.as_tensor()).unwrap(), 1e-3);
                } else {
                    assert!(g1.get(&w).is_none(), "a frozen head gets no gradient");
                }
                // Rows and head that take no gradient: the same losses.
                let plain = head_objective(&x0, &w0, &targets, lm, term).unwrap();
                assert_eq!(plain.to_vec1::<f32>().unwrap(), fused.to_vec1::<f32>().unwrap());
            }
        }
        let bad = |t: &Tensor, temp: f64| {
            head_objective(&x0, &w0, &targets, 1.0, Some(KlTerm { teacher: t, temperature: temp, weight: 1.0 }))
        };
        assert!(bad(&teacher.narrow(0, 0, n - 1).unwrap(), 1.0).is_err());
        assert!(bad(&teacher, 0.0).is_err());
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
