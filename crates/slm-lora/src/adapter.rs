//! LoRA adapters (Hu et al., 2021, as PEFT implements them) on the seven projections of every layer:
//! `y = W₀x + (α/r)·B·A·dropout(x)`, A `[r, in]` Kaiming-uniform (a = √5, i.e. U(±1/√in)), B `[out, r]` zero.
//! Shapes follow each layer's own (possibly pruned) widths. Files are PEFT's: `adapter_config.json` and
//! `adapter_model.safetensors` with keys `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use slm_model::forward::linear;
use slm_model::{LayerAdapter, Model, ModelSpec, Part, PROJECTIONS};

use crate::error::{LoraError, Result};
use crate::ops::{frozen_linear, lora_branch, lora_linear};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// LoRA hyper-parameters (PEFT's names in the config file).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
}

impl Default for LoraConfig {
    /// The LLM-Pruner recipe: r 8, α 16, dropout 0.05.
    fn default() -> Self {
        LoraConfig { rank: 8, alpha: 16.0, dropout: 0.05 }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(LoraError::InvalidArgument("LoRA rank must be at least 1, got 0".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(LoraError::InvalidArgument(format!("LoRA alpha must be positive, got {}", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::InvalidArgument(format!("LoRA dropout must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }

    /// α / r.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The trainable pair of one projection.
#[derive(Debug)]
pub struct LoraPair {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
}

/// Adapters for every projection of every layer.
#[derive(Debug)]
pub struct Lora {
    pub config: LoraConfig,
    /// `layers[i][k]`: layer i, projection `PROJECTIONS[k]`.
    pub layers: Vec<Vec<LoraPair>>,
}

fn proj_index(name: &str) -> Option<usize> {
    PROJECTIONS.iter().position(|p| *p == name)
}

/// PEFT's module path of projection `name` in layer `i` (without `.lora_A.weight`).
pub fn peft_module(i: usize, name: &str) -> String {
    let block = if matches!(name, "gate_proj" | "up_proj" | "down_proj") { "mlp" } else { "self_attn" };
    format!("base_model.model.model.layers.{i}.{block}.{name}")
}

impl Lora {
    /// Fresh adapters for `spec`'s shapes: A Kaiming-uniform from `seed`, B zero.
    pub fn new(spec: &ModelSpec, config: LoraConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let r = config.rank;
        let mut layers = Vec::with_capacity(spec.num_layers());
        for l in &spec.layers {
            let mut pairs = Vec::with_capacity(PROJECTIONS.len());
            for part in [Part::Q, Part::K, Part::V, Part::O, Part::Gate, Part::Up, Part::Down] {
                let shape = part.shape(l, spec.hidden_size);
                let (out, inp) = (shape[0], shape[1]);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..r * inp).map(|_| rng.random_range(-bound..bound)).collect();
                pairs.push(LoraPair {
                    a: Var::from_tensor(&Tensor::from_vec(a, (r, inp), device)?)?,
                    b: Var::zeros((out, r), candle_core::DType::F32, device)?,
                });
            }
            layers.push(pairs);
        }
        Ok(Lora { config, layers })
    }

    pub fn pair(&self, layer: usize, name: &str) -> Option<&LoraPair> {
        self.layers.get(layer)?.get(proj_index(name)?)
    }

    /// Every trainable tensor, A then B, layer by layer in [`PROJECTIONS`] order.
    pub fn vars(&self) -> Vec<&Var> {
        self.layers.iter().flatten().flat_map(|p| [&p.a, &p.b]).collect()
    }

    pub fn num_parameters(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// PEFT-named copies of every A and B (`[r, in]` and `[out, r]`).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, pairs) in self.layers.iter().enumerate() {
            for (k, p) in pairs.iter().enumerate() {
                let m = peft_module(i, PROJECTIONS[k]);
                out.push((format!("{m}.lora_A.weight"), p.a.as_tensor().copy()?));
                out.push((format!("{m}.lora_B.weight"), p.b.as_tensor().copy()?));
            }
        }
        Ok(out)
    }

    /// Sets every A and B from PEFT-named tensors (e.g. a best checkpoint); shapes must match.
    pub fn set_from(&self, named: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        for (i, pairs) in self.layers.iter().enumerate() {
            for (k, p) in pairs.iter().enumerate() {
                let m = peft_module(i, PROJECTIONS[k]);
                for (suffix, var) in [("lora_A", &p.a), ("lora_B", &p.b)] {
                    let key = format!("{m}.{suffix}.weight");
                    let t =
                        named.get(&key).ok_or_else(|| LoraError::file(source, format!("missing tensor `{key}`")))?;
                    if t.dims() != var.dims() {
                        return Err(LoraError::file(
                            source,
                            format!("tensor `{key}` has shape {:?}, the model needs {:?}", t.dims(), var.dims()),
                        ));
                    }
                    var.set(&t.to_device(var.device())?.to_dtype(candle_core::DType::F32)?)?;
                }
            }
        }
        Ok(())
    }

    /// The adapter config in PEFT's format.
    pub fn peft_config(&self, base_model: &str) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": PROJECTIONS,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "use_rslora": false,
            "use_dora": false,
            "revision": null,
        })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (each file atomically).
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| LoraError::Io { path: dir.to_path_buf(), error: e })?;
        let tensors: HashMap<String, Tensor> = self
            .named_tensors()?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let path = dir.join(ADAPTER_WEIGHTS);
        slm_model::output::remove_stale_temporaries(&path);
        let tmp = slm_model::output::temporary_sibling(&path, "tmp");
        candle_core::safetensors::save(&tensors, &tmp)
            .map_err(|e| LoraError::file(&tmp, format!("cannot write: {e}")))?;
        std::fs::rename(&tmp, &path).map_err(|e| LoraError::Io { path: path.clone(), error: e })?;
        let cfg = serde_json::to_vec_pretty(&self.peft_config(base_model)).expect("json");
        slm_model::write_file_atomically(&dir.join(ADAPTER_CONFIG), &cfg)?;
        Ok(())
    }

    /// Reads adapter files written by [`Lora::save`] (or PEFT, for these seven targets) for a model of `spec`.
    pub fn load(dir: &Path, spec: &ModelSpec, device: &Device) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| LoraError::Io { path: cfg_path.clone(), error: e })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| LoraError::file(&cfg_path, format!("not valid JSON: {e}")))?;
        if v.get("peft_type").and_then(|t| t.as_str()) != Some("LORA") {
            return Err(LoraError::file(&cfg_path, "not a LoRA adapter config (`peft_type` is not \"LORA\")"));
        }
        let num = |k: &str| {
            v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| LoraError::file(&cfg_path, format!("missing number `{k}`")))
        };
        let config = LoraConfig {
            rank: num("r")? as usize,
            alpha: num("lora_alpha")?,
            dropout: num("lora_dropout").unwrap_or(0.0),
        };
        config.validate().map_err(|e| LoraError::file(&cfg_path, e.to_string()))?;
        let lora = Lora::new(spec, config, 0, device)?;
        let st = dir.join(ADAPTER_WEIGHTS);
        let named = slm_model::hf::read_safetensors(&st, device)?;
        lora.set_from(&named, &st)?;
        Ok(lora)
    }

    /// The model with `W ← W₀ + (α/r)·B·A` merged into every projection, in f32.
    pub fn merge(&self, model: &Model) -> Result<Model> {
        if self.layers.len() != model.spec.num_layers() {
            return Err(LoraError::InvalidArgument(format!(
                "adapter has {} layers, the model {}",
                self.layers.len(),
                model.spec.num_layers()
            )));
        }
        let mut merged = model.clone();
        let s = self.config.scaling();
        for (i, pairs) in self.layers.iter().enumerate() {
            let lw = merged.weights.layer_mut(i)?;
            for (k, p) in pairs.iter().enumerate() {
                let w0 = lw.projection(PROJECTIONS[k]).expect("known projection");
                let delta = (p.b.as_tensor().matmul(p.a.as_tensor())? * s)?;
                let w = (w0.to_dtype(candle_core::DType::F32)? + delta)?;
                match PROJECTIONS[k] {
                    "q_proj" => lw.q_proj = w,
                    "k_proj" => lw.k_proj = w,
                    "v_proj" => lw.v_proj = w,
                    "o_proj" => lw.o_proj = w,
                    "gate_proj" => lw.gate_proj = w,
                    "up_proj" => lw.up_proj = w,
                    _ => lw.down_proj = w,
                }
            }
        }
        Ok(merged)
    }

    /// The adapter as a forward hook without dropout (evaluation).
    pub fn eval_hook(&self) -> LoraHook<'_> {
        LoraHook { lora: self, dropout: None, frozen_base: false }
    }

    /// The adapter as a forward hook for training: seeded dropout on the LoRA branch and a base matmul whose
    /// backward skips the frozen weights' gradient.
    pub fn train_hook(&self, dropout_seed: u64) -> LoraHook<'_> {
        let dropout = (self.config.dropout > 0.0).then(|| RefCell::new(ChaCha8Rng::seed_from_u64(dropout_seed)));
        LoraHook { lora: self, dropout, frozen_base: true }
    }
}

