//! slm-depth: depth pruning. Sliding layer merging (SLM) and the depth baselines (ShortGPT, LaCo, SLEB,
//! Shortened-LLaMA PPL) each decide a [`DepthPlan`] (plain data: which original layers merge, which go);
//! [`apply`] turns a plan into a model with fewer layers. Candidates are scored on calibration windows against the
//! dense model ([`Calibration`], incremental from the lowest changed layer). Layer-similarity analysis (linear
//! CKA, cosine, angular distance) lives in [`similarity`].

pub mod baselines;
pub mod error;
pub mod file;
pub mod merge;
pub mod method;
pub mod plan;
pub mod refit;
pub mod score;
pub mod search;
pub mod similarity;

pub use error::DepthError;
pub use file::DepthPlanFile;
pub use merge::{merge_window, MergeOp};
pub use method::{layers_for_ratio, plan_depth, DepthOutcome, DpCandidate, Method, Settings, Stop};
pub use plan::{apply, planned_layers, DepthPlan};
pub use score::{Calibration, Candidate, Criterion};
pub use search::{dp_windows, laco, sliding_merge, threshold_for_target, Oracle, SearchResult, Step};
