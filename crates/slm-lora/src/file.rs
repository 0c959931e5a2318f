//! The records `slm lora` writes, as typed structs read back through these types: `slm_lora.json` beside the
//! adapter ([`LoraRunFile`]) and `slm_plan.json` of a model merged from the adapters ([`MergedPlanFile`]: the
//! training run and the plan of the model it was trained on).

use std::path::Path;

use serde::{Deserialize, Serialize};
use slm_model::output::{OutputKind, OutputStamp};

use crate::{Format, LoraConfig, LoraError, Result, TrainConfig, TrainReport};

/// Validation losses before the first step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ValLoss {
    /// The objective's loss (LM cross-entropy, or KL when distilling).
    pub loss: f64,
    /// LM cross-entropy.
    pub lm_loss: f64,
}

/// Training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Next-token cross-entropy.
    Lm,
    /// KL to the teacher's token distributions.
    Distill,
    /// Hidden-state matching to the teacher's layers.
    Hidden,
    /// A weighted mix (see `objective_weights`).
    Mix,
}

impl Objective {
    /// The name of a set of weights: one term alone, or a mix.
    pub fn of(w: &crate::train::ObjectiveWeights) -> Self {
        match (w.lm > 0.0, w.kl > 0.0, w.hidden > 0.0) {
            (true, false, false) => Objective::Lm,
            (false, true, false) => Objective::Distill,
            (false, false, true) => Objective::Hidden,
            _ => Objective::Mix,
        }
    }
}

/// What a run trained: LoRA adapters, or chosen layers (every tensor of each) and optionally the final norm
/// with the LM head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Trained {
    /// `lora` or `layers`.
    pub kind: String,
    /// The fully tuned layers (indices of the trained model), for `layers`.
    #[serde(default)]
    pub layers: Vec<usize>,
    /// Whether the final norm and the LM head trained.
    #[serde(default)]
    pub head: bool,
}

/// `slm_lora.json`: what a LoRA run trained on, with which settings, and what it measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraRunFile {
    /// Kind `lora-run` and the layout's version.
    pub slm_output: OutputStamp,
    /// The model the adapters were trained on.
    pub source_model: String,
    /// The training data file.
    pub data: String,
    pub format: Format,
    /// Tokens per training sequence.
    pub cutoff: usize,
    pub lora: LoraConfig,
    /// What trained (absent in files of runs before full tuning existed: LoRA).
    #[serde(default)]
    pub trained: Option<Trained>,
    pub train: TrainConfig,
    pub objective: Objective,
    /// The weights of the objective's terms (absent in files of runs before the mix existed).
    #[serde(default)]
    pub objective_weights: Option<crate::train::ObjectiveWeights>,
    /// The teacher model of a distillation.
    pub teacher: Option<String>,
    /// Distillation temperature.
    pub temperature: Option<f64>,
    pub trainable_parameters: usize,
    pub val_before: Option<ValLoss>,
    pub report: TrainReport,
}

impl LoraRunFile {
    /// The file's name inside an adapter directory.
    pub const NAME: &'static str = "slm_lora.json";

    /// Reads `DIR/slm_lora.json`; another kind or version, or a field the type does not accept, is an error
    /// naming the file.
    pub fn read(dir: &Path) -> Result<Self> {
        slm_model::output::read_stamped_json(&dir.join(Self::NAME), OutputKind::LoraRun)
            .map_err(LoraError::InvalidArgument)
    }

    /// The file's bytes (pretty JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

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
    pub lora: LoraRunFile,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run_file() -> LoraRunFile {
        LoraRunFile {
            slm_output: OutputStamp::new(OutputKind::LoraRun),
            source_model: "m.gguf".into(),
            data: "d.jsonl".into(),
            format: Format::Text,
            cutoff: 64,
            lora: LoraConfig::default(),
            trained: Some(Trained { kind: "layers".into(), layers: vec![3, 4], head: true }),
            train: TrainConfig::default(),
            objective: Objective::Distill,
            objective_weights: Some(crate::train::ObjectiveWeights { lm: 0.0, kl: 1.0, hidden: 0.0 }),
            teacher: Some("dense".into()),
            temperature: Some(2.0),
            trainable_parameters: 10,
            val_before: Some(ValLoss { loss: 1.5, lm_loss: 2.5 }),
            report: TrainReport {
                steps: 0,
                train_examples: 0,
                val_examples: 0,
                history: vec![],
                best_step: None,
                best_val_loss: None,
                tokens: 0,
                seconds: 0.0,
                tokens_per_s: 0.0,
            },
        }
    }

    #[test]
    fn lora_run_file_round_trips_and_refuses_other_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let f = run_file();
        std::fs::write(dir.path().join(LoraRunFile::NAME), f.to_bytes()).unwrap();
        assert_eq!(LoraRunFile::read(dir.path()).unwrap(), f);
        let text = String::from_utf8(f.to_bytes()).unwrap();
        assert!(text.contains(r#""objective": "distill""#) && text.contains(r#""format": "text""#), "{text}");
        let other = text.replace(r#""kind": "lora-run""#, r#""kind": "merged-plan""#);
        std::fs::write(dir.path().join(LoraRunFile::NAME), other).unwrap();
        let e = LoraRunFile::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("slm_lora.json") && e.contains("a merged-plan file, not a lora-run file"), "{e}");
        let bad = text.replace(r#""objective": "distill""#, r#""objective": "rl""#);
        std::fs::write(dir.path().join(LoraRunFile::NAME), bad).unwrap();
        let e = LoraRunFile::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a valid lora-run file") && e.contains("rl"), "{e}");
    }
}
