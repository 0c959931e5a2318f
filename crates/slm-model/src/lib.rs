//! `slm-model`: the decoder model core of slm (Llama, Mistral, Qwen2, Qwen3, Gemma-3).
//!
//! Shapes ([`ModelSpec`], one [`LayerSpec`] per layer, so layers may differ in width), plain weights
//! ([`Weights`]), the batched forward pass ([`forward`]), loading an HF directory or a GGUF, the tokenizer,
//! saving an HF directory atomically, and calibration sampling. It knows nothing about pruning methods.

pub mod arch;
pub mod calib;
pub mod data;
pub mod error;
pub mod files;
pub mod forward;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod gguf_header;
pub mod gguf_write;
pub mod hf;
pub mod mapped;
pub mod output;
pub mod shards;
pub mod spec;
pub mod synth;
pub mod testing;
pub mod tokenizer;
pub mod weights;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

pub use error::{ModelError, Result};
pub use forward::{Batch, ForwardOutput, LayerAdapter, Mode, NoAdapter, PackedSequence};
pub use hf::{write_file_atomically, StorageDType};
pub use spec::{Activation, Arch, Family, LayerSpec, ModelSpec, Rope, RopeScaling};
pub use tokenizer::Tokenizer;
pub use weights::{LayerSlot, LayerSource, LayerWeights, Part, PartKind, Weights, PROJECTIONS};

/// A loaded model: shapes, f32 weights on a device, and its tokenizer.
#[derive(Debug, Clone)]
pub struct Model {
    pub spec: ModelSpec,
    pub weights: Weights,
    pub tokenizer: Option<Tokenizer>,
    pub device: Device,
    /// Where the model was loaded from (never overwritten by [`Model::save`]).
    pub source: Option<PathBuf>,
}

