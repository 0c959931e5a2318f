//! HF directories: `config.json` + `model.safetensors` (or shards with `model.safetensors.index.json`) +
//! `tokenizer.json`. Loading accepts f32/f16/bf16 and computes in f32; saving is atomic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use crate::error::{ModelError, Result};
use crate::output::{self, OutputKind, OutputStamp, Replace};
use crate::spec::ModelSpec;
use crate::weights::Weights;

/// Storage dtype for saved weights (computation is always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDType {
    F32,
    F16,
    BF16,
}

impl StorageDType {
    pub fn dtype(self) -> DType {
        match self {
            StorageDType::F32 => DType::F32,
            StorageDType::F16 => DType::F16,
            StorageDType::BF16 => DType::BF16,
        }
    }

    /// The name transformers uses in `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            StorageDType::F32 => "float32",
            StorageDType::F16 => "float16",
            StorageDType::BF16 => "bfloat16",
        }
    }
}

impl std::str::FromStr for StorageDType {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(StorageDType::F32),
            "f16" | "float16" => Ok(StorageDType::F16),
            "bf16" | "bfloat16" => Ok(StorageDType::BF16),
            _ => Err(ModelError::InvalidArgument(format!("unknown dtype `{s}` (expected f32, f16 or bf16)"))),
        }
    }
}

fn st_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Safetensors {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads every tensor of one safetensors file as f32 on `device`.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        let detail = e.to_string();
        st_err(path, format!("cannot parse the file (truncated or corrupt?): {detail}"))
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_device(device)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// The safetensors files of an HF directory: one file, or the shards named by the index.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(ModelError::Io {
            path: single,
            error: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors and no model.safetensors.index.json in the model directory",
            ),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| st_err(&index, format!("index is not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| st_err(&index, "index has no `weight_map` object"))?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(st_err(&index, "`weight_map` lists no files"));
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Loads spec and f32 weights from an HF directory. Errors name the offending file.
pub fn load_hf(dir: &Path, device: &Device) -> Result<(ModelSpec, Weights)> {
    let config = dir.join("config.json");
    let spec = ModelSpec::from_hf_config(&config)?;
    let files = weight_files(dir)?;
    let mut tensors = HashMap::new();
    for f in &files {
        tensors.extend(read_safetensors(f, device)?);
    }
    // Shape errors name the weights file (or the index for shards): that is where the disagreement shows.
    let source = if files.len() == 1 { files[0].clone() } else { dir.join("model.safetensors.index.json") };
    let weights = Weights::from_named(&spec, tensors, &source).map_err(|e| match e {
        ModelError::ShapeMismatch { path, name, expected, actual } => ModelError::Config {
            path: config.clone(),
            message: format!(
                "config.json disagrees with the weights: tensor `{name}` in {} has shape {actual:?}, the config implies {expected:?}",
                path.display()
            ),
        },
        other => other,
    })?;
    Ok((spec, weights))
}

/// Writes `files` (name → bytes), the weights and the model stamp (`slm_output.json`) into `dir` atomically:
/// everything goes into a temporary sibling directory that is renamed into place at the end, so a reader never
/// sees a half-written model. The output is checked first ([`output::check_output`]): never the input model
/// `protect` or a path inside or around it; an existing `dir` only as `replace` allows. Temporaries that a killed
/// run left beside `dir` are removed.
pub fn write_dir_atomically(
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    files: &[(&str, Vec<u8>)],
    protect: Option<&Path>,
    replace: Replace,
) -> Result<()> {
    let parent = output::parent_dir(dir);
    let inputs: Vec<&Path> = protect.into_iter().collect();
    output::check_output(dir, OutputKind::Model, &inputs, replace)?;
    std::fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
    output::remove_stale_temporaries(dir);
    let tmp = output::temporary_sibling(dir, "tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let result = (|| -> Result<()> {
        let st = tmp.join("model.safetensors");
        candle_core::safetensors::save(tensors, &st).map_err(|e| st_err(&st, e.to_string()))?;
        let stamp = OutputStamp::new(OutputKind::Model).file_bytes();
        for (fname, bytes) in files.iter().chain(std::iter::once(&(output::STAMP_FILE, stamp))) {
            let p = tmp.join(fname);
            std::fs::write(&p, bytes).map_err(|e| ModelError::io(&p, e))?;
        }
        make_readable(&tmp)?;
        if dir.exists() {
            let old = output::temporary_sibling(dir, "old");
            std::fs::rename(dir, &old).map_err(|e| ModelError::io(dir, e))?;
            std::fs::rename(&tmp, dir).map_err(|e| ModelError::io(dir, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, dir).map_err(|e| ModelError::io(dir, e))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// The safetensors writer creates its file owner-only; a model directory is meant to be shared like any other
/// output, so give every file the usual 0644 (and the directory 0755).
#[cfg(unix)]
fn make_readable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| ModelError::io(dir, e))?;
    for entry in std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))? {
        let p = entry.map_err(|e| ModelError::io(dir, e))?.path();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).map_err(|e| ModelError::io(&p, e))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn make_readable(_dir: &Path) -> Result<()> {
    Ok(())
}

/// Writes one file atomically: the bytes go to a temporary sibling that is renamed over `path`, so a reader sees
/// the old file or the new one, never a partial write. Creates missing parent directories.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = output::parent_dir(path);
    std::fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
    output::remove_stale_temporaries(path);
    let tmp = output::temporary_sibling(path, "tmp");
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| ModelError::io(path, e))
}
