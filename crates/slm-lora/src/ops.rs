//! Custom ops with hand-written backward passes, so training builds only the gradients it needs.
//!
//! candle's `matmul` backward always computes the gradient of both operands. For a frozen weight that is a second
//! full-size matmul per projection whose result is thrown away (PyTorch skips it for `requires_grad=False`).
//! [`frozen_linear`] (in `slm_model::fused`, shared with the width gradient pass) computes `x @ w^T` with a
//! backward that returns only `grad @ w`. The losses over the
//! vocabulary ([`token_cross_entropy`], [`token_kl`]) are fused row loops: one pass forward, one backward, no
//! `[N, vocab]` temporaries per elementary op.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use rayon::prelude::*;
use slm_model::fused::f32_slice;

pub use slm_model::fused::frozen_linear;

/// Per-row log-sum-exp of `logits[r] / t` and the row's softmax.
fn softmax_row(row: &[f32], t: f32, out: &mut [f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) / t;
    let mut sum = 0f64;
    for (o, &v) in out.iter_mut().zip(row) {
        let e = (v / t - max).exp();
        *o = e;
        sum += e as f64;
    }
    let inv = (1.0 / sum) as f32;
    out.iter_mut().for_each(|o| *o *= inv);
    max + (sum as f32).ln()
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
}

impl HeadCrossEntropy {
    /// Runs `f(start, logits)` for each chunk of rows of `x: [N, hidden]`, `logits: [rows, vocab]` as a vector.
    fn chunks(
        &self,
        x: &Tensor,
        mut f: impl FnMut(usize, Vec<f32>) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        let n = x.dim(0)?;
        let mut s = 0;
        while s < n {
            let len = self.chunk.min(n - s);
            let logits = x.narrow(0, s, len)?.matmul(&self.w.t()?)?;
            f(s, logits.flatten_all()?.to_vec1::<f32>()?)?;
            s += len;
        }
        Ok(())
    }
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = Tensor::from_slice(f32_slice(s, l, "head-cross-entropy")?, l.shape(), &Device::Cpu)?;
        let (n, v) = (x.dim(0)?, self.w.dim(0)?);
        let mut losses = vec![0f32; n];
        self.chunks(&x, |start, logits| {
            let rows = logits.len() / v;
            losses[start..start + rows].par_iter_mut().enumerate().for_each_init(
                || vec![0f32; v],
                |tmp, (r, loss)| {
                    let row = &logits[r * v..(r + 1) * v];
                    *loss = softmax_row(row, 1.0, tmp) - row[self.targets[start + r] as usize];
                },
            );
            Ok(())
        })?;
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_vec1::<f32>()?;
        let v = self.w.dim(0)?;
        let mut parts = Vec::new();
        self.chunks(arg, |start, mut logits| {
            let rows = logits.len() / v;
            logits.par_chunks_mut(v).enumerate().for_each_init(
                || vec![0f32; v],
                |tmp, (r, row)| {
                    softmax_row(row, 1.0, tmp);
                    tmp[self.targets[start + r] as usize] -= 1.0;
                    let gr = g[start + r];
                    row.iter_mut().zip(tmp.iter()).for_each(|(o, p)| *o = p * gr);
                },
            );
            // d loss / d rows = (softmax − onehot) · g @ W.
            parts.push(Tensor::from_vec(logits, (rows, v), &Device::Cpu)?.matmul(&self.w)?);
            Ok(())
        })?;
        Ok(Some(Tensor::cat(&parts, 0)?.to_device(arg.device())?))
    }
}

/// Per-row cross-entropy of the logits `rows @ head^T` (`rows: [N, hidden]`, a frozen `head: [vocab, hidden]`)
/// without the `[N, vocab]` logits: [`head_chunk_rows`] rows at a time forward, and again in the backward pass
/// (the logits recomputed, then `(softmax − onehot) @ head`), so the memory of the 49,152-way softmax is one
/// chunk's whatever N. The gradient flows to `rows` only. The same values as
/// `token_cross_entropy(rows @ head^T)` up to float rounding (tests). Off the CPU, or for a head not stored in f32,
/// it is that composition.
pub fn head_cross_entropy(rows: &Tensor, head: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let (n, v) = (rows.dim(0)?, head.dim(0)?);
    if targets.len() != n || targets.iter().any(|&t| t as usize >= v) {
        candle_core::bail!("head-cross-entropy: {} targets for {n} rows of a {v}-token head", targets.len());
    }
    if !rows.device().is_cpu() || head.dtype() != candle_core::DType::F32 || rows.dtype() != candle_core::DType::F32 {
        return token_cross_entropy(&frozen_linear(rows, head)?, targets);
    }
    rows.contiguous()?.apply_op1(HeadCrossEntropy {
        w: head.contiguous()?,
        targets: targets.to_vec(),
        chunk: head_chunk_rows(v),
    })
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
