//! The files `slm run` writes and reads back, as typed, stamped records: the step marker (`slm_step.json`, the
//! key of a finished step) and the report (`report.json`). Each carries an `slm_output` stamp of its own kind, so
//! a marker or report of another slm version is refused by name instead of misread.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use slm_model::output::{read_stamped_json, OutputKind, OutputStamp};

/// Written into a step's directory when it finishes: its key (model and the arguments of every step up to it).
/// A later run of the schedule keeps a step whose marker has the same key instead of recomputing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMarker {
    /// Kind `step-marker` and the layout's version.
    pub slm_output: OutputStamp,
    pub key: String,
    /// The step's command line (after `slm`).
    pub argv: Vec<String>,
}

impl StepMarker {
    /// File name inside a step directory.
    pub const NAME: &'static str = "slm_step.json";

    pub fn new(key: String, argv: Vec<String>) -> Self {
        StepMarker { slm_output: OutputStamp::new(OutputKind::StepMarker), key, argv }
    }

    /// The marker in `dir`: None when there is none; an error naming the file when it is there but is not a
    /// marker of this version (the step is then recomputed, and the caller says why).
    pub fn read(dir: &Path) -> Option<Result<Self, String>> {
        let path = dir.join(Self::NAME);
        path.symlink_metadata().ok()?;
        Some(read_stamped_json(&path, OutputKind::StepMarker))
    }
}

/// One step of a pipeline as the report records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: String,
    pub dir: PathBuf,
    /// The step's command line (absent when it failed before one was built).
    pub argv: Option<Vec<String>>,
    /// Taken from another pipeline or a previous run instead of computed.
    pub reused: bool,
    pub seconds: f64,
    pub error: Option<String>,
}

/// A task's score in a report row: the metric the papers report for it and its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskScore {
    pub metric: String,
    pub value: f64,
}

/// One pipeline's row of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportRow {
    pub pipeline: String,
    pub budget: Option<f64>,
    pub depth_share: f64,
    pub steps: Vec<StepRecord>,
    pub error: Option<String>,
    /// The model the pipeline ended with (absent when it failed).
    pub final_model: Option<PathBuf>,
    pub layers: Option<usize>,
    pub parameters: Option<u64>,
    pub share_of_dense: Option<f64>,
    pub decode_tokens_per_s: Option<f64>,
    /// Task → score, from the eval steps that describe the final model.
    pub tasks: BTreeMap<String, TaskScore>,
    pub avg7: Option<f64>,
    pub wikitext2_128_ppl: Option<f64>,
    /// The results files those numbers come from.
    pub eval_results: Vec<PathBuf>,
}

/// `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Kind `run-report` and the layout's version.
    pub slm_output: OutputStamp,
    pub schedule: PathBuf,
    /// `params_vs_avg7.png`'s axes: parameters from, to; avg-7 from, to.
    pub plot_ranges: Option<[f64; 4]>,
    pub model: PathBuf,
    pub dense_parameters: u64,
    pub steps_computed: usize,
    pub steps_reused: usize,
    pub pipelines: Vec<ReportRow>,
}

impl RunReport {
    /// File name inside the run's output directory.
    pub const NAME: &'static str = "report.json";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        assert!(StepMarker::read(dir.path()).is_none(), "no marker, no answer");
        let m = StepMarker::new("model=m | depth".into(), vec!["depth".into(), "m".into()]);
        std::fs::write(dir.path().join(StepMarker::NAME), serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(StepMarker::read(dir.path()).unwrap().unwrap(), m);
        // An unstamped marker (an older slm's `{"key", "argv"}`) and one of another kind are refused by name.
        std::fs::write(dir.path().join(StepMarker::NAME), br#"{"key": "k", "argv": []}"#).unwrap();
        let e = StepMarker::read(dir.path()).unwrap().unwrap_err();
        assert!(e.contains("slm_step.json") && e.contains("no `slm_output` stamp"), "{e}");
        let other = serde_json::json!({"slm_output": {"kind": "run-report", "version": 1}, "key": "k", "argv": []});
        std::fs::write(dir.path().join(StepMarker::NAME), other.to_string()).unwrap();
        let e = StepMarker::read(dir.path()).unwrap().unwrap_err();
        assert!(e.contains("a run-report file, not a step-marker file"), "{e}");
        std::fs::write(dir.path().join(StepMarker::NAME), b"{").unwrap();
        assert!(StepMarker::read(dir.path()).unwrap().unwrap_err().contains("not valid JSON"));
    }
}
