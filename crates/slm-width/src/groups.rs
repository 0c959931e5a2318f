//! Coupled units: what must be removed together so that the layer still computes a valid function.
//!
//! - **Attention unit** (grouped-query aware): KV head `g` together with the `rep = heads / kv_heads` query heads
//!   that read it, `g·rep .. (g+1)·rep` (HF's `repeat_kv` layout). It owns rows `g·hd .. (g+1)·hd` of k_proj and
//!   v_proj, the rows of its query heads in q_proj and the same columns of o_proj. For a plain multi-head layer
//!   (`rep = 1`) a unit is one head.
//! - In a layer with a **single KV head** and several query heads (Gemma-3-270M: 4 query heads over 1 KV head),
//!   removing the KV group would remove attention altogether, so there the unit is one **query head** (its q rows
//!   and o columns); the KV head stays. q/k norms act per head dimension and are never sliced; q/k/v bias entries
//!   go with their rows.
//! - **MLP unit**: channel `i`: row `i` of gate_proj and up_proj, column `i` of down_proj.
//!
//! RMSNorms, the embedding and the residual width are never touched.

use slm_model::LayerSpec;

use crate::{Result, WidthError};

/// The tensor indices owned by one attention unit of a layer (a KV head with its query heads, or one query
/// head of a single-KV layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionUnit {
    pub kv_head: usize,
    /// Query heads of the unit.
    pub query_heads: Vec<usize>,
    /// Rows of q_proj and columns of o_proj.
    pub q_channels: Vec<usize>,
    /// Rows of k_proj and of v_proj (empty for a query-head unit: the KV head stays).
    pub kv_channels: Vec<usize>,
}

impl AttentionUnit {
    /// Whether the layer's units are its query heads (one KV head shared by several query heads).
    pub fn per_query_head(l: &LayerSpec) -> bool {
        l.num_key_value_heads == 1 && l.num_attention_heads > 1
    }

    /// Attention units in the layer.
    pub fn count(l: &LayerSpec) -> usize {
        if Self::per_query_head(l) {
            l.num_attention_heads
        } else {
            l.num_key_value_heads
        }
    }

    /// What the units of the layer are, for messages.
    pub fn what(l: &LayerSpec) -> &'static str {
        if Self::per_query_head(l) {
            "query heads"
        } else {
            "KV heads"
        }
    }

    /// Unit `unit` of the layer: KV head `unit` and its query heads, or query head `unit` of a single-KV layer.
    pub fn new(l: &LayerSpec, unit: usize) -> Self {
        let hd = l.head_dim;
        if Self::per_query_head(l) {
            return AttentionUnit {
                kv_head: 0,
                query_heads: vec![unit],
                q_channels: (unit * hd..(unit + 1) * hd).collect(),
                kv_channels: vec![],
            };
        }
        let rep = l.group_size();
        let query_heads: Vec<usize> = (unit * rep..(unit + 1) * rep).collect();
        let q_channels = query_heads.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect();
        AttentionUnit { kv_head: unit, query_heads, q_channels, kv_channels: (unit * hd..(unit + 1) * hd).collect() }
    }

    /// Every attention unit of a layer, in order.
    pub fn all(l: &LayerSpec) -> Vec<Self> {
        (0..Self::count(l)).map(|g| Self::new(l, g)).collect()
    }

    /// The shape of layer `l` with only the units `kept` left.
    pub fn kept_shape(l: &LayerSpec, kept: usize) -> LayerSpec {
        if Self::per_query_head(l) {
            LayerSpec { num_attention_heads: kept, ..*l }
        } else {
            LayerSpec { num_attention_heads: kept * l.group_size(), num_key_value_heads: kept, ..*l }
        }
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
