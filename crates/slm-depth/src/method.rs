//! One entry point for every depth method: calibration in, [`DepthPlan`] out, with what the search saw.

use serde::{Deserialize, Serialize};
use slm_model::ModelSpec;

use crate::baselines;
use crate::error::{DepthError, Result};
use crate::merge::MergeOp;
use crate::plan::DepthPlan;
use crate::score::{Calibration, Candidate, Criterion};
use crate::search::{dp_windows, laco, sliding_merge, threshold_for_target, SearchResult, Step};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Sliding layer merging (the seed paper).
    Slm,
    /// Windows of consecutive layers fused with the chosen operator, like SLM, but chosen jointly: the set of
    /// windows that removes the target number of layers at the least total local window cost
    /// ([`Calibration::window_cost`]), by dynamic programming ([`dp_windows`]).
    #[serde(rename = "slm-dp")]
    SlmDp,
    /// Remove the layers of lowest block influence.
    ShortGpt,
    /// LaCo's layer collapse.
    Laco,
    /// Greedy removal by calibration NLL, re-scored after each removal.
    Sleb,
    /// Shortened-LLaMA: remove the blocks whose single removal hurts calibration perplexity least.
    Ppl,
}

impl Method {
    pub const ALL: [Method; 6] =
        [Method::Slm, Method::SlmDp, Method::ShortGpt, Method::Laco, Method::Sleb, Method::Ppl];

    pub fn name(self) -> &'static str {
        match self {
            Method::Slm => "slm",
            Method::SlmDp => "slm-dp",
            Method::ShortGpt => "shortgpt",
            Method::Laco => "laco",
            Method::Sleb => "sleb",
            Method::Ppl => "ppl",
        }
    }

    /// Methods that merge windows (and so use a merge operator and a criterion).
    pub fn merges(self) -> bool {
        matches!(self, Method::Slm | Method::SlmDp | Method::Laco)
    }

    /// The merge operator used unless one is given: `top` for slm-dp (best measured, README depth table),
    /// the reference's operator for the others.
    pub fn default_merge(self) -> MergeOp {
        if self == Method::SlmDp {
            MergeOp::Top
        } else {
            MergeOp::Reference
        }
    }

    /// The similarity criterion used unless one is given: `kl` picks among slm-dp's proposals, the reference's
    /// flattened cosine elsewhere.
    pub fn default_criterion(self) -> Criterion {
        if self == Method::SlmDp {
            Criterion::Kl
        } else {
            Criterion::Cosine
        }
    }

    /// Methods that a similarity threshold can stop; the others remove a number of layers.
    pub fn takes_threshold(self) -> bool {
        matches!(self, Method::Slm | Method::Laco)
    }
}

impl std::str::FromStr for Method {
    type Err = DepthError;
    fn from_str(s: &str) -> Result<Self> {
        Method::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            DepthError::InvalidArgument(format!(
                "unknown depth method `{s}` (known: slm, slm-dp, shortgpt, laco, sleb, ppl)"
            ))
        })
    }
}

/// When to stop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    /// Merge while the score stays above this (SLM, LaCo only).
    Threshold(f64),
    /// Remove this many layers (threshold found by search for SLM and LaCo).
    TargetLayers(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub method: Method,
    pub stop: Stop,
    pub criterion: Criterion,
    /// LaCo: layers per merge (base + followers) and the step after a merge.
    pub laco_layers: usize,
    pub laco_interval: usize,
}

impl Settings {
    pub fn new(method: Method, stop: Stop) -> Self {
        Settings { method, stop, criterion: Criterion::Cosine, laco_layers: 4, laco_interval: 2 }
    }
}

/// A plan and what led to it.
#[derive(Debug, Clone)]
pub struct DepthOutcome {
    pub plan: DepthPlan,
    /// The threshold used (given, or found by the target search).
    pub threshold: Option<f64>,
    /// Merge searches: every scored window of the final search.
    pub steps: Vec<Step>,
    /// Ranking methods: the per-layer scores (block influence, PPL, or SLEB's NLL after each removal).
    pub layer_scores: Vec<(usize, f64)>,
    /// Candidate evaluations of the final search as the reference loop counts them.
    pub reference_evaluations: usize,
    /// slm-dp: the plan proposed under each window-length cap, and its score.
    pub dp_candidates: Vec<DpCandidate>,
}

/// One plan proposed by slm-dp's dynamic programme.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpCandidate {
    /// Longest window allowed (layers).
    pub max_window: usize,
    pub merges: Vec<[usize; 2]>,
    /// Sum of the windows' local costs.
    pub cost_sum: f64,
    /// The plan's similarity to the dense model under the criterion.
    pub score: f64,
}

