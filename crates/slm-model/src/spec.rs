//! Model shapes: global dimensions, the architecture's features ([`Arch`]) and one [`LayerSpec`] per layer,
//! because pruning in width leaves layers of different widths. Parsed from and written to an HF `config.json` of
//! each supported family (Llama, Mistral, Qwen2, Qwen3, Gemma-3), key names as the published checkpoints use.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

pub use crate::arch::{Activation, Arch, Family, Rope, RopeScaling};
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
    /// A sliding-window attention layer (see [`Arch::sliding_window`]); else global.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sliding: bool,
}

impl LayerSpec {
    /// Whether `other` has this layer's shape (the attention type, sliding or global, may differ).
    pub fn same_shape(&self, other: &LayerSpec) -> bool {
        LayerSpec { sliding: false, ..*self } == LayerSpec { sliding: false, ..*other }
    }

    /// Query heads per KV head (grouped-query attention).
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Parameters of this layer: its RMSNorm weights (two, or four with sandwich norms, plus the q/k norms),
    /// q/k/v/o and gate/up/down, and the q/k/v biases where the architecture has them.
    pub fn num_parameters(&self, hidden_size: usize, arch: &Arch) -> usize {
        self.checked_num_parameters(hidden_size, arch).unwrap_or(usize::MAX)
    }

    /// [`LayerSpec::num_parameters`], or `None` when it overflows (only an unvalidated spec can).
    pub fn checked_num_parameters(&self, hidden_size: usize, arch: &Arch) -> Option<usize> {
        let q = self.num_attention_heads.checked_mul(self.head_dim)?;
        let kv = self.num_key_value_heads.checked_mul(self.head_dim)?;
        let attn = hidden_size.checked_mul(q.checked_add(kv)?.checked_mul(2)?)?;
        let mlp = hidden_size.checked_mul(self.intermediate_size)?.checked_mul(3)?;
        let norms = hidden_size.checked_mul(if arch.sandwich_norms { 4 } else { 2 })?;
        let bias = if arch.qkv_bias { q.checked_add(kv.checked_mul(2)?)? } else { 0 };
        let qk_norm = if arch.qk_norm { self.head_dim.checked_mul(2)? } else { 0 };
        norms.checked_add(attn)?.checked_add(mlp)?.checked_add(bias)?.checked_add(qk_norm)
    }
}

/// Global dimensions and the per-layer shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// The family and its features (rotary, norms, activation, biases, attention types).
    pub arch: Arch,
    pub layers: Vec<LayerSpec>,
}

impl ModelSpec {
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The sliding window when some layer uses it (a window in the config that no layer uses is None here).
    pub fn sliding_window_in_use(&self) -> Option<usize> {
        self.arch.sliding_window.filter(|_| self.layers.iter().any(|l| l.sliding))
    }

    /// Parameters of layer shape `l` in this model.
    pub fn layer_parameters(&self, l: &LayerSpec) -> usize {
        l.num_parameters(self.hidden_size, &self.arch)
    }

