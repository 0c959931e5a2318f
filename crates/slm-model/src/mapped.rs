//! Layers read from their file when used ([`LayerSource`]s): a safetensors layer is copied out of the memory map
//! in its stored dtype, a GGUF layer is read and dequantised. A model loaded this way holds in memory only its
//! embeddings, final norm and LM head; each layer costs memory only while it runs, so a model larger than the
//! machine's memory can be scored, pruned and written layer by layer (the map's pages are the page cache's, and
//! the kernel drops them as it needs).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::spec::Arch;
use crate::weights::{LayerSource, LayerWeights, Part};

/// Where one tensor lies in a mapped safetensors file.
#[derive(Debug, Clone)]
pub(crate) struct StEntry {
    pub file: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
    /// Set once the values have been checked to be finite (each tensor is scanned once, however often it is
    /// read).
    pub checked: Arc<std::sync::atomic::AtomicBool>,
}

/// The mapped safetensors files of one model and where each tensor lies in them.
pub(crate) struct StFiles {
    pub paths: Vec<PathBuf>,
    pub maps: Vec<memmap2::Mmap>,
    pub table: HashMap<String, StEntry>,
}

impl std::fmt::Debug for StFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StFiles").field("paths", &self.paths).field("tensors", &self.table.len()).finish()
    }
}

impl StFiles {
    /// The tensor `name` in its stored dtype on the CPU (copied out of the map), checked to be finite.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self.table.get(name).ok_or_else(|| ModelError::MissingTensor {
            path: self.paths.first().cloned().unwrap_or_default(),
            name: name.to_string(),
        })?;
        let bytes = &self.maps[e.file][e.start..e.end];
        use std::sync::atomic::Ordering;
        if !e.checked.load(Ordering::Relaxed) {
            if !crate::files::raw_all_finite(bytes, e.dtype) {
                return Err(ModelError::NonFinite { path: self.paths[e.file].clone(), name: name.to_string() });
            }
            e.checked.store(true, Ordering::Relaxed);
        }
        Ok(Tensor::from_raw_buffer(bytes, e.dtype, &e.shape, &Device::Cpu)?)
    }
}

/// A decoder layer of an HF directory, read from the mapped safetensors when used.
#[derive(Debug)]
pub(crate) struct StLayer {
    pub files: Arc<StFiles>,
    /// Each part the layer has and its tensor's name.
    pub parts: Vec<(Part, String)>,
    pub arch: Arch,
    pub dtype: DType,
    pub device: Device,
}

impl LayerSource for StLayer {
    fn load(&self) -> Result<LayerWeights> {
        LayerWeights::build(&self.arch, |p| {
            let name = part_name(&self.parts, p)?;
            Ok::<_, ModelError>(self.files.tensor(name)?.to_device(&self.device)?)
        })
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// A GGUF file opened for reading layers when they are used: its path and its (checked) header.
#[derive(Debug)]
pub(crate) struct GgufFile {
    pub path: PathBuf,
    pub content: Arc<Content>,
}

/// A decoder layer of a GGUF, read and dequantised to f32 when used, in the HF layout (Q/K rows of a `llama`
/// un-permuted, Gemma's `1 + w` norms taken back to `w`).
#[derive(Debug)]
pub(crate) struct GgufLayer {
    pub file: Arc<GgufFile>,
    /// Each part the layer has and its GGUF tensor name.
    pub parts: Vec<(Part, String)>,
    /// Query and KV heads, to undo llama.cpp's Q/K row permutation (`None` when the family has none).
    pub unpermute: Option<(usize, usize)>,
    pub norm_plus_one: bool,
    pub arch: Arch,
    pub device: Device,
}

impl GgufLayer {
    fn part(&self, reader: &mut BufReader<File>, part: Part, name: &str) -> Result<Tensor> {
        let path = &self.file.path;
        let q = self
            .file
            .content
            .tensor(reader, name, &Device::Cpu)
            .map_err(|e| ModelError::Gguf { path: path.clone(), message: format!("tensor `{name}`: {e}") })?;
        let mut t = crate::gguf::dequantize_qtensor(&q, name, path)?;
        if let Some((heads, kv_heads)) = self.unpermute {
            match part {
                Part::Q => t = crate::gguf::unpermute_qk(&t, heads)?,
                Part::K => t = crate::gguf::unpermute_qk(&t, kv_heads)?,
                _ => {}
            }
        }
        if self.norm_plus_one && part.kind() == crate::weights::PartKind::Norm {
            t = (t - 1.0)?;
        }
        Ok(t.to_device(&self.device)?)
    }
}

impl LayerSource for GgufLayer {
    fn load(&self) -> Result<LayerWeights> {
        let path = &self.file.path;
        let mut reader = BufReader::new(File::open(path).map_err(|e| ModelError::io(path, e))?);
        LayerWeights::build(&self.arch, |p| {
            let name = part_name(&self.parts, p)?;
            self.part(&mut reader, p, name)
        })
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
}

/// The parts of a layer of `arch`, in [`Part::ALL`] order, with the name `name(part)` of each.
pub(crate) fn layer_parts(arch: &Arch, mut name: impl FnMut(Part) -> String) -> Vec<(Part, String)> {
    Part::ALL.iter().filter(|p| p.present(arch)).map(|&p| (p, name(p))).collect()
}

fn part_name(parts: &[(Part, String)], p: Part) -> Result<&str> {
    parts
        .iter()
        .find(|(q, _)| *q == p)
        .map(|(_, n)| n.as_str())
        .ok_or_else(|| ModelError::InvalidArgument(format!("a mapped layer has no {p:?}")))
}

/// Maps the opened regular file `file` (at `path`) read-only.
pub(crate) fn map_file(file: &File, path: &Path) -> Result<memmap2::Mmap> {
    // SAFETY: the map is read-only; the caller opened a regular file. A concurrent truncation by another process
    // is the one hazard (SIGBUS), as for every mmap-based model loader.
    unsafe { memmap2::Mmap::map(file) }.map_err(|e| ModelError::io(path, e))
}
