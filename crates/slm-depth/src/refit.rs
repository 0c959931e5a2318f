//! Least-squares re-fitting of merged layers on calibration activations.
//!
//! A layer of the pruned model stands in for a window `lo..=hi` of the dense model: the layers it was merged with,
//! and any removed layers up to the next kept one. After the plan is applied, each such layer's `down_proj` is
//! re-fitted, bottom-up, so that its output on the calibration windows matches the dense window's output: with `h` the pruned model's residual stream after the merged layer's attention and `A` its MLP
//! activations, solve the ridge problem
//!
//! `min_W ‖A Wᵀ − (Y_dense − h)‖² + λ‖W − W₀‖²`, i.e. `(AᵀA + λI) Wᵀ = Aᵀ(Y_dense − h) + λ W₀ᵀ`,
//!
//! pulled towards the original weights `W₀` (the calibration has fewer tokens than the MLP has channels), with
//! each token's row scaled by the inverse norm of its dense target so that every token weighs the same.
//! λ is `ridge · trace(AᵀA) / channels`. The first position of every window is left out of the fit: it carries
//! the attention-sink activation, thousands of times larger than the rest, which would dominate the squares.

use candle_core::{DType, Tensor};
use slm_model::forward::{attention_block, decoder_layer, mlp_activations, LayerCtx};
use slm_model::{Mode, Model};

use crate::error::{DepthError, Result};
use crate::plan::{apply, DepthPlan};
use crate::score::Calibration;

/// Solves `(G) X = B` for symmetric positive-definite `G` (`n×n`, row-major) and `B` (`n×m`), in place on `B`
/// (nalgebra's Cholesky factorisation).
pub fn cholesky_solve(g: &mut [f64], b: &mut [f64], n: usize, m: usize) -> Result<()> {
    if g.len() != n * n || b.len() != n * m {
        return Err(DepthError::InvalidArgument(format!(
            "refit: {} and {} entries for a {n}×{n} system with {m} right-hand sides",
            g.len(),
            b.len()
        )));
    }
    let chol = nalgebra::DMatrix::from_row_slice(n, n, g)
        .cholesky()
        .ok_or_else(|| DepthError::InvalidArgument("refit: the normal matrix is not positive definite".into()))?;
    let x = chol.solve(&nalgebra::DMatrix::from_row_slice(n, m, b));
    for i in 0..n {
        for c in 0..m {
            b[i * m + c] = x[(i, c)];
        }
    }
    Ok(())
}

/// Rows `[B·(T−1), C]` of `x: [B, T, C]` without each window's first position, in f64.
fn without_first_position(x: &Tensor) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    Ok(x.narrow(1, 1, t - 1)?.reshape((b * (t - 1), c))?.to_dtype(DType::F64)?)
}

/// Applies `plan` to the calibration's model and re-fits the `down_proj` of every layer that stands in for more
/// than itself (see the module
/// documentation). Returns the pruned model.
pub fn apply_with_refit(cal: &Calibration, plan: &DepthPlan, ridge: f64) -> Result<Model> {
    if !(ridge > 0.0) {
        return Err(DepthError::InvalidArgument(format!("refit ridge must be positive, got {ridge}")));
    }
    if cal.model().spec.arch.sandwich_norms {
        return Err(DepthError::InvalidArgument(
            "--refit solves for down_proj in `h + a·W`; with Gemma-3's norm after the MLP the layer output is not \
             linear in W, so refit is not available for this family"
                .into(),
        ));
    }
    let mut pruned = apply(cal.model(), plan)?;
    let batch = cal.batch();
    let mut x = cal.dense_hidden[0].clone();
    let out = plan.output_layers();
    for (j, &(lo, _)) in out.iter().enumerate() {
        // The dense layers this one now stands in for: up to the next kept layer (merged or removed ones between).
        let hi = out.get(j + 1).map(|n| n.0 - 1).unwrap_or(plan.num_layers - 1);
        if lo < hi {
            let (w, l) = (pruned.weights.layer(j)?.into_owned(), &pruned.spec.layers[j]);
            let w = &w;
            let ctx = LayerCtx::new(&pruned.spec, Mode::Inference).at(j);
            let h = attention_block(&x, w, l, batch, &ctx)?;
            let a = without_first_position(&mlp_activations(&h, w, &ctx)?)?;
            let r = without_first_position(&(&cal.dense_hidden[hi + 1] - &h)?)?;
            // Every token weighs the same: rows scaled by 1 / ‖dense target‖ (the residual stream's norm grows
            // by orders of magnitude on a few tokens, which would otherwise decide the fit alone).
            let scale = without_first_position(&cal.dense_hidden[hi + 1])?.sqr()?.sum_keepdim(1)?.sqrt()?.recip()?;
            let a = a.broadcast_mul(&scale)?;
            let r = r.broadcast_mul(&scale)?;
            let channels = a.dim(1)?;
            let hidden = r.dim(1)?;
            let mut g: Vec<f64> = a.t()?.matmul(&a)?.flatten_all()?.to_vec1()?;
            let trace: f64 = (0..channels).map(|i| g[i * channels + i]).sum();
            let lambda = ridge * trace / channels as f64;
            for i in 0..channels {
                g[i * channels + i] += lambda;
            }
            let w0t = w.down_proj.t()?.to_dtype(DType::F64)?; // [channels, hidden]
            let rhs = (a.t()?.matmul(&r)? + (w0t * lambda)?)?;
            let mut sol: Vec<f64> = rhs.flatten_all()?.to_vec1()?;
            cholesky_solve(&mut g, &mut sol, channels, hidden)?;
            let new_t = Tensor::from_vec(sol, (channels, hidden), &pruned.device)?;
            let new = new_t.t()?.to_dtype(DType::F32)?.contiguous()?;
            tracing::debug!(layer = j, lo, hi, lambda, "refitted down_proj");
            pruned.weights.layer_mut(j)?.down_proj = new;
        }
        let ctx = LayerCtx::new(&pruned.spec, Mode::Inference).at(j);
        x = decoder_layer(&x, &*pruned.weights.layer(j)?, &pruned.spec.layers[j], batch, &ctx)?;
    }
    Ok(pruned)
}