impl Model {
    /// The spec of an HF directory or a `.gguf` file without reading its weights (the config, or the GGUF header
    /// and its `rope_freqs` tensor), checked as [`Model::load`] checks it, the weight files' sizes included.
    pub fn load_spec(path: &Path) -> Result<ModelSpec> {
        if !path.exists() {
            return Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model path does not exist"),
            ));
        }
        if path.is_file() && is_gguf(path) {
            let (content, mut reader) = gguf::read_content(path)?;
            gguf::spec_from_gguf(&content, &mut reader, path)
        } else if path.is_dir() && path.join("config.json").exists() {
            hf::load_hf_spec(path)
        } else {
            Err(ModelError::UnknownFormat { path: path.to_path_buf() })
        }
    }

    /// Loads an HF directory or a `.gguf` file on `device`: GGUF tensors dequantised to f32, HF layer weights in
    /// their stored dtype (see [`hf::load_hf`]), every layer in memory.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_as(path, device, Residency::Resident)
    }

    /// [`Model::load`] with each layer left in its file and read when it is used ([`Residency::Mapped`]).
    pub fn load_mapped(path: &Path, device: &Device) -> Result<Self> {
        Self::load_as(path, device, Residency::Mapped)
    }

    /// Loads a model with its layers resident or mapped. Both give the same tensors, bit for bit.
    pub fn load_as(path: &Path, device: &Device, residency: Residency) -> Result<Self> {
        let _span = tracing::info_span!("load", path = %path.display()).entered();
        if !path.exists() {
            return Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model path does not exist"),
            ));
        }
        let model = if path.is_file() && is_gguf(path) {
            let (spec, weights, content) = gguf::load_gguf_mapped(path, device)?;
            let weights = residency.apply(&spec, weights)?;
            // A GGUF without any tokenizer metadata still loads (weights only); a broken tokenizer is an error.
            let tokenizer = if content.metadata.contains_key("tokenizer.ggml.model") {
                Some(Tokenizer::from_gguf(&content, path)?)
            } else {
                tracing::warn!("{}: no tokenizer in the GGUF", path.display());
                None
            };
            Model { spec, weights, tokenizer, device: device.clone(), source: Some(path.to_path_buf()) }
        } else if path.is_dir() && path.join("config.json").exists() {
            let (spec, weights) = hf::load_hf_mapped(path, device)?;
            let weights = residency.apply(&spec, weights)?;
            let tok_path = path.join("tokenizer.json");
            let tokenizer = if tok_path.symlink_metadata().is_ok() {
                Some(Tokenizer::from_file(&tok_path)?.with_bos_to_prepend(hf_bos(path, &spec)?))
            } else {
                None
            };
            Model { spec, weights, tokenizer, device: device.clone(), source: Some(path.to_path_buf()) }
        } else {
            return Err(ModelError::UnknownFormat { path: path.to_path_buf() });
        };
        tracing::info!(
            layers = model.spec.num_layers(),
            params = model.spec.num_parameters(),
            mapped = !model.weights.all_resident(),
            "loaded model"
        );
        Ok(model)
    }

    /// A model from parts; checks every weight shape against `spec` (a layer read when used, when it is read:
    /// see [`Model::save_sharded`]).
    pub fn from_parts(
        spec: ModelSpec,
        weights: Weights,
        tokenizer: Option<Tokenizer>,
        device: &Device,
    ) -> Result<Self> {
        if spec.layers.len() != weights.layers.len() {
            return Err(ModelError::InvalidArgument(format!(
                "the spec has {} layers, the weights {}",
                spec.layers.len(),
                weights.layers.len()
            )));
        }
        let path = Path::new("<in-memory model>");
        // The embeddings, final norm and head through the loader's checks; each resident layer part by part.
        let outer = Weights { layers: Vec::new(), ..weights.clone() };
        let named: HashMap<String, candle_core::Tensor> = outer.named_tensors(&spec.arch)?.into_iter().collect();
        let outer = Weights::from_named(&ModelSpec { layers: Vec::new(), ..spec.clone() }, named, path)?;
        for (i, (slot, l)) in weights.layers.iter().zip(&spec.layers).enumerate() {
            if let LayerSlot::Resident(w) = slot {
                w.check_shapes(i, l, spec.hidden_size, &spec.arch, path)?;
            }
        }
        let weights = Weights { layers: weights.layers, ..outer };
        Ok(Model { spec, weights, tokenizer, device: device.clone(), source: None })
    }

    /// The tokenizer, or an error naming the model when it has none (an HF directory without `tokenizer.json`).
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| ModelError::Tokenizer {
            path: self.source.clone().unwrap_or_default(),
            message: "the model has no tokenizer.json".into(),
        })
    }

    /// The dtype the layer weights are stored in (an HF directory's; f32 for a GGUF, dequantised on load): what
    /// outputs are written in unless asked otherwise.
    pub fn storage_dtype(&self) -> StorageDType {
        match self.weights.layers.first().map(LayerSlot::dtype) {
            Some(DType::BF16) => StorageDType::BF16,
            Some(DType::F16) => StorageDType::F16,
            _ => StorageDType::F32,
        }
    }

    pub fn num_parameters(&self) -> usize {
        self.spec.num_parameters()
    }

    /// Saves an HF directory (`config.json`, `model.safetensors`, `tokenizer.json` and any `extra_files`, e.g.
    /// `slm_plan.json`) atomically. Refuses to write over, into or around the model it was loaded from, and
    /// replaces an existing directory only when it is an earlier slm model output or empty.
    pub fn save(&self, dir: &Path, dtype: StorageDType, extra_files: &[(&str, Vec<u8>)]) -> Result<()> {
        self.save_replacing(dir, dtype, extra_files, output::Replace::SlmOutputOfSameKind)
    }

    /// [`Model::save`] with the replacement rule given (`Replace::Force` for `--force`).
    pub fn save_replacing(
        &self,
        dir: &Path,
        dtype: StorageDType,
        extra_files: &[(&str, Vec<u8>)],
        replace: output::Replace,
    ) -> Result<()> {
        self.save_sharded(dir, dtype, shards::DEFAULT_SHARD_BYTES, extra_files, replace)
    }

    /// [`Model::save_replacing`] with shards of at most `max_shard_bytes` of tensor data (one
    /// `model.safetensors` when everything fits). Tensors are converted and written one at a time.
    pub fn save_sharded(
        &self,
        dir: &Path,
        dtype: StorageDType,
        max_shard_bytes: u64,
        extra_files: &[(&str, Vec<u8>)],
        replace: output::Replace,
    ) -> Result<()> {
        let _span = tracing::info_span!("save", dir = %dir.display()).entered();
        let (spec, w) = (&self.spec, &self.weights);
        let (v, h) = (spec.vocab_size, spec.hidden_size);
        // Names and shapes from the spec; layer tensors are produced one layer at a time (a layer read when used
        // is read once, written, and dropped).
        let mut entries = vec![shards::TensorEntry { name: "model.embed_tokens.weight".into(), shape: vec![v, h] }];
        let mut owners: Vec<Option<(usize, Part)>> = vec![None];
        for (i, l) in spec.layers.iter().enumerate() {
            for &p in Part::ALL.iter().filter(|p| p.present(&spec.arch)) {
                let name = format!("model.layers.{i}.{}", p.hf_suffix(&spec.arch));
                entries.push(shards::TensorEntry { name, shape: p.shape(l, h) });
                owners.push(Some((i, p)));
            }
        }
        entries.push(shards::TensorEntry { name: "model.norm.weight".into(), shape: vec![h] });
        owners.push(None);
        if w.lm_head.is_some() {
            entries.push(shards::TensorEntry { name: "lm_head.weight".into(), shape: vec![v, h] });
            owners.push(None);
        }
        let mut current: Option<(usize, LayerWeights)> = None;
        let mut k = 0usize;
        let mut produce = |e: &shards::TensorEntry| -> Result<candle_core::Tensor> {
            let owner = owners.get(k).copied().flatten();
            k += 1;
            let t = match (owner, e.name.as_str()) {
                (Some((i, part)), _) => {
                    if current.as_ref().map(|(j, _)| *j) != Some(i) {
                        current = Some((i, w.layer(i)?.into_owned()));
                    }
                    let layer = &current.as_ref().expect("loaded above").1;
                    layer.get(part).cloned().ok_or_else(|| ModelError::MissingTensor {
                        path: PathBuf::from("<model being saved>"),
                        name: e.name.clone(),
                    })?
                }
                (None, "model.embed_tokens.weight") => w.embed_tokens.clone(),
                (None, "model.norm.weight") => w.norm.clone(),
                (None, _) => w.lm_head().clone(),
            };
            if t.dims() != e.shape.as_slice() {
                return Err(ModelError::ShapeMismatch {
                    path: PathBuf::from("<model being saved>"),
                    name: e.name.clone(),
                    expected: e.shape.clone(),
                    actual: t.dims().to_vec(),
                });
            }
            Ok(t)
        };
        let tensors = hf::Tensors { entries, dtype: dtype.dtype(), max_shard_bytes, produce: &mut produce };
        let mut files = hf_side_files(&self.spec, self.tokenizer.as_ref(), dtype)?;
        files.extend(extra_files.iter().map(|(n, b)| (*n, b.clone())));
        hf::write_dir_atomically(dir, tensors, &files, self.source.as_deref(), replace)
    }

    /// The same model with every layer in memory (a model loaded with [`Model::load_mapped`] reads them now).
    pub fn into_resident(self) -> Result<Self> {
        Ok(Model { weights: self.weights.into_resident()?, ..self })
    }

    /// The same model with weights on `device` in f32.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Model { weights: self.weights.to(device, DType::F32)?, device: device.clone(), ..self.clone() })
    }
}

