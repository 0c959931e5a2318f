//! Coupled units: what must be removed together so that the layer still computes a valid function.
//!
//! - **Attention unit** (grouped-query aware): KV head `g` together with the `rep = heads / kv_heads` query heads
//!   that read it, `g·rep .. (g+1)·rep` (HF's `repeat_kv` layout). It owns rows `g·hd .. (g+1)·hd` of k_proj and
//!   v_proj, the rows of its query heads in q_proj and the same columns of o_proj. For a plain multi-head layer
//!   (`rep = 1`) a unit is one head.
//! - **MLP unit**: channel `i`: row `i` of gate_proj and up_proj, column `i` of down_proj.
//!
//! RMSNorms, the embedding and the residual width are never touched.

use slm_model::LayerSpec;

use crate::{Result, WidthError};

/// The tensor indices owned by one KV head of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionUnit {
    pub kv_head: usize,
    /// Query heads that share this KV head.
    pub query_heads: Vec<usize>,
    /// Rows of q_proj and columns of o_proj.
    pub q_channels: Vec<usize>,
    /// Rows of k_proj and of v_proj.
    pub kv_channels: Vec<usize>,
}

impl AttentionUnit {
    pub fn new(l: &LayerSpec, kv_head: usize) -> Self {
        let (rep, hd) = (l.group_size(), l.head_dim);
        let query_heads: Vec<usize> = (kv_head * rep..(kv_head + 1) * rep).collect();
        let q_channels = query_heads.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect();
        AttentionUnit { kv_head, query_heads, q_channels, kv_channels: (kv_head * hd..(kv_head + 1) * hd).collect() }
    }

    /// Every attention unit of a layer, in KV-head order.
    pub fn all(l: &LayerSpec) -> Vec<Self> {
        (0..l.num_key_value_heads).map(|g| Self::new(l, g)).collect()
    }
}

/// How many of `n` units a pruning ratio removes: `n − ⌊n·(1 − ratio)⌋`, LLM-Pruner's local rule (0.25 of 32
/// heads removes 8; any positive ratio removes at least one unit). Errors when every unit would go.
pub fn units_to_remove(n: usize, ratio: f64, what: &str) -> Result<usize> {
    check_ratio(ratio)?;
    let keep = (n as f64 * (1.0 - ratio)).floor() as usize;
    if keep == 0 {
        return Err(WidthError::InvalidArgument(format!(
            "pruning ratio {ratio} would remove all {n} {what} of a layer (at least one must stay)"
        )));
    }
    Ok(n - keep.min(n))
}

/// A pruning ratio must lie in [0, 1).
pub fn check_ratio(ratio: f64) -> Result<()> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(WidthError::InvalidArgument(format!("pruning ratio must be in [0, 1), got {ratio}")));
    }
    Ok(())
}
