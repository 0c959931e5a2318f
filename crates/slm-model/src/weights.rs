//! Plain tensors per layer, in the HF Llama layout (`[out_features, in_features]` for projections).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::spec::{LayerSpec, ModelSpec};

/// The seven projections of a decoder layer, in HF order. Methods that touch "every projection" (merging,
/// LoRA) iterate over this.
pub const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub input_layernorm: Tensor,
    pub q_proj: Tensor,
    pub k_proj: Tensor,
    pub v_proj: Tensor,
    pub o_proj: Tensor,
    pub post_attention_layernorm: Tensor,
    pub gate_proj: Tensor,
    pub up_proj: Tensor,
    pub down_proj: Tensor,
}

impl LayerWeights {
    /// (HF name suffix, tensor) pairs, e.g. `("self_attn.q_proj.weight", q)`.
    pub fn named(&self) -> [(&'static str, &Tensor); 9] {
        [
            ("input_layernorm.weight", &self.input_layernorm),
            ("self_attn.q_proj.weight", &self.q_proj),
            ("self_attn.k_proj.weight", &self.k_proj),
            ("self_attn.v_proj.weight", &self.v_proj),
            ("self_attn.o_proj.weight", &self.o_proj),
            ("post_attention_layernorm.weight", &self.post_attention_layernorm),
            ("mlp.gate_proj.weight", &self.gate_proj),
            ("mlp.up_proj.weight", &self.up_proj),
            ("mlp.down_proj.weight", &self.down_proj),
        ]
    }

    /// The HF name suffixes in the order of [`LayerWeights::named`].
    pub fn named_suffixes() -> [&'static str; 9] {
        [
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ]
    }

    /// Projection by its short name (one of [`PROJECTIONS`]).
    pub fn projection(&self, name: &str) -> Option<&Tensor> {
        Some(match name {
            "q_proj" => &self.q_proj,
            "k_proj" => &self.k_proj,
            "v_proj" => &self.v_proj,
            "o_proj" => &self.o_proj,
            "gate_proj" => &self.gate_proj,
            "up_proj" => &self.up_proj,
            "down_proj" => &self.down_proj,
            _ => return None,
        })
    }

    /// Shapes implied by a layer spec, in the order of [`LayerWeights::named`].
    pub fn expected_shapes(l: &LayerSpec, hidden: usize) -> [Vec<usize>; 9] {
        let q = l.num_attention_heads * l.head_dim;
        let kv = l.num_key_value_heads * l.head_dim;
        let i = l.intermediate_size;
        [
            vec![hidden],
            vec![q, hidden],
            vec![kv, hidden],
            vec![kv, hidden],
            vec![hidden, q],
            vec![hidden],
            vec![i, hidden],
            vec![i, hidden],
            vec![hidden, i],
        ]
    }

    fn map(&self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Self> {
        Ok(LayerWeights {
            input_layernorm: f(&self.input_layernorm)?,
            q_proj: f(&self.q_proj)?,
            k_proj: f(&self.k_proj)?,
            v_proj: f(&self.v_proj)?,
            o_proj: f(&self.o_proj)?,
            post_attention_layernorm: f(&self.post_attention_layernorm)?,
            gate_proj: f(&self.gate_proj)?,
            up_proj: f(&self.up_proj)?,
            down_proj: f(&self.down_proj)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Weights {
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    /// `None` when the LM head is tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
}

impl Weights {
    /// The LM head matrix `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Every tensor under its HF name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.clone())];
        for (i, layer) in self.layers.iter().enumerate() {
            for (suffix, t) in layer.named() {
                out.push((format!("model.layers.{i}.{suffix}"), t.clone()));
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        out
    }

    /// Builds weights from HF-named f32 tensors, checking every shape against `spec`. `path` names the source
    /// in errors.
    pub fn from_named(spec: &ModelSpec, mut tensors: HashMap<String, Tensor>, path: &Path) -> Result<Self> {
        let mut take = |name: &str, expected: &[usize]| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| ModelError::MissingTensor { path: path.to_path_buf(), name: name.to_string() })?;
            if t.dims() != expected {
                return Err(ModelError::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    expected: expected.to_vec(),
                    actual: t.dims().to_vec(),
                });
            }
            Ok(t)
        };
        let (v, h) = (spec.vocab_size, spec.hidden_size);
        let embed_tokens = take("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(spec.layers.len());
        for (i, l) in spec.layers.iter().enumerate() {
            let shapes = LayerWeights::expected_shapes(l, h);
            let mut get = |k: usize, suffix: &str| take(&format!("model.layers.{i}.{suffix}"), &shapes[k]);
            layers.push(LayerWeights {
                input_layernorm: get(0, "input_layernorm.weight")?,
                q_proj: get(1, "self_attn.q_proj.weight")?,
                k_proj: get(2, "self_attn.k_proj.weight")?,
                v_proj: get(3, "self_attn.v_proj.weight")?,
                o_proj: get(4, "self_attn.o_proj.weight")?,
                post_attention_layernorm: get(5, "post_attention_layernorm.weight")?,
                gate_proj: get(6, "mlp.gate_proj.weight")?,
                up_proj: get(7, "mlp.up_proj.weight")?,
                down_proj: get(8, "mlp.down_proj.weight")?,
            });
        }
        let norm = take("model.norm.weight", &[h])?;
        let lm_head = if spec.tie_word_embeddings {
            // Some tied checkpoints still carry a copy of the head; it is the embedding by definition.
            tensors.remove("lm_head.weight");
            None
        } else {
            Some(take("lm_head.weight", &[v, h])?)
        };
        if let Some(extra) = tensors.keys().find(|k| k.starts_with("model.layers.")) {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{extra}` belongs to no layer of the config ({} layers): config and weights disagree",
                    spec.layers.len()
                ),
            });
        }
        Ok(Weights { embed_tokens, layers, norm, lm_head })
    }

    /// The same weights on another device / in another dtype.
    pub fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        let f = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
        Ok(Weights {
            embed_tokens: f(&self.embed_tokens)?,
            layers: self.layers.iter().map(|l| l.map(f)).collect::<candle_core::Result<_>>()?,
            norm: f(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(f).transpose()?,
        })
    }
}