/// The files of an HF directory besides the weights: `config.json` (stored dtype `dtype`) and, with a tokenizer,
/// `tokenizer.json` and a minimal `tokenizer_config.json` (so that transformers' `AutoTokenizer` picks the fast
/// tokenizer, with or without BOS as the model wants).
pub(crate) fn hf_side_files(
    spec: &ModelSpec,
    tokenizer: Option<&Tokenizer>,
    dtype: StorageDType,
) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let config = serde_json::to_vec_pretty(&spec.to_hf_config(dtype.torch_name()))
        .map_err(|e| ModelError::InvalidArgument(format!("cannot serialise config: {e}")))?;
    let mut files: Vec<(&str, Vec<u8>)> = vec![("config.json", config)];
    if let Some(tok) = tokenizer {
        let json = tok
            .inner()
            .to_string(false)
            .map_err(|e| ModelError::Tokenize(format!("cannot serialise tokenizer: {e}")))?;
        let name = |id: Option<u32>| id.and_then(|i| tok.inner().id_to_token(i));
        let config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": tok.bos_to_prepend().is_some(),
            "add_eos_token": false,
            "bos_token": name(spec.bos_token_id),
            "eos_token": name(spec.eos_token_id),
            "model_max_length": spec.max_position_embeddings,
        });
        files.push(("tokenizer.json", json.into_bytes()));
        files.push(("tokenizer_config.json", config.to_string().into_bytes()));
    }
    Ok(files)
}

