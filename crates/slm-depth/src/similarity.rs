//! Layer-similarity analysis: linear CKA, cosine and angular distance between the outputs of every pair of
//! layers, and heat maps of such matrices.
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

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use slm_model::{Mode, Model};

use crate::error::{DepthError, Result};

/// Windows per forward pass in [`layer_outputs`]: bounds the activation memory of one pass.
pub const LAYER_OUTPUT_BATCH: usize = 8;

/// Side of one matrix cell in [`write_heatmap_png`], in pixels.
pub const HEATMAP_CELL_PX: u32 = 16;
/// White gap between the matrix and the colour bar, in pixels.
pub const HEATMAP_GAP_PX: u32 = 8;
/// Width of the colour bar (top = `hi`, bottom = `lo`), in pixels.
pub const HEATMAP_BAR_PX: u32 = 16;

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

/// Pixel size `(width, height)` of the heat map of an `n × n` matrix written by [`write_heatmap_png`].
pub fn heatmap_size(n: usize) -> (u32, u32) {
    let side = n as u32 * HEATMAP_CELL_PX;
    (side + HEATMAP_GAP_PX + HEATMAP_BAR_PX, side)
}

/// Viridis sampled at 0, 1/8, ..., 1 (matplotlib's table); linear interpolation between the stops.
const VIRIDIS: [[f64; 3]; 9] = [
    [68.0, 1.0, 84.0],
    [71.0, 44.0, 122.0],
    [59.0, 81.0, 139.0],
    [44.0, 113.0, 142.0],
    [33.0, 144.0, 141.0],
    [39.0, 173.0, 129.0],
    [92.0, 200.0, 99.0],
    [170.0, 220.0, 50.0],
    [253.0, 231.0, 37.0],
];

/// The viridis colour of `t` in `[0, 1]` (clamped).
pub fn viridis(t: f64) -> [u8; 3] {
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (VIRIDIS.len() - 1) as f64;
    let k = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - k as f64;
    let (a, b) = (VIRIDIS[k], VIRIDIS[k + 1]);
    [0, 1, 2].map(|c| (a[c] + f * (b[c] - a[c])).round() as u8)
}

/// Colour of a non-finite cell.
const MISSING: [u8; 3] = [128, 128, 128];

/// Writes `m` (square) as a PNG heat map: [`HEATMAP_CELL_PX`]-pixel cells, row 0 at the top, column 0 at the
/// left, values mapped linearly from `[lo, hi]` onto viridis (dark = `lo`, yellow = `hi`; values outside are
/// clamped, non-finite ones grey), and a colour bar on the right running from `hi` (top) to `lo` (bottom).
/// No text (the build has no font support). Written atomically: rendered to a temporary file in the same
/// directory, then renamed.
pub fn write_heatmap_png(path: &Path, m: &[Vec<f64>], lo: f64, hi: f64) -> Result<()> {
    write_heatmap_png_marked(path, m, lo, hi, &[])
}

/// [`write_heatmap_png`] with a red outline around each diagonal block `[a, b]` of `groups` (e.g. the layer
/// windows a depth plan merges).
pub fn write_heatmap_png_marked(path: &Path, m: &[Vec<f64>], lo: f64, hi: f64, groups: &[(usize, usize)]) -> Result<()> {
    let out_err = |message: String| DepthError::Output { path: path.to_path_buf(), message };
    let n = m.len();
    if n == 0 {
        return Err(out_err("cannot draw an empty matrix".into()));
    }
    if let Some((i, r)) = m.iter().enumerate().find(|(_, r)| r.len() != n) {
        return Err(out_err(format!("row {i} has {} entries in a {n}×{n} matrix", r.len())));
    }
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return Err(DepthError::InvalidArgument(format!("heat map range [{lo}, {hi}] is empty or not finite")));
    }
    let (w, h) = heatmap_size(n);
    let cell = HEATMAP_CELL_PX as usize;
    let (wu, hu) = (w as usize, h as usize);
    let mut rgb = vec![255u8; wu * hu * 3];
    let mut put = |x: usize, y: usize, c: [u8; 3]| {
        let o = (y * wu + x) * 3;
        rgb[o..o + 3].copy_from_slice(&c);
    };
    for (i, row) in m.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let c = if v.is_finite() { viridis((v - lo) / (hi - lo)) } else { MISSING };
            for y in i * cell..(i + 1) * cell {
                for x in j * cell..(j + 1) * cell {
                    put(x, y, c);
                }
            }
        }
    }
    for &(a, b) in groups {
        if a > b || b >= n {
            return Err(DepthError::InvalidArgument(format!("group [{a}, {b}] is outside the {n}×{n} heat map")));
        }
        let (x0, x1) = (a * cell, (b + 1) * cell - 1);
        for t in x0..=x1 {
            for d in 0..2.min(cell) {
                put(t, x0 + d, [230, 30, 30]);
                put(t, x1 - d, [230, 30, 30]);
                put(x0 + d, t, [230, 30, 30]);
                put(x1 - d, t, [230, 30, 30]);
            }
        }
    }
    let bar_x = n * cell + HEATMAP_GAP_PX as usize;
    for y in 0..hu {
        let t = if hu > 1 { 1.0 - y as f64 / (hu - 1) as f64 } else { 1.0 };
        let c = viridis(t);
        for x in bar_x..bar_x + HEATMAP_BAR_PX as usize {
            put(x, y, c);
        }
    }
    write_png(path, (w, h), &rgb)
}

/// Writes an RGB buffer (`w·h·3` bytes, row-major) as a PNG, atomically (temporary file, then rename).
pub fn write_png(path: &Path, (w, h): (u32, u32), rgb: &[u8]) -> Result<()> {
    let out_err = |message: String| DepthError::Output { path: path.to_path_buf(), message };
    if rgb.len() != (w as usize) * (h as usize) * 3 {
        return Err(out_err(format!("{} bytes for a {w}×{h} RGB image", rgb.len())));
    }
    let tmp = temp_path(path);
    let result = encode_png(&tmp, (w, h), rgb).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| format!("cannot move {} into place: {e}", tmp.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(out_err)
}

/// A temporary name beside `path`, still ending in `.png`: the encoder picks the format from the extension.
fn temp_path(path: &Path) -> PathBuf {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    parent.join(format!(".{name}.tmp-{}.png", std::process::id()))
}

fn encode_png(path: &Path, (w, h): (u32, u32), rgb: &[u8]) -> std::result::Result<(), String> {
    use plotters::backend::{BitMapBackend, DrawingBackend};
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let mut backend = BitMapBackend::new(path, (w, h));
    backend.blit_bitmap((0, 0), (w, h), rgb).map_err(|e| format!("cannot draw: {e}"))?;
    backend.present().map_err(|e| format!("cannot write PNG: {e}"))
}
