//! Searches over merge windows: the sliding-window loop of the SLM reference code, LaCo's loop, and the
//! threshold search behind `--target-layers` / `--target-ratio`.

use crate::error::{DepthError, Result};

/// Scores a candidate given as its full list of merge windows `[lo, hi]` (original indices).
pub trait Oracle {
    fn score(&mut self, merges: &[[usize; 2]]) -> Result<f64>;
}

impl<F: FnMut(&[[usize; 2]]) -> Result<f64>> Oracle for F {
    fn score(&mut self, merges: &[[usize; 2]]) -> Result<f64> {
        self(merges)
    }
}

/// One step of a search: the candidate window, its score, whether it passed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Step {
    pub lo: usize,
    pub hi: usize,
    pub score: f64,
    pub passed: bool,
}

/// What a search decided.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchResult {
    /// Committed windows, top first.
    pub merges: Vec<[usize; 2]>,
    /// Every scored candidate, in order.
    pub steps: Vec<Step>,
    /// Candidate evaluations the reference loop performs, one-layer no-op windows included.
    pub reference_evaluations: usize,
}

pub fn check_threshold(threshold: f64) -> Result<()> {
    if !(threshold > 0.0 && threshold <= 1.0) {
        return Err(DepthError::InvalidArgument(format!("threshold must be in (0, 1], got {threshold}")));
    }
    Ok(())
}

/// The SLM reference loop: from the top (`hi = L − 2`; the last layer is never merged), grow the window `[lo, hi]`
/// downward while the candidate's score is strictly above `threshold`; when it fails, commit the last window that
/// passed if it has at least two layers and restart below it, else slide down by one. A window still open when `lo`
/// passes layer 0 is not committed (as in the reference).
pub fn sliding_merge(num_layers: usize, threshold: f64, oracle: &mut dyn Oracle) -> Result<SearchResult> {
    check_threshold(threshold)?;
    let mut out = SearchResult { merges: Vec::new(), steps: Vec::new(), reference_evaluations: 0 };
    if num_layers < 3 {
        return Ok(out);
    }
    let mut hi = num_layers as isize - 2;
    let mut lo = hi - 1;
    while lo >= 0 {
        out.reference_evaluations += 1;
        let passed = if lo == hi {
            // The reference scores this one-layer window, i.e. the committed model, which has already passed.
            true
        } else {
            let mut cand = out.merges.clone();
            cand.push([lo as usize, hi as usize]);
            let score = oracle.score(&cand)?;
            let passed = score > threshold;
            out.steps.push(Step { lo: lo as usize, hi: hi as usize, score, passed });
            passed
        };
        if passed {
            lo -= 1;
        } else if lo + 1 != hi {
            out.merges.push([(lo + 1) as usize, hi as usize]);
            hi = lo;
        } else {
            hi -= 1;
            lo -= 1;
        }
    }
    Ok(out)
}

/// LaCo's loop (Yang et al. 2024, official notebooks): with `c` layers per merge (the base and `c − 1` followers),
/// start at `ℓ = L − 1 − c`; if merging `ℓ..ℓ+c−1` of the current model scores above `threshold`, keep it and
/// move down by `interval`, else move down by one; stop below `lowest`. Windows are reported on the original
/// layers (a merge that takes in an earlier merge becomes one larger window).
pub fn laco(
    num_layers: usize,
    threshold: f64,
    c: usize,
    interval: usize,
    lowest: usize,
    oracle: &mut dyn Oracle,
) -> Result<SearchResult> {
    check_threshold(threshold)?;
    if c < 2 || interval < 1 {
        return Err(DepthError::InvalidArgument(format!("LaCo needs c ≥ 2 and interval ≥ 1 (got {c}, {interval})")));
    }
    // Each current layer as its window of original layers.
    let mut current: Vec<(usize, usize)> = (0..num_layers).map(|i| (i, i)).collect();
    let mut steps = Vec::new();
    let mut evaluations = 0;
    let merges_of = |cur: &[(usize, usize)]| -> Vec<[usize; 2]> {
        cur.iter().filter(|(lo, hi)| lo < hi).map(|&(lo, hi)| [lo, hi]).collect()
    };
    let mut l = num_layers as isize - 1 - c as isize;
    while l >= lowest as isize {
        let base = l as usize;
        let followers = (c - 1).min(current.len() - base - 1);
        if followers == 0 {
            l -= 1;
            continue;
        }
        let window = (current[base].0, current[base + followers].1);
        let mut cand: Vec<(usize, usize)> = current[..base].to_vec();
        cand.push(window);
        cand.extend_from_slice(&current[base + followers + 1..]);
        let score = oracle.score(&merges_of(&cand))?;
        evaluations += 1;
        let passed = score > threshold;
        steps.push(Step { lo: window.0, hi: window.1, score, passed });
        if passed {
            current = cand;
            l -= interval as isize;
            if l >= current.len() as isize {
                l = current.len() as isize - 1 - c as isize;
            }
        } else {
            l -= 1;
        }
    }
    let mut merges = merges_of(&current);
    merges.reverse();
    Ok(SearchResult { merges, steps, reference_evaluations: evaluations })
}

