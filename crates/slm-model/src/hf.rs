//! HF directories: `config.json` + `model.safetensors` (or shards with `model.safetensors.index.json`) +
//! `tokenizer.json`. Loading accepts f32/f16/bf16, keeps layer weights in their stored dtype and computes in f32;
//! saving is atomic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use crate::error::{ModelError, Result};
use crate::mapped::{StEntry, StFiles, StLayer};
use crate::output::{self, OutputKind, OutputStamp, Replace};
use crate::spec::ModelSpec;
use crate::weights::{LayerSlot, Weights};

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
    ModelError::Safetensors { path: path.to_path_buf(), message: message.into() }
}

/// Checks the JSON header of a safetensors file before the safetensors crate parses it: the 8-byte length must
/// fit in the file, and no tensor name may appear twice (the crate keeps one of them silently).
fn check_safetensors_header(bytes: &[u8], path: &Path) -> Result<()> {
    let n = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| st_err(path, format!("{} bytes: too short for the 8-byte header length", bytes.len())))?;
    let body = bytes.len() as u64 - 8;
    if n > body {
        return Err(st_err(path, format!("header length {n} is more than the {body} bytes after it")));
    }
    let header = &bytes[8..8 + n as usize];
    crate::files::find_duplicate_json_key(header)
        .map_err(|k| st_err(path, format!("tensor name (header key) {k} appears twice in the header")))
}

/// Reads every tensor of one safetensors file as f32 on `device` ([`read_safetensors_stored`], converted).
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    read_safetensors_stored(path, device)?.into_iter().map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?))).collect()
}

/// Reads every tensor of one safetensors file on `device` in its stored dtype (f32, f16 or bf16). The file is
/// memory-mapped, not read into memory: only the tensors themselves are copied out of it. Refuses a non-regular
/// file, a header with a repeated tensor name, and NaN/Inf weights (naming the tensor). (A file that another
/// process truncates while it is mapped ends the process with SIGBUS, as with every mmap-based loader.)
pub fn read_safetensors_stored(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut table = HashMap::new();
    let map = index_safetensors(path, 0, &mut table)?;
    let names: Vec<String> = table.keys().cloned().collect();
    let files = StFiles { paths: vec![path.to_path_buf()], maps: vec![map], table };
    names.into_iter().map(|n| Ok((n.clone(), files.tensor(&n)?.to_device(device)?))).collect()
}

/// Maps one safetensors file (number `file` of a model) and adds where each of its tensors lies to `table`,
/// checking the header first. A tensor already in `table` (from another shard) is an error naming the file.
fn index_safetensors(path: &Path, file: usize, table: &mut HashMap<String, StEntry>) -> Result<memmap2::Mmap> {
    let (f, len) = crate::files::open_regular_file(path)?;
    if len < 8 {
        return Err(st_err(path, format!("{len} bytes: too short for the 8-byte header length")));
    }
    let map = crate::mapped::map_file(&f, path)?;
    let bytes: &[u8] = &map;
    check_safetensors_header(bytes, path)?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        let detail = e.to_string();
        st_err(path, format!("cannot parse the file (truncated or corrupt?): {detail}"))
    })?;
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
        // The view's data is a slice of the map: its offset in the file is where the tensor lies.
        let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
        let end = start + view.data().len();
        let entry = StEntry { file, dtype, shape: view.shape().to_vec(), start, end, checked: Default::default() };
        if table.insert(name.clone(), entry).is_some() {
            return Err(st_err(path, format!("tensor `{name}` is also in another shard")));
        }
    }
    Ok(map)
}

/// The safetensors files of an HF directory: one file, or the shards named by the index (plain file names
/// inside `dir` only).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.symlink_metadata().is_ok() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.symlink_metadata().is_err() {
        return Err(ModelError::Io {
            path: single,
            error: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors and no model.safetensors.index.json in the model directory",
            ),
        });
    }
    let bytes = crate::files::read_regular_file(&index, crate::files::MAX_INDEX_BYTES)?;
    let v = crate::files::parse_json_unique(&bytes, |m| st_err(&index, format!("index: {m}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| st_err(&index, "index has no `weight_map` object"))?;
    let mut files = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| st_err(&index, format!("`weight_map` entry `{tensor}` is not a file name string")))?;
        let p = crate::files::shard_path(dir, file)
            .map_err(|m| st_err(&index, format!("`weight_map` entry `{tensor}`: {m}")))?;
        files.push(p);
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(st_err(&index, "`weight_map` lists no files"));
    }
    Ok(files)
}

