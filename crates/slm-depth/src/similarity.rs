//! Layer-similarity analysis: linear CKA, cosine and angular distance between the outputs of every pair of
//! layers (heat maps of such matrices: the slm-plot crate).
//!
//! This is the analysis behind SLM's "patch-like" figure (spec §1a): consecutive layers whose outputs are
//! highly similar form blocks, which motivates merging runs of consecutive layers. It is not the criterion the
//! sliding-window search uses (that compares final-norm outputs with the dense model).
//!
//! Representations are not pooled over tokens: example `s` of layer `i` is the whole `[T, d]` output flattened to
//! one vector of length `T·d`, as in the reference's CKA hook and in "Transformer Layers as Painters".
//!
//! CKA: the reference feeds already-centred Gram matrices to an "unbiased" HSIC estimator, which then reduces to
//! `tr(K̃L̃)/(n(n−3))`; the scale cancels in the CKA ratio, so one batch of all `n` examples gives exactly the
//! biased linear CKA computed here (the reference additionally sums HSIC over minibatches of 16 and truncates
//! each to an integer).

use candle_core::{DType, Tensor};
use slm_model::{Mode, Model};

use crate::error::{DepthError, Result};

/// Windows per forward pass in [`layer_outputs`]: bounds the activation memory of one pass.
pub const LAYER_OUTPUT_BATCH: usize = 8;

/// The `L + 1` hidden states of `model` on `windows`: the embeddings, then each layer's output, each
/// `[N, T, hidden]` with `N = windows.len()`.
///
/// All windows must have the same length (no padding: a padded position would enter the flattened
/// representation). Windows run in batches of [`LAYER_OUTPUT_BATCH`].
pub fn layer_outputs(model: &Model, windows: &[Vec<u32>]) -> Result<Vec<Tensor>> {
    let Some(first) = windows.first() else {
        return Err(DepthError::InvalidArgument("layer outputs need at least one window".into()));
    };
    let t = first.len();
    if t == 0 || windows.iter().any(|w| w.len() != t) {
        return Err(DepthError::InvalidArgument(format!(
            "layer outputs need non-empty windows of equal length (first window has {t} tokens)"
        )));
    }
    let mut per_layer: Vec<Vec<Tensor>> = Vec::new();
    for (b, chunk) in windows.chunks(LAYER_OUTPUT_BATCH).enumerate() {
        tracing::debug!(batch = b, windows = chunk.len(), "layer outputs");
        let positions = vec![Vec::new(); chunk.len()];
        let out = model.forward(chunk, &positions, true, Mode::Inference)?;
        if per_layer.is_empty() {
            per_layer = vec![Vec::new(); out.hidden.len()];
        }
        for (acc, h) in per_layer.iter_mut().zip(out.hidden) {
            acc.push(h);
        }
    }
    per_layer
        .iter()
        .map(|parts| if parts.len() == 1 { Ok(parts[0].clone()) } else { Ok(Tensor::cat(parts, 0)?) })
        .collect()
}

/// `x` as `[n, p]` f64: a 2-D matrix stays as it is, `[n, T, d]` (or higher) is flattened per example.
fn as_examples(x: &Tensor) -> Result<Tensor> {
    let x = match x.rank() {
        0 | 1 => {
            return Err(DepthError::InvalidArgument(format!(
                "a representation needs an example dimension and features, got shape {:?}",
                x.dims()
            )))
        }
        2 => x.clone(),
        _ => x.flatten_from(1)?,
    };
    Ok(x.to_dtype(DType::F64)?.contiguous()?)
}

/// The centred linear Gram matrix `K̃ = H X Xᵀ H` (row-major `n × n`, f64) of the examples of `x`.
fn centred_gram(x: &Tensor) -> Result<(usize, Vec<f64>)> {
    let x = as_examples(x)?;
    let n = x.dim(0)?;
    if n < 2 {
        return Err(DepthError::InvalidArgument(format!(
            "CKA needs at least 2 examples, got {n} (centring one example leaves nothing)"
        )));
    }
    let k: Vec<Vec<f64>> = x.matmul(&x.t()?)?.to_vec2::<f64>()?;
    let row_mean: Vec<f64> = k.iter().map(|r| r.iter().sum::<f64>() / n as f64).collect();
    // K is symmetric, so column means equal row means.
    let grand = row_mean.iter().sum::<f64>() / n as f64;
    let mut c = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            c[i * n + j] = k[i][j] - row_mean[i] - row_mean[j] + grand;
        }
    }
    Ok((n, c))
}