/// Inputs per independently drawn block of a dropout mask.
const MASK_BLOCK: usize = 16_384;

/// [`Lora`] as a [`LayerAdapter`].
pub struct LoraHook<'a> {
    lora: &'a Lora,
    dropout: Option<RefCell<ChaCha8Rng>>,
    frozen_base: bool,
}

impl LoraHook<'_> {
    /// The state of the dropout generator (`None` without dropout): saved before a layer runs so that a
    /// recomputation of that layer ([`crate::train`]'s per-layer checkpointing) draws the same masks.
    pub fn dropout_state(&self) -> Option<ChaCha8Rng> {
        self.dropout.as_ref().map(|r| r.borrow().clone())
    }

    /// Puts the dropout generator back to a state from [`LoraHook::dropout_state`].
    pub fn set_dropout_state(&self, state: Option<ChaCha8Rng>) {
        if let (Some(r), Some(s)) = (&self.dropout, state) {
            *r.borrow_mut() = s;
        }
    }

    /// Inverted-dropout multipliers for `n` inputs (candle's own dropout is unseeded); `None` without dropout.
    /// Each mask takes one seed from the hook's seeded generator; block `i` of [`MASK_BLOCK`] inputs is drawn
    /// from stream `i` of that seed, so the blocks are drawn in parallel and the mask does not depend on the
    /// threads.
    fn dropout_mask(&self, n: usize) -> Option<Vec<f32>> {
        let seed = self.dropout.as_ref()?.borrow_mut().next_u64();
        let p = self.lora.config.dropout;
        let keep = (1.0 / (1.0 - p)) as f32;
        let threshold = (p * 4_294_967_296.0) as u64;
        let mut mask = vec![0f32; n];
        mask.par_chunks_mut(MASK_BLOCK).enumerate().for_each(|(i, block)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            block.iter_mut().for_each(|m| *m = if (rng.next_u32() as u64) < threshold { 0.0 } else { keep });
        });
        Some(mask)
    }
}