    /// True when every layer has the same shape (the attention type may differ: `layer_types` carries it).
    pub fn is_uniform(&self) -> bool {
        self.layers.windows(2).all(|w| w[0].same_shape(&w[1]))
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
            total = total.checked_add(l.checked_num_parameters(self.hidden_size, &self.arch)?)?;
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
        self.arch.rope.validate("rope_theta").map_err(err)?;
        if let Some(r) = &self.arch.local_rope {
            r.validate("rope_local_base_freq").map_err(err)?;
        }
        if self.arch.sliding_window == Some(0) {
            return Err(err("`sliding_window` must be positive".into()));
        }
        if self.layers.iter().any(|l| l.sliding) && self.arch.sliding_window.is_none() {
            return Err(err("sliding-window layers but no `sliding_window`".into()));
        }
        if let Some(q) = self.arch.query_pre_attn_scalar {
            if !(q.is_finite() && q > 0.0) {
                return Err(err(format!("`query_pre_attn_scalar` {q} must be finite and positive")));
            }
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
        let family = family_of(obj).map_err(err)?;
        let mut arch = family.arch();
        arch.activation = activation_of(obj, family).map_err(err)?;
        refuse_unsupported(obj, family).map_err(err)?;
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
        let rope_params = obj.get("rope_parameters").filter(|v| !v.is_null());
        // transformers 5 may nest Gemma-3's rotary settings per attention type.
        let (global_params, local_params) = match rope_params {
            Some(r) if r.get("full_attention").is_some() => (r.get("full_attention"), r.get("sliding_attention")),
            other => (other, None),
        };
        let theta = opt_f64(
            "rope_theta",
            obj.get("rope_theta").or_else(|| global_params.and_then(|r| r.get("rope_theta"))),
            10_000.0,
        )?;
        let scaling = match obj.get("rope_scaling").filter(|v| !v.is_null()) {
            Some(v) => rope_scaling_of(v, "rope_scaling").map_err(err)?,
            None => match global_params {
                Some(v) => rope_scaling_of(v, "rope_parameters").map_err(err)?,
                None => RopeScaling::Default,
            },
        };
        arch.rope = Rope { theta, scaling };
        if family == Family::Gemma3 {
            let local = opt_f64(
                "rope_local_base_freq",
                obj.get("rope_local_base_freq").or_else(|| local_params.and_then(|r| r.get("rope_theta"))),
                10_000.0,
            )?;
            arch.local_rope = Some(Rope { theta: local, scaling: RopeScaling::Default });
            arch.query_pre_attn_scalar =
                Some(opt_f64("query_pre_attn_scalar", obj.get("query_pre_attn_scalar"), 256.0)?);
        }
        arch.sliding_window = opt_usize("sliding_window")?;
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
                let sliding = sliding_layers(obj, family, num_layers, arch.sliding_window).map_err(err)?;
                sliding
                    .into_iter()
                    .map(|sliding| LayerSpec {
                        num_attention_heads: heads,
                        num_key_value_heads: kv_heads,
                        head_dim,
                        intermediate_size,
                        sliding,
                    })
                    .collect()
            }
        };
        if arch.sliding_window.is_some() && !layers.iter().any(|l| l.sliding) {
            arch.sliding_window = None; // a window no layer uses (Qwen's `use_sliding_window: false`)
        }
        let spec = ModelSpec {
            vocab_size,
            hidden_size,
            rms_norm_eps,
            max_position_embeddings,
            tie_word_embeddings,
            bos_token_id: token_id("bos_token_id"),
            eos_token_id: token_id("eos_token_id"),
            arch,
            layers,
        };
        spec.validate(path)?;
        Ok(spec)
    }

    /// The HF `config.json` for this model, in its family's layout (`model_type`, `architectures` and the keys
    /// transformers reads for it), so that transformers loads a uniform output as the family's own class. Global
    /// per-layer fields take the largest layer's values; `slm_layers` records every layer's shape when they
    /// differ.
    pub fn to_hf_config(&self, dtype: &str) -> Value {
        let max = |f: fn(&LayerSpec) -> usize| self.layers.iter().map(f).max().unwrap_or(0);
        let a = &self.arch;
        let mut obj = Map::new();
        obj.insert("architectures".into(), json!([a.family.architecture()]));
        obj.insert("model_type".into(), json!(a.family.model_type()));
        obj.insert("vocab_size".into(), json!(self.vocab_size));
        obj.insert("hidden_size".into(), json!(self.hidden_size));
        obj.insert("intermediate_size".into(), json!(max(|l| l.intermediate_size)));
        obj.insert("num_hidden_layers".into(), json!(self.layers.len()));
        obj.insert("num_attention_heads".into(), json!(max(|l| l.num_attention_heads)));
        obj.insert("num_key_value_heads".into(), json!(max(|l| l.num_key_value_heads)));
        obj.insert("head_dim".into(), json!(max(|l| l.head_dim)));
        let act_key = if a.family == Family::Gemma3 { "hidden_activation" } else { "hidden_act" };
        obj.insert(act_key.into(), json!(a.activation.hf_name()));
        obj.insert("max_position_embeddings".into(), json!(self.max_position_embeddings));
        obj.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        obj.insert("rope_theta".into(), json!(a.rope.theta));
        obj.insert("rope_scaling".into(), rope_scaling_json(&a.rope.scaling));
        if let Some(local) = &a.local_rope {
            obj.insert("rope_local_base_freq".into(), json!(local.theta));
        }
        if let Some(q) = a.query_pre_attn_scalar {
            // transformers types this field as an int and refuses 256.0; a whole number is written as one.
            let v = if q.fract() == 0.0 && q.abs() < 1e15 { json!(q as i64) } else { json!(q) };
            obj.insert("query_pre_attn_scalar".into(), v);
        }
        obj.insert("sliding_window".into(), json!(a.sliding_window));
        if matches!(a.family, Family::Qwen2 | Family::Qwen3 | Family::Gemma3) {
            let types: Vec<&str> =
                self.layers.iter().map(|l| if l.sliding { "sliding_attention" } else { "full_attention" }).collect();
            obj.insert("layer_types".into(), json!(types));
        }
        match a.family {
            Family::Qwen2 | Family::Qwen3 => {
                obj.insert("use_sliding_window".into(), json!(a.sliding_window.is_some()));
                obj.insert("max_window_layers".into(), json!(self.layers.len()));
            }
            Family::Gemma3 => {
                obj.insert("attn_logit_softcapping".into(), Value::Null);
                obj.insert("final_logit_softcapping".into(), Value::Null);
            }
            Family::Llama | Family::Mistral => {}
        }
        if a.family != Family::Qwen2 {
            obj.insert("attention_bias".into(), json!(false));
        }
        if a.family == Family::Llama {
            obj.insert("mlp_bias".into(), json!(false));
            obj.insert("pretraining_tp".into(), json!(1));
        }
        obj.insert("attention_dropout".into(), json!(0.0));
        obj.insert("initializer_range".into(), json!(0.02));
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

/// Model types slm knows but does not run, with the reason.
const REFUSED_MODEL_TYPES: [(&str, &str); 12] = [
    ("gemma3", "the multimodal Gemma-3 (a vision tower, `text_config`); give the text-only model (`gemma3_text`)"),
    ("mixtral", "a mixture of experts"),
    ("qwen2_moe", "a mixture of experts"),
    ("qwen3_moe", "a mixture of experts"),
    ("deepseek_v2", "a mixture of experts"),
    ("deepseek_v3", "a mixture of experts"),
    ("olmoe", "a mixture of experts"),
    ("llama4", "a mixture of experts with a vision tower"),
    ("mllama", "a vision-language model"),
    ("qwen2_vl", "a vision-language model"),
    ("gemma2", "Gemma-2 (logit soft-capping), not supported yet"),
    ("gemma", "Gemma-1, not supported yet"),
];

fn family_of(obj: &Map<String, Value>) -> std::result::Result<Family, String> {
    let known = Family::ALL.iter().map(|f| format!("`{}`", f.model_type())).collect::<Vec<_>>().join(", ");
    match obj.get("model_type") {
        None | Some(Value::Null) => Ok(Family::Llama),
        Some(Value::String(mt)) => {
            Family::from_model_type(mt).ok_or_else(|| match REFUSED_MODEL_TYPES.iter().find(|(t, _)| t == mt) {
                Some((_, why)) => format!("`model_type` `{mt}` is {why}; slm supports {known}"),
                None => format!("`model_type` `{mt}` is not supported (slm supports {known})"),
            })
        }
        Some(_) => Err("`model_type` must be a string".into()),
    }
}

fn activation_of(obj: &Map<String, Value>, family: Family) -> std::result::Result<Activation, String> {
    let (key, default) = match family {
        Family::Gemma3 => ("hidden_activation", Activation::GeluTanh),
        _ => ("hidden_act", Activation::Silu),
    };
    match obj.get(key).or_else(|| obj.get("hidden_act")) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::String(a)) if a == "silu" => Ok(Activation::Silu),
        Some(Value::String(a)) if a == "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
        Some(v) => Err(format!("`{key}` {v} is not supported (silu, gelu_pytorch_tanh)")),
    }
}