/// `tr(AB)` for symmetric row-major `A`, `B` (the biased linear HSIC up to the factor `1/(n−1)²`).
fn trace_product(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// CKA from centred Grams and their self-HSIC values; 1.0 where the pair is the same representation.
fn cka_from(kl: f64, kk: f64, ll: f64) -> f64 {
    (kl / (kk * ll).sqrt()).clamp(0.0, 1.0)
}

fn check_variance(hsic_self: f64, what: &str) -> Result<()> {
    if hsic_self > 0.0 && hsic_self.is_finite() {
        Ok(())
    } else {
        Err(DepthError::InvalidArgument(format!(
            "CKA is undefined for {what}: its examples do not vary (centred Gram matrix is zero or not finite)"
        )))
    }
}

/// Biased linear CKA of `x: [n, p]` and `y: [n, q]` (same `n` examples; higher-rank inputs are flattened per
/// example): `tr(K̃L̃) / sqrt(tr(K̃K̃) tr(L̃L̃))` with `K = XXᵀ`, `L = YYᵀ`, `K̃ = HKH`, `H = I − 11ᵀ/n`.
///
/// It lies in `[0, 1]` and is invariant to isotropic scaling and orthogonal transforms of either feature space.
/// Sums are in f64.
pub fn linear_cka(x: &Tensor, y: &Tensor) -> Result<f64> {
    let (n, k) = centred_gram(x)?;
    let (m, l) = centred_gram(y)?;
    if n != m {
        return Err(DepthError::InvalidArgument(format!("CKA of {n} examples against {m}")));
    }
    let kk = trace_product(&k, &k);
    let ll = trace_product(&l, &l);
    check_variance(kk, "x")?;
    check_variance(ll, "y")?;
    Ok(cka_from(trace_product(&k, &l), kk, ll))
}

fn check_same_examples(hidden: &[Tensor]) -> Result<usize> {
    let Some(first) = hidden.first() else {
        return Err(DepthError::InvalidArgument("no representations".into()));
    };
    let n = first.dim(0)?;
    for (i, h) in hidden.iter().enumerate() {
        if h.dim(0)? != n {
            return Err(DepthError::InvalidArgument(format!(
                "representation {i} has {} examples, representation 0 has {n}",
                h.dim(0)?
            )));
        }
    }
    Ok(n)
}

/// Linear CKA between every pair of representations (e.g. the `L + 1` outputs of [`layer_outputs`], each
/// `[N, T, d]`, flattened per example). Symmetric, with a unit diagonal. One centred Gram matrix per layer.
pub fn cka_matrix(hidden: &[Tensor]) -> Result<Vec<Vec<f64>>> {
    check_same_examples(hidden)?;
    let grams: Vec<Vec<f64>> = hidden.iter().map(|h| centred_gram(h).map(|(_, g)| g)).collect::<Result<_>>()?;
    let selfs: Vec<f64> = grams.iter().map(|g| trace_product(g, g)).collect();
    for (i, s) in selfs.iter().enumerate() {
        check_variance(*s, &format!("representation {i}"))?;
    }
    let n = hidden.len();
    let mut m = vec![vec![0.0; n]; n];
    for i in 0..n {
        m[i][i] = 1.0;
        for j in i + 1..n {
            let v = cka_from(trace_product(&grams[i], &grams[j]), selfs[i], selfs[j]);
            m[i][j] = v;
            m[j][i] = v;
        }
    }
    Ok(m)
}

/// Mean over examples `s` of `cos(vec(h_i[s]), vec(h_j[s]))` for every pair of representations `i`, `j` (each
/// `[N, ...]`, flattened per example, as in "Transformer Layers as Painters"). Symmetric, with a unit diagonal; a
/// zero vector has cosine 0 with everything else.
pub fn cosine_matrix(hidden: &[Tensor]) -> Result<Vec<Vec<f64>>> {
    let n_examples = check_same_examples(hidden)?;
    let flat: Vec<Tensor> = hidden.iter().map(as_examples).collect::<Result<_>>()?;
    let p = flat[0].dim(1)?;
    if let Some((i, f)) = flat.iter().enumerate().find(|(_, f)| f.dim(1).ok() != Some(p)) {
        return Err(DepthError::InvalidArgument(format!(
            "representation {i} has {:?} features per example, representation 0 has {p}",
            f.dim(1).ok()
        )));
    }
    let n = hidden.len();
    let mut sum = vec![vec![0.0; n]; n];
    // One example at a time: stack its L+1 vectors and take their Gram matrix (bounded memory, one matmul).
    for s in 0..n_examples {
        let rows: Vec<Tensor> = flat.iter().map(|f| f.narrow(0, s, 1)).collect::<candle_core::Result<_>>()?;
        let stacked = Tensor::cat(&rows, 0)?;
        let g = stacked.matmul(&stacked.t()?)?.to_vec2::<f64>()?;
        let norm: Vec<f64> = (0..n).map(|i| g[i][i].max(0.0).sqrt()).collect();
        for i in 0..n {
            for j in 0..n {
                let d = norm[i] * norm[j];
                sum[i][j] += if i == j && d > 0.0 {
                    1.0
                } else if d > 0.0 {
                    (g[i][j] / d).clamp(-1.0, 1.0)
                } else {
                    0.0
                };
            }
        }
    }
    for i in 0..n {
        for j in i..n {
            let v = 0.5 * (sum[i][j] + sum[j][i]) / n_examples as f64;
            sum[i][j] = v;
            sum[j][i] = v;
        }
    }
    Ok(sum)
}

/// Angular distance `arccos(cos)/π` in `[0, 1]` (0: same direction, 0.5: orthogonal, 1: opposite).
pub fn angular_distance(cos: f64) -> f64 {
    cos.clamp(-1.0, 1.0).acos() / std::f64::consts::PI
}
