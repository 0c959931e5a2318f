//! Model shapes: global dimensions plus one [`LayerSpec`] per layer, because pruning in width leaves layers of
//! different widths. Parsed from and written to an HF `config.json` (Llama key names).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{ModelError, Result};

/// Shape of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSpec {
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
}

impl LayerSpec {
    /// Query heads per KV head (grouped-query attention).
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Parameters of this layer: two RMSNorm weights, q/k/v/o and gate/up/down (no biases in Llama).
    pub fn num_parameters(&self, hidden_size: usize) -> usize {
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        2 * hidden_size + hidden_size * (2 * q + 2 * kv) + 3 * hidden_size * self.intermediate_size
    }
}

/// Global dimensions and the per-layer shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub layers: Vec<LayerSpec>,
}

impl ModelSpec {
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// True when every layer has the same shape (a plain Llama config describes the model).
    pub fn is_uniform(&self) -> bool {
        self.layers.windows(2).all(|w| w[0] == w[1])
    }

    pub fn num_parameters(&self) -> usize {
        let embed = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let layers: usize = self.layers.iter().map(|l| l.num_parameters(self.hidden_size)).sum();
        embed + layers + self.hidden_size + head
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        if self.vocab_size == 0 || self.hidden_size == 0 {
            return Err(err("vocab_size and hidden_size must be positive".into()));
        }
        if self.layers.is_empty() {
            return Err(err("the model has no layers".into()));
        }
        for (i, l) in self.layers.iter().enumerate() {
            if l.num_attention_heads == 0 || l.num_key_value_heads == 0 || l.head_dim == 0 {
                return Err(err(format!("layer {i}: heads, KV heads and head_dim must be positive")));
            }
            if l.num_attention_heads % l.num_key_value_heads != 0 {
                return Err(err(format!(
                    "layer {i}: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    l.num_attention_heads, l.num_key_value_heads
                )));
            }
            if l.head_dim % 2 != 0 {
                return Err(err(format!("layer {i}: head_dim {} must be even for rotary embeddings", l.head_dim)));
            }
            if l.intermediate_size == 0 {
                return Err(err(format!("layer {i}: intermediate_size must be positive")));
            }
        }
        Ok(())
    }