/// Keys that would change the computation in a way slm does not implement: refused by name, never ignored.
fn refuse_unsupported(obj: &Map<String, Value>, family: Family) -> std::result::Result<(), String> {
    let truthy = |key: &str| obj.get(key).is_some_and(|v| v.as_bool() == Some(true));
    if family != Family::Qwen2 && truthy("attention_bias") {
        return Err("`attention_bias: true` (biases on q, k, v and o) is not supported".into());
    }
    if truthy("mlp_bias") {
        return Err("`mlp_bias: true` is not supported".into());
    }
    for key in ["num_experts", "num_local_experts", "n_routed_experts"] {
        if obj.get(key).and_then(Value::as_u64).is_some_and(|n| n > 0) {
            return Err(format!("`{key}`: a mixture of experts is not supported"));
        }
    }
    for key in ["vision_config", "text_config"] {
        if obj.get(key).is_some_and(|v| !v.is_null()) {
            return Err(format!("`{key}`: a multimodal model is not supported; give its text model's config"));
        }
    }
    for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
        if obj.get(key).is_some_and(|v| !v.is_null()) {
            return Err(format!("`{key}` (logit soft-capping) is not supported"));
        }
    }
    if obj.get("use_bidirectional_attention").and_then(Value::as_bool) == Some(true) {
        return Err("`use_bidirectional_attention: true` is not supported (causal decoders only)".into());
    }
    Ok(())
}