/// Layers to remove so that the share of parameters removed is closest to `ratio` (layers counted at their mean
/// size). Errors for a ratio outside (0, 1) or one that leaves fewer than two layers.
pub fn layers_for_ratio(spec: &ModelSpec, ratio: f64) -> Result<usize> {
    if !(ratio > 0.0 && ratio < 1.0) {
        return Err(DepthError::InvalidArgument(format!("target ratio must be in (0, 1), got {ratio}")));
    }
    let l = spec.num_layers();
    let per_layer = spec.layers.iter().map(|s| spec.layer_parameters(s)).sum::<usize>() as f64 / l as f64;
    let n = (ratio * spec.num_parameters() as f64 / per_layer).round() as usize;
    check_target(l, n.max(1))?;
    Ok(n.max(1))
}

/// A target of `n` removed layers must remove one and leave two.
pub fn check_target(num_layers: usize, n: usize) -> Result<()> {
    if n == 0 || n + 2 > num_layers {
        return Err(DepthError::InvalidArgument(format!(
            "cannot remove {n} of {num_layers} layers: at least one must go and at least two must remain"
        )));
    }
    Ok(())
}

/// Decides a depth plan on `cal` (whose operator is used by the merge methods).
pub fn plan_depth(cal: &mut Calibration, s: &Settings) -> Result<DepthOutcome> {
    let l = cal.num_layers();
    let op = cal.operator();
    match s.stop {
        Stop::TargetLayers(n) => check_target(l, n)?,
        Stop::Threshold(_) if !s.method.takes_threshold() => {
            return Err(DepthError::InvalidArgument(format!(
                "`{}` removes a number of layers: give --target-layers or --target-ratio, not --threshold",
                s.method.name()
            )))
        }
        Stop::Threshold(_) => {}
    }
    if s.method == Method::SlmDp {
        let Stop::TargetLayers(n) = s.stop else { unreachable!("refused above") };
        // Summed local costs favour one long window over several short ones (the stream entering a long window
        // can still point the same way as the stream leaving it), so the DP is run for every window-length cap and
        // the global criterion (against the dense model) picks among the plans it proposes.
        let mut candidates: Vec<DpCandidate> = Vec::new();
        let mut costs = std::collections::BTreeMap::new(); // every window the DP weighed
        for max_window in 2..=n + 1 {
            let mut cost = |lo: usize, hi: usize| {
                let c = cal.window_cost(lo, hi)?;
                costs.insert((lo, hi), c);
                Ok(c)
            };
            let Some((mut merges, cost_sum)) = dp_windows(l, n, max_window, &mut cost)? else {
                continue; // windows this short cannot remove n layers
            };
            merges.sort(); // as the plan lists them
            if candidates.iter().any(|c| c.merges == merges) {
                continue;
            }
            let score = cal.similarity(s.criterion, &Candidate::merges(merges.clone()))?;
            candidates.push(DpCandidate { max_window, merges, cost_sum, score });
        }
        // Highest score; ties go to the shorter cap (found first).
        let best = candidates
            .iter()
            .fold(None::<&DpCandidate>, |b, c| match b {
                Some(b) if b.score >= c.score => Some(b),
                _ => Some(c),
            })
            .expect("at least one cap");
        let steps = costs
            .into_iter()
            .map(|((lo, hi), score)| Step { lo, hi, score, passed: best.merges.contains(&[lo, hi]) })
            .collect();
        return Ok(DepthOutcome {
            plan: DepthPlan::new(l, best.merges.clone(), Vec::new(), op)?,
            threshold: None,
            steps,
            layer_scores: Vec::new(),
            reference_evaluations: 0,
            dp_candidates: candidates,
        });
    }
    if s.method.merges() {
        let criterion = s.criterion;
        let (c, interval) = (s.laco_layers, s.laco_interval);
        let method = s.method;
        let mut oracle = |m: &[[usize; 2]]| cal.similarity(criterion, &Candidate::merges(m.to_vec()));
        let mut search = |t: f64| -> Result<SearchResult> {
            match method {
                Method::Slm => sliding_merge(l, t, &mut oracle),
                _ => laco(l, t, c, interval, 1, &mut oracle),
            }
        };
        let (threshold, result) = match s.stop {
            Stop::Threshold(t) => (t, search(t)?),
            Stop::TargetLayers(n) => threshold_for_target(n, &mut search)?,
        };
        let plan = DepthPlan::new(l, result.merges.clone(), Vec::new(), op)?;
        return Ok(DepthOutcome {
            plan,
            threshold: Some(threshold),
            steps: result.steps,
            layer_scores: Vec::new(),
            reference_evaluations: result.reference_evaluations,
            dp_candidates: Vec::new(),
        });
    }
    let Stop::TargetLayers(n) = s.stop else { unreachable!("refused above") };
    let (removed, layer_scores) = match s.method {
        Method::ShortGpt => baselines::shortgpt(cal, n)?,
        Method::Ppl => baselines::shortened_ppl(cal, n)?,
        Method::Sleb => baselines::sleb(cal, n)?,
        Method::Slm | Method::SlmDp | Method::Laco => unreachable!("merge methods handled above"),
    };
    Ok(DepthOutcome {
        plan: DepthPlan::new(l, Vec::new(), removed, MergeOp::Delete)?,
        threshold: None,
        steps: Vec::new(),
        layer_scores,
        reference_evaluations: 0,
        dp_candidates: Vec::new(),
    })
}
