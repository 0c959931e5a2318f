//! `slm_plan.json` of a width-pruned model, as a typed record written by `slm width` and read back through this
//! type. A file of another kind or version is refused by [`WidthPlanFile::from_json`].

use std::path::Path;

use serde::{Deserialize, Serialize};
use slm_model::calib::CalibrationRecord;
use slm_model::output::{OutputKind, OutputStamp};
use slm_model::LayerSpec;

use crate::importance::{Aggregation, Importance};
use crate::plan::{Ratios, WidthPlan};
use crate::{Result, WidthError};

/// What the gradient pass cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradientPassRecord {
    pub loss: f64,
    pub backward_passes: usize,
    pub seconds: f64,
    pub rss_mib_before: Option<f64>,
    pub rss_mib_after: Option<f64>,
    pub peak_rss_mib: Option<f64>,
}

/// `slm_plan.json` of `slm width`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WidthPlanFile {
    /// Kind `width-plan` and the layout's version.
    pub slm_output: OutputStamp,
    /// Always `llm-pruner`.
    pub method: String,
    pub importance: Importance,
    pub aggregation: Aggregation,
    pub pruning_ratio: Ratios,
    pub target_ratio: Option<f64>,
    /// `[start, end)` of the pruned layers.
    pub layer_range: [usize; 2],
    pub plan: WidthPlan,
    /// Every layer's shape after pruning.
    pub layers: Vec<LayerSpec>,
    pub parameters_before: usize,
    pub parameters_after: usize,
    pub parameter_reduction: f64,
    pub parameter_reduction_in_pruned_layers: f64,
    /// None for importances without gradients (l2, random).
    pub calibration: Option<CalibrationRecord>,
    pub gradient_pass: Option<GradientPassRecord>,
    /// The model the plan was computed on.
    pub source_model: String,
    /// The input's own `slm_plan.json` when it was an slm output (a depth plan in a joint schedule), verbatim.
    pub previous_plan: Option<serde_json::Value>,
}

impl WidthPlanFile {
    /// The typed record of a parsed `slm_plan.json`; another kind or version is an error naming the file.
    pub fn from_json(v: serde_json::Value, path: &Path) -> Result<Self> {
        slm_model::output::from_stamped_json(v, OutputKind::WidthPlan, path).map_err(WidthError::InvalidArgument)
    }

    /// The file's bytes (pretty JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}