impl LayerAdapter for LoraHook<'_> {
    fn project(&self, layer: usize, name: &'static str, x: &Tensor, w: &Tensor) -> slm_model::Result<Tensor> {
        let Some(p) = self.lora.pair(layer, name) else {
            return Ok(if self.frozen_base { frozen_linear(x, w)? } else { linear(x, w)? });
        };
        let (a, b, s) = (p.a.as_tensor(), p.b.as_tensor(), self.lora.config.scaling());
        if self.frozen_base {
            // Training: the whole projection as one op (its backward skips the frozen weight's gradient).
            return Ok(lora_linear(x, w, a, b, s, self.dropout_mask(x.elem_count()))?);
        }
        Ok((linear(x, w)? + lora_branch(x, a, b, s, self.dropout_mask(x.elem_count()))?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_masks_are_seeded_scaled_and_the_same_on_any_number_of_threads() {
        let model = slm_model::testing::tiny_model(1, 3);
        let config = LoraConfig { rank: 2, alpha: 4.0, dropout: 0.25 };
        let lora = Lora::new(&model.spec, config, 0, &Device::Cpu).unwrap();
        // Three blocks and a partial fourth.
        let n = 3 * MASK_BLOCK + 1000;
        let draw = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let hook = lora.train_hook(7);
                (hook.dropout_mask(n).unwrap(), hook.dropout_mask(n).unwrap())
            })
        };
        let (first, second) = draw(1);
        assert_eq!(draw(3), (first.clone(), second.clone()), "the masks depend on the threads");
        assert_ne!(first, second, "two projections share a mask");
        assert!(first.iter().all(|&m| m == 0.0 || m == 1.0 / 0.75));
        let dropped = first.iter().filter(|&&m| m == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped share {dropped}");
        // Blocks are not copies of each other.
        assert_ne!(first[..MASK_BLOCK], first[MASK_BLOCK..2 * MASK_BLOCK]);
        assert!(lora.eval_hook().dropout_mask(n).is_none());
    }
}
