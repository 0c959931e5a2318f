//! `slm_plan.json` of a depth-pruned model: what `slm depth` decided and measured, as a typed record. It is
//! written beside the model and read back through this type (by `slm run`'s heat maps, `slm lora --distill`'s
//! teacher lookup, a later width step), never through string paths into untyped JSON. A file of another kind or
//! version is refused by [`DepthPlanFile::from_json`].

use std::path::Path;

use serde::{Deserialize, Serialize};
use slm_model::calib::CalibrationRecord;
use slm_model::output::{OutputKind, OutputStamp};

use crate::error::{DepthError, Result};
use crate::merge::MergeOp;
use crate::method::{DpCandidate, Method, Stop};
use crate::plan::DepthPlan;
use crate::score::Criterion;
use crate::search::Step;

/// How the search was told to stop, as recorded: `{"threshold": T}` or `{"target_layers": N}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopRecord {
    Threshold(f64),
    TargetLayers(usize),
}

impl From<Stop> for StopRecord {
    fn from(s: Stop) -> Self {
        match s {
            Stop::Threshold(t) => StopRecord::Threshold(t),
            Stop::TargetLayers(n) => StopRecord::TargetLayers(n),
        }
    }
}

/// What the search saw and cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchRecord {
    pub steps: Vec<Step>,
    pub layer_scores: Vec<(usize, f64)>,
    pub dp_candidates: Vec<DpCandidate>,
    pub evaluations: u64,
    pub reference_loop_evaluations: usize,
    pub layer_forwards: u64,
    pub layer_forwards_full_recompute: u64,
    pub incremental: bool,
    pub seconds: f64,
}

/// `slm_plan.json` of `slm depth`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthPlanFile {
    /// Kind `depth-plan` and the layout's version.
    pub slm_output: OutputStamp,
    pub method: Method,
    /// The merge operator (merging methods only).
    pub operator: Option<MergeOp>,
    /// The similarity criterion (merging methods only).
    pub criterion: Option<Criterion>,
    /// The threshold used (given, or found by the target search).
    pub threshold: Option<f64>,
    pub stop: StopRecord,
    pub plan: DepthPlan,
    /// `(lo, hi)` of the original layers each output layer stands for.
    pub kept_layers: Vec<(usize, usize)>,
    pub refit_ridge: Option<f64>,
    pub layers_before: usize,
    pub layers_after: usize,
    pub parameters_before: usize,
    pub parameters_after: usize,
    pub parameter_reduction: f64,
    pub calibration: CalibrationRecord,
    pub search: SearchRecord,
    /// The model the plan was computed on (the teacher of a later distillation).
    pub source_model: String,
}

impl DepthPlanFile {
    /// The typed record of a parsed `slm_plan.json`; another kind or version is an error naming the file.
    pub fn from_json(v: serde_json::Value, path: &Path) -> Result<Self> {
        slm_model::output::from_stamped_json(v, OutputKind::DepthPlan, path).map_err(DepthError::InvalidArgument)
    }

    /// The file's bytes (pretty JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}
