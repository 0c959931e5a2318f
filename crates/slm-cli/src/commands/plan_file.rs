//! Reading a model's `slm_plan.json` back through the type of the command that wrote it (depth, width or a LoRA
//! merge), chosen by the file's `slm_output` stamp. A file of an unknown kind or version is a clear error.

use std::path::Path;

use anyhow::Context;
use slm_depth::DepthPlanFile;
use slm_lora::file::MergedPlanFile;
use slm_model::output::{OutputKind, OutputStamp, STAMP_KEY};
use slm_width::WidthPlanFile;

/// File name of the plan inside a model directory.
pub const PLAN_FILE: &str = "slm_plan.json";

/// A model's plan, of whichever kind wrote it.
#[derive(Debug, Clone)]
pub enum PlanFile {
    Depth(Box<DepthPlanFile>),
    Width(Box<WidthPlanFile>),
    Merged(Box<MergedPlanFile>),
}

impl PlanFile {
    /// The model the plan was computed on (for a merged model, the dense model its base was pruned from).
    pub fn source_model(&self) -> Option<&str> {
        match self {
            PlanFile::Depth(p) => Some(&p.source_model),
            PlanFile::Width(p) => Some(&p.source_model),
            PlanFile::Merged(p) => p.source_model.as_deref(),
        }
    }

    /// The plan as JSON (to be kept inside a later step's plan).
    pub fn to_value(&self) -> serde_json::Value {
        match self {
            PlanFile::Depth(p) => serde_json::to_value(p),
            PlanFile::Width(p) => serde_json::to_value(p),
            PlanFile::Merged(p) => serde_json::to_value(p),
        }
        .unwrap_or_default()
    }
}

/// The plan of the model at `model` (a directory), or None when it has no `slm_plan.json` (a model slm did not
/// write, or a GGUF file). A plan that is there but not readable as its kind is an error.
pub fn read_plan(model: &Path) -> anyhow::Result<Option<PlanFile>> {
    let path = model.join(PLAN_FILE);
    if !model.is_dir() || !path.exists() {
        return Ok(None);
    }
    let bytes = slm_model::files::read_regular_file(&path, 256 << 20)?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let stamp: Option<OutputStamp> = v.get(STAMP_KEY).and_then(|s| serde_json::from_value(s.clone()).ok());
    Ok(Some(match stamp.map(|s| s.kind) {
        Some(OutputKind::DepthPlan) => PlanFile::Depth(Box::new(DepthPlanFile::from_json(v, &path)?)),
        Some(OutputKind::WidthPlan) => PlanFile::Width(Box::new(WidthPlanFile::from_json(v, &path)?)),
        Some(OutputKind::MergedPlan) => PlanFile::Merged(Box::new(MergedPlanFile::from_json(v, &path)?)),
        Some(other) => anyhow::bail!("{}: a {} file, not a model plan", path.display(), other.name()),
        None => anyhow::bail!(
            "{}: no `{STAMP_KEY}` stamp naming a depth-plan, width-plan or merged-plan (written by an older slm?)",
            path.display()
        ),
    }))
}