/// The BOS token an HF directory's tokenizer puts first: `bos_token_id` when `tokenizer_config.json` says
/// `add_bos_token: true`.
fn hf_bos(dir: &Path, spec: &ModelSpec) -> Result<Option<u32>> {
    let p = dir.join("tokenizer_config.json");
    if p.symlink_metadata().is_err() {
        return Ok(None);
    }
    let bytes = files::read_regular_file(&p, files::MAX_CONFIG_BYTES)?;
    let v = files::parse_json_unique(&bytes, |message| ModelError::Tokenizer { path: p.clone(), message })?;
    Ok(match v.get("add_bos_token").and_then(serde_json::Value::as_bool) {
        Some(true) => Some(spec.bos_token_id.ok_or_else(|| ModelError::Tokenizer {
            path: p.clone(),
            message: "`add_bos_token` is true but config.json has no `bos_token_id`".into(),
        })?),
        _ => None,
    })
}

fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    use std::io::Read;
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// Parses `cpu`, `cuda` or `cuda:N`. A CUDA device in a build without the `cuda` feature is a clear error.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    let ordinal = match s.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => {
                return Err(ModelError::InvalidArgument(format!("unknown device `{s}` (expected cpu, cuda or cuda:N)")))
            }
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(ModelError::InvalidArgument(format!(
            "device `{s}`: this build of slm has no CUDA support (rebuild with `--features cuda`)"
        )));
    }
    // candle's error carries a backtrace in its text: the first line says what failed.
    Device::new_cuda(ordinal).map_err(|e| {
        let e = e.to_string();
        ModelError::InvalidArgument(format!(
            "device `{s}`: CUDA did not start ({}); is there a GPU with its driver (libcuda.so.1)?",
            e.lines().next().unwrap_or_default()
        ))
    })
}

/// Whether a loaded model's layers are read into memory at once, or left in the file and read when used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// Every layer in memory: fastest when the model fits (the evaluator, LoRA).
    Resident,
    /// Each layer read (and a GGUF layer dequantised) when it is used, then dropped: for layer-by-layer work on
    /// models near or above the machine's memory (depth, similarity, width, export).
    Mapped,
    /// Resident when every layer, as held in memory, fits in half of the memory available now
    /// (`MemAvailable`), mapped otherwise (the evaluator, LoRA, bench and run: a 7B on a 24 GiB machine is
    /// read when used). The results are the same either way.
    Auto,
}

impl Residency {
    fn apply(self, spec: &ModelSpec, weights: Weights) -> Result<Weights> {
        match self {
            Residency::Resident => weights.into_resident(),
            Residency::Mapped => Ok(weights),
            Residency::Auto => {
                let held = weights.layer_bytes(spec).iter().sum::<usize>() as u64;
                let available = mem_available_bytes();
                let resident = available.is_none_or(|a| held <= a / 2);
                tracing::info!(
                    layer_bytes = held,
                    available_bytes = available,
                    resident,
                    "--weights auto: layers {}",
                    if resident { "read at load" } else { "read when used" }
                );
                if resident {
                    weights.into_resident()
                } else {
                    Ok(weights)
                }
            }
        }
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (`None` where there is none).
fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl Residency {
    /// The spelling `--weights` takes.
    pub fn name(self) -> &'static str {
        match self {
            Residency::Resident => "resident",
            Residency::Mapped => "mapped",
            Residency::Auto => "auto",
        }
    }
}

impl std::str::FromStr for Residency {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "resident" => Ok(Residency::Resident),
            "mapped" => Ok(Residency::Mapped),
            "auto" => Ok(Residency::Auto),
            _ => {
                Err(ModelError::InvalidArgument(format!("unknown residency `{s}` (expected resident, mapped or auto)")))
            }
        }
    }
}

/// Path of the default model fetched by `scripts/setup.sh`, relative to the workspace root.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[cfg(test)]
mod device_tests {
    use super::parse_device;

    /// Without a GPU (or, in a CPU build, without CUDA at all) `--device cuda` is one clear line, never candle's
    /// backtrace; with one it is a CUDA device.
    #[test]
    fn a_cuda_device_that_cannot_start_is_a_one_line_error() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("unknown device `tpu`"), "{e}");
        match parse_device("cuda:0") {
            Ok(d) => assert!(d.is_cuda()),
            Err(e) => {
                let e = e.to_string();
                assert_eq!(e.lines().count(), 1, "{e}");
                assert!(e.contains("device `cuda:0`"), "{e}");
                if !cfg!(feature = "cuda") {
                    assert!(e.contains("--features cuda"), "{e}");
                }
            }
        }
    }
}