/// Layers removed by a set of windows.
pub fn removed_by(merges: &[[usize; 2]]) -> usize {
    merges.iter().map(|[lo, hi]| hi - lo).sum()
}

/// Finds a threshold in (0, 1] whose search removes `target` layers, by bisection (lower thresholds remove
/// more). The removed count need not be monotone in the threshold; if no probe hits `target` exactly, the probe
/// closest to it wins (ties: fewer layers removed). Returns (threshold, result).
pub fn threshold_for_target(
    target: usize,
    mut search: impl FnMut(f64) -> Result<SearchResult>,
) -> Result<(f64, SearchResult)> {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let mut best: Option<(f64, SearchResult)> = None;
    let better = |r: &SearchResult, b: &Option<(f64, SearchResult)>| match b {
        None => true,
        Some((_, br)) => {
            let (d, bd) = (removed_by(&r.merges).abs_diff(target), removed_by(&br.merges).abs_diff(target));
            d < bd || (d == bd && removed_by(&r.merges) < removed_by(&br.merges))
        }
    };
    for probe in 0..40 {
        let t = if probe == 0 { 1.0 } else { (lo + hi) / 2.0 };
        let r = search(t)?;
        let removed = removed_by(&r.merges);
        tracing::debug!(threshold = t, removed, "threshold probe");
        if better(&r, &best) {
            best = Some((t, r));
        }
        if removed == target {
            break;
        }
        if removed > target {
            lo = t;
        } else {
            hi = t;
        }
    }
    Ok(best.expect("at least one probe"))
}

/// The windows of at most `max_window` layers, disjoint and inside layers `0..=L−2` (the last layer is never
/// merged, as in the reference), that together remove exactly `target` layers (a window `[lo, hi]` removes
/// `hi − lo`) at the least total cost, found by dynamic programming over `cost(lo, hi)`; `None` when windows that short cannot remove `target`. Unlike the sliding loop, no window is committed before all the
/// others are weighed. Costs must be finite and ≥ 0; each window's cost is asked for once, in a fixed order. Ties
/// go to leaving the lower layer alone, then to the shorter window, so the result is deterministic. Returns the
/// windows (top first) and the total cost.
pub fn dp_windows(
    num_layers: usize,
    target: usize,
    max_window: usize,
    cost: &mut dyn FnMut(usize, usize) -> Result<f64>,
) -> Result<Option<(Vec<[usize; 2]>, f64)>> {
    if max_window < 2 {
        return Err(DepthError::InvalidArgument(format!(
            "a merge window has at least 2 layers, got a maximum of {max_window}"
        )));
    }
    crate::method::check_target(num_layers, target)?;
    let top = num_layers - 2; // highest layer a window may reach
                              // Costs of every window that removes at most `target` layers and has at most `max_window` layers.
    let span = target.min(max_window - 1);
    let mut costs = std::collections::HashMap::new();
    for lo in 0..top {
        for hi in lo + 1..=top.min(lo + span) {
            let c = cost(lo, hi)?;
            if !(c.is_finite() && c >= 0.0) {
                return Err(DepthError::InvalidArgument(format!(
                    "window [{lo}, {hi}] has cost {c}; costs must be finite and ≥ 0"
                )));
            }
            costs.insert((lo, hi), c);
        }
    }
    // best[i][r]: least cost of windows inside layers i..=top that remove exactly r layers, and the first choice
    // (None: layer i stays alone; Some(hi): window [i, hi]).
    let inf = f64::INFINITY;
    let mut best = vec![vec![(inf, None::<usize>); target + 1]; top + 2];
    best[top + 1][0].0 = 0.0;
    best[top][0].0 = 0.0;
    for i in (0..top).rev() {
        for r in 0..=target {
            let mut b = (best[i + 1][r].0, None);
            for hi in i + 1..=top.min(i + r.min(span)) {
                let rest = best[hi + 1][r - (hi - i)].0;
                let v = costs[&(i, hi)] + rest;
                if v < b.0 {
                    b = (v, Some(hi));
                }
            }
            best[i][r] = b;
        }
    }
    let total = best[0][target].0;
    if !total.is_finite() {
        return Ok(None);
    }
    let (mut windows, mut i, mut r) = (Vec::new(), 0, target);
    while r > 0 {
        match best[i][r].1 {
            Some(hi) => {
                windows.push([i, hi]);
                r -= hi - i;
                i = hi + 1;
            }
            None => i += 1,
        }
    }
    windows.reverse();
    Ok(Some((windows, total)))
}
