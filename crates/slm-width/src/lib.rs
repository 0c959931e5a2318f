//! `slm-width`: LLM-Pruner-style structured width pruning (Ma, Fang & Wang, NeurIPS 2023, arXiv 2305.11627;
//! reference code `horseee/LLM-Pruner`, see the project specs, `width-lora-and-depth-baselines.md` §A).
//!
//! - [`groups`]: the coupled units that are removed whole: one KV head with the query heads that share it (rows
//!   of q/k/v, columns of o), and one MLP channel (a row of gate and up, a column of down).
//! - [`importance`]: the gradient pass on calibration windows (first-order gradients, and the per-sample
//!   empirical Fisher diagonal for the second-order term) and the Taylor scores element¹, element², vector, plus
//!   the L2-magnitude and random baselines.
//! - [`plan`]: a per-layer ratio over a layer range gives a [`WidthPlan`] (which units go, with their scores);
//!   [`apply`] slices the tensors and leaves layers of different widths.
//!
//! Depth is never touched: a depth-pruned model goes in as any other model.

pub mod file;
pub mod groups;
pub mod importance;
pub mod plan;

pub use file::WidthPlanFile;
pub use groups::{units_to_remove, AttentionUnit};
pub use importance::{
    gradient_scores, gradients, gradients_whole_graph, Aggregation, Gradients, Importance, ScoredGradients, UnitScores,
};
pub use plan::{
    apply, check_layer_range, default_layer_range, parameters_after, parse_layer_range, plan_width, plan_width_scored,
    ratio_for_target, ratio_for_target_rounded, LayerPrune, Ratios, WidthPlan, WidthSettings,
};

/// Everything that can go wrong while planning or applying width pruning.
#[derive(Debug, thiserror::Error)]
pub enum WidthError {
    /// A user-supplied setting outside its valid range (ratio, layer range, importance name).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("model: {0}")]
    Model(#[from] slm_model::ModelError),

    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, WidthError>;
