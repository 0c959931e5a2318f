//! Depth baselines that remove whole layers: ShortGPT (block influence), Shortened-LLaMA (perplexity without
//! each block), SLEB (greedy, re-scored after every removal). LaCo is a merge search (see [`crate::search::laco`]).

use candle_core::{DType, D};

use crate::error::{DepthError, Result};
use crate::score::{Calibration, Candidate};

/// ShortGPT's block influence of every layer: `1 − mean over tokens of cos(x_i, x_{i+1})`, with `x_i` the
/// residual stream entering layer i (the last layer's output taken before the final norm: the clean variant).
pub fn block_influence(cal: &Calibration) -> Result<Vec<f64>> {
    let h = &cal.dense_hidden;
    (0..h.len() - 1)
        .map(|i| {
            let (b, t, d) = h[i].dims3()?;
            let x = h[i].reshape((b * t, d))?.to_dtype(DType::F64)?;
            let y = h[i + 1].reshape((b * t, d))?.to_dtype(DType::F64)?;
            let cos = ((&x * &y)?.sum(D::Minus1)?
                / (x.sqr()?.sum(D::Minus1)?.sqrt()? * y.sqr()?.sum(D::Minus1)?.sqrt()?)?)?;
            let cos: Vec<f64> = cos.to_vec1()?;
            // ShortGPT sets NaN cosines (zero vectors) to 0.5.
            let mean = cos.iter().map(|c| if c.is_nan() { 0.5 } else { *c }).sum::<f64>() / cos.len() as f64;
            Ok(1.0 - mean)
        })
        .collect()
}

/// Indices of the `n` smallest scores (ties: lower index first).
fn lowest(scores: &[(usize, f64)], n: usize) -> Vec<usize> {
    let mut s = scores.to_vec();
    s.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    s.into_iter().take(n).map(|(i, _)| i).collect()
}

fn check_n(cal: &Calibration, n: usize, available: usize) -> Result<()> {
    if n == 0 || n > available || cal.num_layers() - n < 2 {
        return Err(DepthError::InvalidArgument(format!(
            "cannot remove {n} of {} layers (at most {} are candidates; at least two layers must remain)",
            cal.num_layers(),
            available.min(cal.num_layers().saturating_sub(2))
        )));
    }
    Ok(())
}

/// What a removal baseline decided: the layers removed, and the score of every layer it weighed.
pub type Removal = (Vec<usize>, Vec<(usize, f64)>);

/// ShortGPT: remove the `n` layers of lowest block influence, in one shot. Returns (removed, per-layer scores).
pub fn shortgpt(cal: &Calibration, n: usize) -> Result<Removal> {
    check_n(cal, n, cal.num_layers())?;
    let scores: Vec<(usize, f64)> = block_influence(cal)?.into_iter().enumerate().collect();
    Ok((lowest(&scores, n), scores))
}

/// Shortened-LLaMA's PPL criterion: the calibration perplexity of the dense model without each single block;
/// remove the `n` lowest. The "+" heuristic keeps blocks 0–3 and the last two out of the candidates.
pub fn shortened_ppl(cal: &mut Calibration, n: usize) -> Result<Removal> {
    let l = cal.num_layers();
    let candidates: Vec<usize> = (0..l).filter(|&i| i >= 4 && i + 2 < l).collect();
    check_n(cal, n, candidates.len())?;
    let mut scores = Vec::new();
    for i in candidates {
        scores.push((i, cal.perplexity(&Candidate::removed(vec![i]))?));
    }
    Ok((lowest(&scores, n), scores))
}

/// SLEB: `n` times, remove the alive block (never the first or last alive one) whose removal gives the lowest
/// calibration NLL, re-scoring after every removal. Returns (removed in order, NLL after each removal).
pub fn sleb(cal: &mut Calibration, n: usize) -> Result<Removal> {
    let l = cal.num_layers();
    check_n(cal, n, l.saturating_sub(2))?;
    let mut removed: Vec<usize> = Vec::new();
    let mut trace = Vec::new();
    for _ in 0..n {
        let alive: Vec<usize> = (0..l).filter(|i| !removed.contains(i)).collect();
        let mut best: Option<(usize, f64)> = None;
        for &j in &alive[1..alive.len() - 1] {
            let mut cand = removed.clone();
            cand.push(j);
            let nll = cal.nll(&Candidate::removed(cand))?;
            if best.is_none_or(|(_, b)| nll < b) {
                best = Some((j, nll));
            }
        }
        let (j, nll) = best.expect("at least one candidate");
        tracing::debug!(layer = j, nll, "SLEB removes a block");
        removed.push(j);
        trace.push((j, nll));
    }
    Ok((removed, trace))
}