    /// Reads an HF `config.json` (LlamaForCausalLM). Per-layer shapes come from `slm_layers` when present.
    pub fn from_hf_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        Self::from_hf_value(&value, path)
    }

    pub fn from_hf_value(v: &Value, path: &Path) -> Result<Self> {
        let err = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        let obj = v.as_object().ok_or_else(|| err("expected a JSON object".into()))?;
        let get_usize = |key: &str| -> Result<usize> {
            obj.get(key)
                .ok_or_else(|| err(format!("missing key `{key}`")))?
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| err(format!("`{key}` must be a non-negative integer")))
        };
        let opt_usize = |key: &str| -> Result<Option<usize>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|x| Some(x as usize))
                    .ok_or_else(|| err(format!("`{key}` must be a non-negative integer"))),
            }
        };
        if let Some(mt) = obj.get("model_type").and_then(Value::as_str) {
            if mt != "llama" {
                return Err(err(format!("model_type `{mt}` is not supported (only `llama`)")));
            }
        }
        if let Some(act) = obj.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(err(format!("hidden_act `{act}` is not supported (only `silu`)")));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if obj.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(err(format!("`{key}: true` is not supported")));
            }
        }
        match obj.get("rope_scaling") {
            None | Some(Value::Null) => {}
            Some(_) => return Err(err("`rope_scaling` is not supported (only plain rotary)".into())),
        }
        let vocab_size = get_usize("vocab_size")?;
        let hidden_size = get_usize("hidden_size")?;
        let num_layers = get_usize("num_hidden_layers")?;
        let heads = get_usize("num_attention_heads")?;
        let kv_heads = opt_usize("num_key_value_heads")?.unwrap_or(heads);
        if heads == 0 {
            return Err(err("num_attention_heads must be positive".into()));
        }
        let head_dim = opt_usize("head_dim")?.unwrap_or(hidden_size / heads);
        let intermediate_size = get_usize("intermediate_size")?;
        let rope_theta = obj
            .get("rope_theta")
            .or_else(|| obj.get("rope_parameters").and_then(|r| r.get("rope_theta")))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0);
        let rms_norm_eps = obj.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6);
        let max_position_embeddings = opt_usize("max_position_embeddings")?.unwrap_or(2048);
        let tie_word_embeddings = obj
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let token_id = |key: &str| -> Option<u32> {
            match obj.get(key) {
                Some(Value::Number(n)) => n.as_u64().map(|x| x as u32),
                Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|x| x as u32),
                _ => None,
            }
        };
        let layers = match obj.get("slm_layers") {
            Some(list) => {
                let list: Vec<LayerSpec> = serde_json::from_value(list.clone())
                    .map_err(|e| err(format!("`slm_layers` is malformed: {e}")))?;
                if list.len() != num_layers {
                    return Err(err(format!(
                        "`slm_layers` lists {} layers but num_hidden_layers is {num_layers}",
                        list.len()
                    )));
                }
                list
            }
            None => vec![
                LayerSpec {
                    num_attention_heads: heads,
                    num_key_value_heads: kv_heads,
                    head_dim,
                    intermediate_size,
                };
                num_layers
            ],
        };
        let spec = ModelSpec {
            vocab_size,
            hidden_size,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            tie_word_embeddings,
            bos_token_id: token_id("bos_token_id"),
            eos_token_id: token_id("eos_token_id"),
            layers,
        };
        spec.validate(path)?;
        Ok(spec)
    }

    /// The HF `config.json` for this model. Global per-layer fields take the largest layer's values (so a
    /// heterogeneous model still reads as a sensible Llama config); `slm_layers` records every layer's shape
    /// when they differ.
    pub fn to_hf_config(&self, dtype: &str) -> Value {
        let max = |f: fn(&LayerSpec) -> usize| self.layers.iter().map(f).max().unwrap_or(0);
        let mut obj = Map::new();
        obj.insert("architectures".into(), json!(["LlamaForCausalLM"]));
        obj.insert("model_type".into(), json!("llama"));
        obj.insert("vocab_size".into(), json!(self.vocab_size));
        obj.insert("hidden_size".into(), json!(self.hidden_size));
        obj.insert("intermediate_size".into(), json!(max(|l| l.intermediate_size)));
        obj.insert("num_hidden_layers".into(), json!(self.layers.len()));
        obj.insert("num_attention_heads".into(), json!(max(|l| l.num_attention_heads)));
        obj.insert("num_key_value_heads".into(), json!(max(|l| l.num_key_value_heads)));
        obj.insert("head_dim".into(), json!(max(|l| l.head_dim)));
        obj.insert("hidden_act".into(), json!("silu"));
        obj.insert("max_position_embeddings".into(), json!(self.max_position_embeddings));
        obj.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        obj.insert("rope_theta".into(), json!(self.rope_theta));
        obj.insert("rope_scaling".into(), Value::Null);
        obj.insert("attention_bias".into(), json!(false));
        obj.insert("attention_dropout".into(), json!(0.0));
        obj.insert("mlp_bias".into(), json!(false));
        obj.insert("initializer_range".into(), json!(0.02));
        obj.insert("pretraining_tp".into(), json!(1));
        obj.insert("use_cache".into(), json!(true));
        obj.insert("tie_word_embeddings".into(), json!(self.tie_word_embeddings));
        obj.insert("bos_token_id".into(), json!(self.bos_token_id));
        obj.insert("eos_token_id".into(), json!(self.eos_token_id));
        obj.insert("torch_dtype".into(), json!(dtype));
        if !self.is_uniform() {
            obj.insert("slm_layers".into(), json!(self.layers));
        }
        Value::Object(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::smollm_spec as smollm_like;

    #[test]
    fn parameter_count_matches_transformers() {
        // lm-eval's results.json for the dense model reports model_num_parameters = 134515008 (transformers).
        assert_eq!(smollm_like().num_parameters(), 134_515_008);
    }

    #[test]
    fn config_round_trip_uniform_and_heterogeneous() {
        let p = Path::new("config.json");
        let spec = smollm_like();
        let v = spec.to_hf_config("float32");
        assert!(v.get("slm_layers").is_none());
        assert_eq!(ModelSpec::from_hf_value(&v, p).unwrap(), spec);

        let mut het = spec.clone();
        het.layers[3].intermediate_size = 700;
        het.layers[4].num_attention_heads = 6;
        het.layers[4].num_key_value_heads = 2;
        let v = het.to_hf_config("float32");
        assert_eq!(v["slm_layers"].as_array().unwrap().len(), 30);
        assert_eq!(ModelSpec::from_hf_value(&v, p).unwrap(), het);
    }

    #[test]
    fn bad_configs_name_the_file_and_problem() {
        let p = Path::new("/x/config.json");
        let mut v = smollm_like().to_hf_config("float32");
        v["num_key_value_heads"] = json!(4);
        let e = ModelSpec::from_hf_value(&v, p).unwrap_err().to_string();
        assert!(e.contains("/x/config.json") && e.contains("not a multiple"), "{e}");

        let mut v = smollm_like().to_hf_config("float32");
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelSpec::from_hf_value(&v, p).unwrap_err().to_string();
        assert!(e.contains("missing key `hidden_size`"), "{e}");

        let mut v = smollm_like().to_hf_config("float32");
        v["slm_layers"] = json!([]);
        let e = ModelSpec::from_hf_value(&v, p).unwrap_err().to_string();
        assert!(e.contains("lists 0 layers"), "{e}");
    }
}
