//! Training checkpoints: everything a run needs to continue bit for bit (the trainable tensors, AdamW's moments
//! and step count, the dropout generator's position, the best tensors so far, the step, the history), written
//! every N steps. A checkpoint is two files in its directory: `step-NNNNNN.safetensors` (the tensors, exact f32)
//! written first, then `state.json` (the rest, naming that tensor file) replacing the previous one atomically; so
//! a run killed at any moment leaves the last complete checkpoint. `state.json` carries a fingerprint of the run
//! (settings, the trainable tensors' names and shapes, a hash of the training tokens): resuming a checkpoint of
//! another run is refused, naming the first setting that differs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::Example;
use crate::error::{LoraError, Result};
use crate::train::{AdamW, StepInfo, TrainConfig};
use crate::trainable::{TrainHook, Trainable};

/// The layout's name in `state.json`.
const FORMAT: &str = "slm-train-checkpoint-1";
/// The state file's name inside a checkpoint directory.
pub const STATE_FILE: &str = "state.json";

/// Where and how often a run writes checkpoints, and whether it continues from one.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pub dir: PathBuf,
    /// A checkpoint after every this many optimiser steps (none after the last: the run's outputs follow).
    pub every: usize,
    /// Continue from the checkpoint in `dir` when there is one (a fresh start when there is none).
    pub resume: bool,
    /// The caller's description of the run (settings, inputs); a resumed run must match it exactly.
    pub run: Value,
}

/// The progress a run carries from step to step.
pub(crate) struct State {
    pub step: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub history: Vec<StepInfo>,
    pub best_step: Option<usize>,
    pub best_loss: Option<f64>,
    pub best: Option<HashMap<String, Tensor>>,
}

impl State {
    pub fn fresh() -> Self {
        State { step: 0, tokens: 0, seconds: 0.0, history: Vec::new(), best_step: None, best_loss: None, best: None }
    }
}

#[derive(Serialize, Deserialize)]
struct RngState {
    /// The 32-byte seed, hex.
    seed: String,
    stream: u64,
    /// The 32-bit word position, decimal (a u128).
    word_pos: String,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format: String,
    fingerprint: Value,
    step: usize,
    adam_t: i32,
    tokens: usize,
    seconds: f64,
    best_step: Option<usize>,
    /// The best validation loss's bits (exact, unlike a decimal round trip).
    best_loss_bits: Option<u64>,
    dropout: Option<RngState>,
    /// The tensor file of this checkpoint, in the same directory.
    tensors: String,
    history: Vec<StepInfo>,
}

/// FNV-1a over the training sequences' tokens and target masks, in order.
fn data_hash(train: &[Example]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h ^= x as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for e in train {
        eat(&(e.ids.len() as u64).to_le_bytes());
        e.ids.iter().for_each(|t| eat(&t.to_le_bytes()));
        e.target.iter().for_each(|&t| eat(&[t as u8]));
    }
    format!("{h:016x}")
}

/// The first place two JSON values differ, as `path: there, here`.
fn first_difference(path: &str, there: &Value, here: &Value) -> Option<String> {
    match (there, here) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                first_difference(&p, a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null))
            })
        }
        _ if there == here => None,
        _ => Some(format!("`{path}` is {there} there and {here} here")),
    }
}

impl Checkpoints {
    /// This run's fingerprint: the caller's description, the optimisation settings, what trains (names and shapes), the training data.
    pub(crate) fn fingerprint(&self, trainable: &dyn Trainable, train: &[Example], cfg: &TrainConfig) -> Result<Value> {
        let tensors: Vec<Value> =
            trainable.named_tensors()?.iter().map(|(n, t)| serde_json::json!([n, t.dims()])).collect();
        Ok(serde_json::json!({
            "run": self.run,
            "train": cfg,
            "trainable": { "kind": trainable.kind(), "tensors": tensors },
            "train_data": { "sequences": train.len(), "fnv1a": data_hash(train) },
        }))
    }

    fn io(&self, path: &Path, e: std::io::Error) -> LoraError {
        LoraError::Io { path: path.to_path_buf(), error: e }
    }