fn rope_scaling_of(v: &Value, key: &str) -> std::result::Result<RopeScaling, String> {
    let obj = v.as_object().ok_or_else(|| format!("`{key}` must be an object or null"))?;
    let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |k: &str| -> std::result::Result<f64, String> {
        obj.get(k).and_then(Value::as_f64).ok_or_else(|| format!("`{key}.{k}` must be a number"))
    };
    Ok(match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: obj
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("`{key}.original_max_position_embeddings` must be a positive integer"))?
                as usize,
        },
        other => return Err(format!("`{key}.rope_type` `{other}` is not supported (default, linear, llama3)")),
    })
}

fn rope_scaling_json(s: &RopeScaling) -> Value {
    match s {
        RopeScaling::Default => Value::Null,
        other => serde_json::to_value(other).unwrap_or(Value::Null),
    }
}

/// Which layers use sliding-window attention: `layer_types` when given (Qwen, Gemma-3), Gemma-3's older
/// `sliding_window_pattern` (every n-th layer global), Mistral's `sliding_window` (every layer), else none.
fn sliding_layers(
    obj: &Map<String, Value>,
    family: Family,
    n: usize,
    window: Option<usize>,
) -> std::result::Result<Vec<bool>, String> {
    if let Some(types) = obj.get("layer_types").filter(|v| !v.is_null()) {
        let types = types.as_array().ok_or("`layer_types` must be a list")?;
        if types.len() != n {
            return Err(format!("`layer_types` lists {} layers but num_hidden_layers is {n}", types.len()));
        }
        let sliding = types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("full_attention") => Ok(false),
                Some("sliding_attention") => Ok(true),
                _ => Err(format!("`layer_types[{i}]` {t} is not supported (full_attention, sliding_attention)")),
            })
            .collect::<std::result::Result<Vec<bool>, String>>()?;
        if family != Family::Gemma3
            && sliding.iter().any(|&s| s)
            && !obj.get("use_sliding_window").is_some_and(|v| v == true)
        {
            // Qwen lists sliding layers but uses them only with `use_sliding_window`.
            return Ok(vec![false; n]);
        }
        return Ok(sliding);
    }
    Ok(match family {
        Family::Gemma3 => {
            let pattern = obj
                .get("sliding_window_pattern")
                .or_else(|| obj.get("_sliding_window_pattern"))
                .and_then(Value::as_u64)
                .unwrap_or(6)
                .max(1) as usize;
            (0..n).map(|i| (i + 1) % pattern != 0).collect()
        }
        Family::Mistral => vec![window.is_some(); n],
        Family::Qwen2 | Family::Qwen3 if obj.get("use_sliding_window").is_some_and(|v| v == true) => {
            // transformers' Qwen2/Qwen3 configs: layers from `max_window_layers` (default 28) on are sliding.
            let from = match obj.get("max_window_layers") {
                None => 28,
                Some(v) => v.as_u64().ok_or_else(|| format!("`max_window_layers` {v} is not an integer"))? as usize,
            };
            (0..n).map(|i| window.is_some() && i >= from).collect()
        }
        _ => vec![false; n],
    })
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

    /// Qwen2's published config style: `use_sliding_window` with `max_window_layers` and no `layer_types` makes
    /// the layers from `max_window_layers` on sliding (transformers' Qwen2Config); without it no layer slides.
    #[test]
    fn qwen_use_sliding_window_slides_from_max_window_layers() {
        let p = crate::testing::golden_dir().join("archs/qwen2/config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("layer_types");
        obj.insert("sliding_window".into(), json!(8));
        obj.insert("max_window_layers".into(), json!(1));
        obj.insert("use_sliding_window".into(), json!(true));
        let s = ModelSpec::from_hf_value(&v, &p).unwrap();
        assert_eq!(s.layers.iter().map(|l| l.sliding).collect::<Vec<_>>(), [false, true, true]);
        assert_eq!(s.arch.sliding_window, Some(8));
        assert_eq!(ModelSpec::from_hf_value(&s.to_hf_config("float32"), &p).unwrap(), s, "exported as it was read");
        v["use_sliding_window"] = json!(false);
        let s = ModelSpec::from_hf_value(&v, &p).unwrap();
        assert!(s.layers.iter().all(|l| !l.sliding) && s.arch.sliding_window.is_none());
        v["use_sliding_window"] = json!(true);
        v["max_window_layers"] = json!("two");
        let e = ModelSpec::from_hf_value(&v, &p).unwrap_err().to_string();
        assert!(e.contains("max_window_layers"), "{e}");
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
