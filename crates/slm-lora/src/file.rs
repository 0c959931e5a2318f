//! `slm_plan.json` of a model merged from LoRA adapters (`slm lora --merge`): the training run and the plan of
//! the model it was trained on, as a typed record.

use std::path::Path;

use serde::{Deserialize, Serialize};
use slm_model::output::{OutputKind, OutputStamp};

use crate::{LoraError, Result};

/// `slm_plan.json` of `OUT/merged`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergedPlanFile {
    /// Kind `merged-plan` and the layout's version.
    pub slm_output: OutputStamp,
    /// The model the adapters were trained on.
    pub base_model: String,
    /// The dense model that model was pruned from (from its own plan), the teacher of a later distillation.
    pub source_model: Option<String>,
    /// The run as `slm_lora.json` records it.
    pub lora: serde_json::Value,
    /// The base model's own `slm_plan.json` when it was an slm output, verbatim.
    pub base_plan: Option<serde_json::Value>,
}

impl MergedPlanFile {
    /// The typed record of a parsed `slm_plan.json`; another kind or version is an error naming the file.
    pub fn from_json(v: serde_json::Value, path: &Path) -> Result<Self> {
        slm_model::output::from_stamped_json(v, OutputKind::MergedPlan, path).map_err(LoraError::InvalidArgument)
    }

    /// The file's bytes (pretty JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}