    /// Writes the checkpoint of `st` (tensor file first, then the state file atomically) and removes the
    /// previous tensor file.
    pub(crate) fn save(
        &self,
        fingerprint: &Value,
        trainable: &dyn Trainable,
        opt: &AdamW,
        hook: &dyn TrainHook,
        st: &State,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(&self.dir, e))?;
        let cpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&candle_core::Device::Cpu)?) };
        let mut tensors = HashMap::new();
        for (k, (name, t)) in trainable.named_tensors()?.into_iter().enumerate() {
            tensors.insert(format!("adam_m.{name}"), cpu(&opt.m[k])?);
            tensors.insert(format!("adam_v.{name}"), cpu(&opt.v[k])?);
            tensors.insert(format!("param.{name}"), cpu(&t)?);
        }
        for (name, t) in st.best.iter().flatten() {
            tensors.insert(format!("best.{name}"), cpu(t)?);
        }
        let file = format!("step-{:06}.safetensors", st.step);
        let path = self.dir.join(&file);
        slm_model::output::remove_stale_temporaries(&path);
        let tmp = slm_model::output::temporary_sibling(&path, "tmp");
        candle_core::safetensors::save(&tensors, &tmp)
            .map_err(|e| LoraError::file(&tmp, format!("cannot write the checkpoint: {e}")))?;
        std::fs::rename(&tmp, &path).map_err(|e| self.io(&path, e))?;
        let dropout = hook.dropout_state().map(|r| RngState {
            seed: r.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: r.get_stream(),
            word_pos: r.get_word_pos().to_string(),
        });
        let state = StateFile {
            format: FORMAT.into(),
            fingerprint: fingerprint.clone(),
            step: st.step,
            adam_t: opt.t,
            tokens: st.tokens,
            seconds: st.seconds,
            best_step: st.best_step,
            best_loss_bits: st.best_loss.map(f64::to_bits),
            dropout,
            tensors: file.clone(),
            history: st.history.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&state).expect("json");
        slm_model::write_file_atomically(&self.dir.join(STATE_FILE), &bytes)?;
        // Older tensor files are no longer named by the state file.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("step-") && n.ends_with(".safetensors") && n != file {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        tracing::info!(step = st.step, dir = %self.dir.display(), "checkpoint written");
        Ok(())
    }

    /// Loads the checkpoint in `dir` into `trainable`, `opt` and `hook`, or None when there is none. A
    /// checkpoint of another run (another fingerprint) is an error naming the first difference.
    pub(crate) fn load(
        &self,
        fingerprint: &Value,
        trainable: &dyn Trainable,
        opt: &mut AdamW,
        hook: &dyn TrainHook,
    ) -> Result<Option<State>> {
        let state_path = self.dir.join(STATE_FILE);
        if !state_path.exists() {
            tracing::warn!(dir = %self.dir.display(), "--resume: no checkpoint there yet; starting from step 0");
            return Ok(None);
        }
        let bytes = slm_model::files::read_regular_file(&state_path, 256 << 20)?;
        let st: StateFile = serde_json::from_slice(&bytes)
            .map_err(|e| LoraError::file(&state_path, format!("not a training checkpoint's state: {e}")))?;
        if st.format != FORMAT {
            return Err(LoraError::file(&state_path, format!("layout `{}`, this slm reads `{FORMAT}`", st.format)));
        }
        if let Some(d) = first_difference("", &st.fingerprint, fingerprint) {
            return Err(LoraError::file(
                &state_path,
                format!("--resume: this checkpoint is from another run ({d}); resume with the same settings and data, or drop --resume to start again"),
            ));
        }
        if st.tensors.contains('/') || st.tensors.contains("..") {
            return Err(LoraError::file(&state_path, format!("tensor file `{}` is not a plain file name", st.tensors)));
        }
        let tpath = self.dir.join(&st.tensors);
        let device = trainable.vars().first().map(|v| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let named = slm_model::hf::read_safetensors(&tpath, &device)?;
        let pick = |prefix: &str| -> HashMap<String, Tensor> {
            named.iter().filter_map(|(k, t)| k.strip_prefix(prefix).map(|n| (n.to_string(), t.clone()))).collect()
        };
        trainable.set_from(&pick("param."), &tpath)?;
        let (m, v) = (pick("adam_m."), pick("adam_v."));
        for (k, (name, t)) in trainable.named_tensors()?.into_iter().enumerate() {
            for (store, slot) in [(&m, &mut opt.m[k]), (&v, &mut opt.v[k])] {
                let x = store
                    .get(&name)
                    .ok_or_else(|| LoraError::file(&tpath, format!("missing optimiser state of `{name}`")))?;
                if x.dims() != t.dims() {
                    return Err(LoraError::file(
                        &tpath,
                        format!("optimiser state of `{name}` has shape {:?}", x.dims()),
                    ));
                }
                *slot = x.to_dtype(candle_core::DType::F32)?;
            }
        }
        opt.t = st.adam_t;
        match st.dropout {
            Some(r) => {
                let mut seed = [0u8; 32];
                let hex = r.seed.as_bytes();
                if hex.len() != 64 {
                    return Err(LoraError::file(&state_path, "dropout seed is not 64 hex digits"));
                }
                for (i, b) in seed.iter_mut().enumerate() {
                    let s = std::str::from_utf8(&hex[2 * i..2 * i + 2]).unwrap_or("zz");
                    *b = u8::from_str_radix(s, 16)
                        .map_err(|_| LoraError::file(&state_path, "dropout seed is not 64 hex digits"))?;
                }
                let pos: u128 = r
                    .word_pos
                    .parse()
                    .map_err(|_| LoraError::file(&state_path, "dropout `word_pos` is not a number"))?;
                let mut rng = <ChaCha8Rng as rand::SeedableRng>::from_seed(seed);
                rng.set_stream(r.stream);
                rng.set_word_pos(pos);
                hook.set_dropout_state(Some(rng));
            }
            None => hook.set_dropout_state(None),
        }
        let best = pick("best.");
        Ok(Some(State {
            step: st.step,
            tokens: st.tokens,
            seconds: st.seconds,
            history: st.history,
            best_step: st.best_step,
            best_loss: st.best_loss_bits.map(f64::from_bits),
            best: (!best.is_empty()).then_some(best),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_difference_names_the_path() {
        let a = serde_json::json!({"run": {"lr": 0.0005, "seed": 1}, "x": [1, 2]});
        let b = serde_json::json!({"run": {"lr": 0.0001, "seed": 1}, "x": [1, 2]});
        assert_eq!(first_difference("", &a, &b).unwrap(), "`run.lr` is 0.0005 there and 0.0001 here");
        assert_eq!(first_difference("", &a, &a), None);
        let c = serde_json::json!({"run": {"lr": 0.0005, "seed": 1}});
        assert!(first_difference("", &a, &c).unwrap().starts_with("`x`"));
    }

    #[test]
    fn data_hash_depends_on_tokens_and_masks() {
        let e = |ids: Vec<u32>, t: Vec<bool>| Example { ids, target: t };
        let a = data_hash(&[e(vec![1, 2], vec![false, true])]);
        assert_ne!(a, data_hash(&[e(vec![1, 3], vec![false, true])]));
        assert_ne!(a, data_hash(&[e(vec![1, 2], vec![true, true])]));
        assert_eq!(a, data_hash(&[e(vec![1, 2], vec![false, true])]));
    }
}
