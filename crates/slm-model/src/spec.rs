//! Model shapes: global dimensions plus one [`LayerSpec`] per layer, because pruning in width leaves layers of
//! different widths. Parsed from and written to an HF `config.json` (Llama key names).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{ModelError, Result};

/// Most decoder layers accepted (the largest public Llamas have ~128); a config beyond is refused before any
/// per-layer allocation.
pub const MAX_LAYERS: usize = 4096;
/// Largest hidden size, MLP width, vocabulary and per-layer projection width (heads × head_dim) accepted.
pub const MAX_DIM: usize = 1 << 24;
/// Most attention (or KV) heads per layer.
pub const MAX_HEADS: usize = 1 << 16;
/// Largest head_dim.
pub const MAX_HEAD_DIM: usize = 1 << 16;
/// Largest max_position_embeddings (16M tokens).
pub const MAX_POSITIONS: usize = 1 << 24;

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
        self.checked_num_parameters(hidden_size).unwrap_or(usize::MAX)
    }

    /// [`LayerSpec::num_parameters`], or `None` when it overflows (only an unvalidated spec can).
    pub fn checked_num_parameters(&self, hidden_size: usize) -> Option<usize> {
        let q = self.num_attention_heads.checked_mul(self.head_dim)?;
        let kv = self.num_key_value_heads.checked_mul(self.head_dim)?;
        let attn = hidden_size.checked_mul(q.checked_add(kv)?.checked_mul(2)?)?;
        let mlp = hidden_size.checked_mul(self.intermediate_size)?.checked_mul(3)?;
        hidden_size.checked_mul(2)?.checked_add(attn)?.checked_add(mlp)
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
        self.checked_num_parameters().unwrap_or(usize::MAX)
    }

    /// [`ModelSpec::num_parameters`], or `None` when it overflows (only an unvalidated spec can).
    pub fn checked_num_parameters(&self) -> Option<usize> {
        let embed = self.vocab_size.checked_mul(self.hidden_size)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let mut total = embed.checked_add(head)?.checked_add(self.hidden_size)?;
        for l in &self.layers {
            total = total.checked_add(l.checked_num_parameters(self.hidden_size)?)?;
        }
        Some(total)
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |message: String| ModelError::Config { path: path.to_path_buf(), message };
        if self.vocab_size == 0 || self.hidden_size == 0 {
            return Err(err("vocab_size and hidden_size must be positive".into()));
        }
        if self.layers.is_empty() {
            return Err(err("the model has no layers".into()));
        }
        check_bound("num_hidden_layers", self.layers.len(), MAX_LAYERS, path)?;
        check_bound("vocab_size", self.vocab_size, MAX_DIM, path)?;
        check_bound("hidden_size", self.hidden_size, MAX_DIM, path)?;
        check_bound("max_position_embeddings", self.max_position_embeddings, MAX_POSITIONS, path)?;
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(err(format!("rope_theta {} must be finite and positive", self.rope_theta)));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(err(format!("rms_norm_eps {} must be finite and positive", self.rms_norm_eps)));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let bound = |what: &str, x: usize, max: usize| check_bound(&format!("layer {i}: {what}"), x, max, path);
            bound("num_attention_heads", l.num_attention_heads, MAX_HEADS)?;
            bound("num_key_value_heads", l.num_key_value_heads, MAX_HEADS)?;
            bound("head_dim", l.head_dim, MAX_HEAD_DIM)?;
            bound("intermediate_size", l.intermediate_size, MAX_DIM)?;
            // Both factors are ≤ 2^16, so the product cannot overflow.
            bound("num_attention_heads × head_dim", l.num_attention_heads * l.head_dim, MAX_DIM)?;
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
        if self.checked_num_parameters().is_none() {
            return Err(err("the parameter count overflows".into()));
        }
        Ok(())
    }

    /// Reads an HF `config.json` (LlamaForCausalLM). Per-layer shapes come from `slm_layers` when present.
    pub fn from_hf_config(path: &Path) -> Result<Self> {
        let bytes = crate::files::read_regular_file(path, crate::files::MAX_CONFIG_BYTES)?;
        let value = crate::files::parse_json_unique(&bytes, |message| ModelError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Self::from_hf_value(&value, path)
    }

    pub fn from_hf_value(v: &Value, path: &Path) -> Result<Self> {
        let err = |message: String| ModelError::Config { path: path.to_path_buf(), message };
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
        // Every size is bounded as it is read, before anything (the per-layer list) is allocated from it.
        let bounded = |key: &str, x: usize, max: usize| check_bound(key, x, max, path).map(|()| x);
        let vocab_size = bounded("vocab_size", get_usize("vocab_size")?, MAX_DIM)?;
        let hidden_size = bounded("hidden_size", get_usize("hidden_size")?, MAX_DIM)?;
        let num_layers = bounded("num_hidden_layers", get_usize("num_hidden_layers")?, MAX_LAYERS)?;
        let heads = bounded("num_attention_heads", get_usize("num_attention_heads")?, MAX_HEADS)?;
        let kv_heads = opt_usize("num_key_value_heads")?.unwrap_or(heads);
        if heads == 0 {
            return Err(err("num_attention_heads must be positive".into()));
        }
        let head_dim = opt_usize("head_dim")?.unwrap_or(hidden_size / heads);
        let intermediate_size = get_usize("intermediate_size")?;
        // Present but not a number is an error, not the default (validate() then checks finite and positive).
        let opt_f64 = |key: &str, v: Option<&Value>, default: f64| -> Result<f64> {
            match v {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_f64().ok_or_else(|| err(format!("`{key}` must be a number"))),
            }
        };
        let rope_theta = opt_f64(
            "rope_theta",
            obj.get("rope_theta").or_else(|| obj.get("rope_parameters").and_then(|r| r.get("rope_theta"))),
            10_000.0,
        )?;
        let rms_norm_eps = opt_f64("rms_norm_eps", obj.get("rms_norm_eps"), 1e-6)?;
        let max_position_embeddings = opt_usize("max_position_embeddings")?.unwrap_or(2048);
        let tie_word_embeddings = obj.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false);
        let token_id = |key: &str| -> Option<u32> {
            match obj.get(key) {
                Some(Value::Number(n)) => n.as_u64().map(|x| x as u32),
                Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|x| x as u32),
                _ => None,
            }
        };
        let layers = match obj.get("slm_layers") {
            Some(list) => {
                let list: Vec<LayerSpec> =
                    serde_json::from_value(list.clone()).map_err(|e| err(format!("`slm_layers` is malformed: {e}")))?;
                if list.len() != num_layers {
                    return Err(err(format!(
                        "`slm_layers` lists {} layers but num_hidden_layers is {num_layers}",
                        list.len()
                    )));
                }
                list
            }
            None => {
                vec![
                    LayerSpec { num_attention_heads: heads, num_key_value_heads: kv_heads, head_dim, intermediate_size };
                    num_layers
                ]
            }
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

/// Refuses `x > max` for the field `what`, naming the file.
fn check_bound(what: &str, x: usize, max: usize, path: &Path) -> Result<()> {
    if x > max {
        return Err(ModelError::Config {
            path: path.to_path_buf(),
            message: format!("`{what}` is {x}, more than the {max} accepted"),
        });
    }
    Ok(())
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

    #[test]
    fn absurd_sizes_and_bad_numbers_are_refused() {
        let p = Path::new("/x/config.json");
        for (key, val) in [
            ("num_hidden_layers", json!(1_000_000_000_000u64)),
            ("hidden_size", json!(1u64 << 30)),
            ("vocab_size", json!(u64::MAX)),
            ("num_attention_heads", json!(1u64 << 20)),
            ("rope_theta", json!(0.0)),
            ("rope_theta", json!(-1.0)),
            ("rms_norm_eps", json!(-1e-6)),
            ("rms_norm_eps", json!("small")),
        ] {
            let mut v = smollm_like().to_hf_config("float32");
            v[key] = val.clone();
            let e = ModelSpec::from_hf_value(&v, p).unwrap_err().to_string();
            assert!(e.contains("/x/config.json") && e.contains(key), "{key}={val}: {e}");
        }
        // Unvalidated specs can overflow the count; the checked count says so instead of wrapping.
        let mut s = smollm_like();
        s.hidden_size = usize::MAX / 2;
        assert_eq!(s.checked_num_parameters(), None);
        assert_eq!(s.num_parameters(), usize::MAX);
        assert!(s.validate(p).is_err());
    }
}
