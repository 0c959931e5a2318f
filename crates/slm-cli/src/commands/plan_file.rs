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
    parse_plan(v, &path).map(Some)
}

/// A plan from its JSON, by its `slm_output` stamp; `path` names the file in errors.
fn parse_plan(v: serde_json::Value, path: &Path) -> anyhow::Result<PlanFile> {
    let stamp: Option<OutputStamp> = v.get(STAMP_KEY).and_then(|s| serde_json::from_value(s.clone()).ok());
    Ok(match stamp.map(|s| s.kind) {
        Some(OutputKind::DepthPlan) => PlanFile::Depth(Box::new(DepthPlanFile::from_json(v, path)?)),
        Some(OutputKind::WidthPlan) => PlanFile::Width(Box::new(WidthPlanFile::from_json(v, path)?)),
        Some(OutputKind::MergedPlan) => PlanFile::Merged(Box::new(MergedPlanFile::from_json(v, path)?)),
        Some(other) => anyhow::bail!("{}: a {} file, not a model plan", path.display(), other.name()),
        None => anyhow::bail!(
            "{}: no `{STAMP_KEY}` stamp naming a depth-plan, width-plan or merged-plan (written by an older slm?)",
            path.display()
        ),
    })
}

/// The chain of plans behind a model, newest first: its own plan, then the plan of the model that step was run on
/// (a width plan's `previous_plan`, a merged model's `base_plan`), and so on. Empty without a plan. At most 64
/// steps deep (a longer chain is refused rather than followed).
pub fn plan_chain(model: &Path) -> anyhow::Result<Vec<PlanFile>> {
    const MAX_STEPS: usize = 64;
    let path = model.join(PLAN_FILE);
    let mut chain: Vec<PlanFile> = read_plan(model)?.into_iter().collect();
    while let Some(last) = chain.last() {
        let earlier = match last {
            PlanFile::Depth(_) => None,
            PlanFile::Width(p) => p.previous_plan.clone(),
            PlanFile::Merged(p) => p.base_plan.clone(),
        };
        let Some(v) = earlier else { break };
        if chain.len() == MAX_STEPS {
            anyhow::bail!("{}: more than {MAX_STEPS} nested plans", path.display());
        }
        let step = parse_plan(v, &path).with_context(|| format!("{}: an earlier step's plan", path.display()))?;
        chain.push(step);
    }
    Ok(chain)
}

/// The dense model at the start of a model's chain of slm steps (the source of the oldest plan), the teacher of a
/// distillation: for depth then width it is the model the depth step pruned, not the depth step's output.
pub fn dense_source(chain: &[PlanFile]) -> Option<&str> {
    chain.iter().rev().find_map(|p| p.source_model())
}

/// The depth plan in a model's chain, which says which dense layers each layer stands for (width and LoRA steps
/// keep the layer count). None without a depth step; two depth steps in one chain are an error (their layer maps
/// would have to be composed).
pub fn depth_plan<'a>(chain: &'a [PlanFile], model: &Path) -> anyhow::Result<Option<&'a DepthPlanFile>> {
    let mut plans = chain.iter().filter_map(|p| match p {
        PlanFile::Depth(d) => Some(d.as_ref()),
        _ => None,
    });
    let first = plans.next();
    if plans.next().is_some() {
        anyhow::bail!(
            "{}: its chain of plans holds two depth steps; which dense layer each layer stands for is not recorded",
            model.join(PLAN_FILE).display()
        );
    }
    Ok(first)
}