/// Refuses weight files too small for the parameters the config implies (at 2 bytes each, the smallest dtype
/// read), before any tensor is read: a config with absurd sizes fails here, not in an allocation.
fn check_weight_bytes(spec: &ModelSpec, config: &Path, files: &[PathBuf]) -> Result<()> {
    let mut total: u64 = 0;
    for f in files {
        let (_, len) = crate::files::open_regular_file(f)?;
        total = total.saturating_add(len);
    }
    let params = spec.checked_num_parameters().unwrap_or(usize::MAX) as u64;
    let need = params.saturating_mul(2);
    if total < need {
        return Err(ModelError::Config {
            path: config.to_path_buf(),
            message: format!(
                "the config implies {params} parameters (at least {need} bytes of weights), but the weight files \
                 hold only {total} bytes ({})",
                files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        });
    }
    Ok(())
}

/// The spec of an HF directory from its config, checked against the weight files' sizes (no tensor is read).
pub fn load_hf_spec(dir: &Path) -> Result<ModelSpec> {
    let config = dir.join("config.json");
    let spec = ModelSpec::from_hf_config(&config)?;
    check_weight_bytes(&spec, &config, &weight_files(dir)?)?;
    Ok(spec)
}

/// Loads the spec and the weights of an HF directory: layer weights, embeddings and LM head in their stored
/// dtype, the final norm in f32.
/// Errors name the offending file.
pub fn load_hf(dir: &Path, device: &Device) -> Result<(ModelSpec, Weights)> {
    let (spec, weights) = load_hf_mapped(dir, device)?;
    Ok((spec, weights.into_resident()?))
}

/// [`load_hf`] with the layers left in the mapped files, each read (in its stored dtype) when it is used: only
/// the embeddings, the final norm and the LM head are read now (the norm in f32, the rest as stored). Every tensor's presence, dtype and shape
/// is checked now; a layer's values (NaN/Inf) when it is read.
pub fn load_hf_mapped(dir: &Path, device: &Device) -> Result<(ModelSpec, Weights)> {
    let config = dir.join("config.json");
    let spec = ModelSpec::from_hf_config(&config)?;
    let files = weight_files(dir)?;
    check_weight_bytes(&spec, &config, &files)?;
    let mut table = HashMap::new();
    let mut maps = Vec::with_capacity(files.len());
    for (k, f) in files.iter().enumerate() {
        maps.push(index_safetensors(f, k, &mut table)?);
    }
    let st = Arc::new(StFiles { paths: files.clone(), maps, table });
    // Shape errors name the weights file (or the index for shards): that is where the disagreement shows.
    let source = if files.len() == 1 { files[0].clone() } else { dir.join("model.safetensors.index.json") };
    let check = |name: &str, expected: &[usize]| -> Result<DType> {
        match st.table.get(name) {
            None => Err(ModelError::MissingTensor { path: source.clone(), name: name.to_string() }),
            Some(e) if e.shape != expected => Err(ModelError::Config {
                path: config.clone(),
                message: format!(
                    "config.json disagrees with the weights: tensor `{name}` in {} has shape {:?}, the config implies {expected:?}",
                    source.display(),
                    e.shape
                ),
            }),
            Some(e) => Ok(e.dtype),
        }
    };
    // The embeddings and the LM head, used at every position, are read now in their stored dtype (upcast a
    // chunk at a time while used: `Model::embed_ids`, `Model::head`); the final norm, in f32, sets the compute
    // dtype.
    let resident = |name: &str, expected: &[usize]| -> Result<Tensor> {
        check(name, expected)?;
        Ok(st.tensor(name)?.to_device(device)?)
    };
    let (v, h) = (spec.vocab_size, spec.hidden_size);
    let embed_tokens = resident("model.embed_tokens.weight", &[v, h])?;
    let mut layers = Vec::with_capacity(spec.layers.len());
    let mut expected_names = std::collections::HashSet::new();
    for (i, l) in spec.layers.iter().enumerate() {
        let parts = crate::mapped::layer_parts(&spec.arch, |p| format!("model.layers.{i}.{}", p.hf_suffix(&spec.arch)));
        let mut dtype = DType::F32;
        for (p, name) in &parts {
            let d = check(name, &p.shape(l, h))?;
            if *p == crate::weights::Part::Q {
                dtype = d;
            }
            expected_names.insert(name.clone());
        }
        let layer = StLayer { files: st.clone(), parts, arch: spec.arch, dtype, device: device.clone() };
        layers.push(LayerSlot::Lazy(Arc::new(layer)));
    }
    let norm = resident("model.norm.weight", &[h])?.to_dtype(DType::F32)?;
    // Some tied checkpoints still carry a copy of the head; it is the embedding by definition.
    let lm_head = if spec.tie_word_embeddings { None } else { Some(resident("lm_head.weight", &[v, h])?) };
    let mut extra: Vec<&String> =
        st.table.keys().filter(|k| k.starts_with("model.layers.") && !expected_names.contains(*k)).collect();
    extra.sort();
    if let Some(extra) = extra.first() {
        return Err(ModelError::Config {
            path: source.clone(),
            message: format!(
                "tensor `{extra}` belongs to no layer of the config ({} layers): config and weights disagree",
                spec.layers.len()
            ),
        });
    }
    Ok((spec, Weights { embed_tokens, layers, norm, lm_head }))
}

/// The weights [`write_dir_atomically`] writes: their names and shapes in order, the stored dtype, the largest
/// shard, and the producer of each tensor (called once per entry, in order, so that only one tensor beyond the
/// model is in memory at a time).
pub struct Tensors<'a> {
    pub entries: Vec<crate::shards::TensorEntry>,
    pub dtype: DType,
    pub max_shard_bytes: u64,
    pub produce: &'a mut dyn FnMut(&crate::shards::TensorEntry) -> Result<Tensor>,
}

/// Writes `files` (name → bytes), the weights (one `model.safetensors`, or shards and their index above
/// `max_shard_bytes`; [`crate::shards::write_sharded`]) and the model stamp (`slm_output.json`) into `dir` atomically:
/// everything goes into a temporary sibling directory that is renamed into place at the end, so a reader never
/// sees a half-written model. The output is checked first ([`output::check_output`]): never the input model
/// `protect` or a path inside or around it; an existing `dir` only as `replace` allows. Temporaries that a killed
/// run left beside `dir` are removed.
pub fn write_dir_atomically(
    dir: &Path,
    tensors: Tensors<'_>,
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
        crate::shards::write_sharded(&tmp, &tensors.entries, tensors.dtype, tensors.max_shard_bytes, tensors.produce)?;
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
