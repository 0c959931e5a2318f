//! Outputs that never harm the user's files.
//!
//! Every command checks its output before any work ([`check_output`]):
//! - an output that is, contains or lies inside one of the command's inputs (the model, a data file, a
//!   schedule) is refused;
//! - an existing output is replaced only when it is an earlier slm output of the same kind (it carries an
//!   [`OutputStamp`]: `slm_output.json` in a directory, an `slm_output` key in a JSON file) or an empty
//!   directory; anything else is refused unless `--force`.
//!
//! Outputs are written atomically (a temporary sibling renamed into place); temporaries that a killed run left
//! behind are removed by the next write beside them ([`remove_stale_temporaries`]).

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// File name of the stamp inside an output directory.
pub const STAMP_FILE: &str = "slm_output.json";
/// Key of the stamp inside an output JSON file.
pub const STAMP_KEY: &str = "slm_output";
/// Version of the stamp's layout.
pub const STAMP_VERSION: u32 = 1;

/// What slm writes. The stamp of an output names its kind, so one kind never replaces another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputKind {
    /// An HF model directory (`slm export`, `depth`, `width`, `lora --merge`).
    Model,
    /// LoRA adapter files and `slm_lora.json`.
    Lora,
    /// `slm similarity`'s matrices and heat maps.
    Similarity,
    /// `slm run`'s pipeline directories and report.
    Run,
    /// `slm eval`'s results JSON.
    EvalResults,
    /// `slm bench --json`.
    Bench,
    /// `slm_plan.json` of a depth-pruned model.
    DepthPlan,
    /// `slm_plan.json` of a width-pruned model.
    WidthPlan,
    /// `slm_plan.json` of a model merged from LoRA adapters.
    MergedPlan,
    /// `slm_lora.json`: the record of a LoRA training run, beside its adapter.
    LoraRun,
    /// `slm_step.json`: the key of a finished `slm run` step.
    StepMarker,
    /// `report.json` of `slm run`.
    RunReport,
    /// A GGUF model file (`slm export --out FILE.gguf`); its stamp is the metadata key `slm.output`.
    Gguf,
}

impl OutputKind {
    pub fn name(self) -> &'static str {
        match self {
            OutputKind::Model => "model",
            OutputKind::Lora => "lora",
            OutputKind::Similarity => "similarity",
            OutputKind::Run => "run",
            OutputKind::EvalResults => "eval-results",
            OutputKind::Bench => "bench",
            OutputKind::DepthPlan => "depth-plan",
            OutputKind::WidthPlan => "width-plan",
            OutputKind::MergedPlan => "merged-plan",
            OutputKind::LoraRun => "lora-run",
            OutputKind::StepMarker => "step-marker",
            OutputKind::RunReport => "run-report",
            OutputKind::Gguf => "gguf-model",
        }
    }

    /// Directory outputs carry [`STAMP_FILE`]; file outputs carry [`STAMP_KEY`].
    pub fn is_dir(self) -> bool {
        matches!(self, OutputKind::Model | OutputKind::Lora | OutputKind::Similarity | OutputKind::Run)
    }
}

/// The mark of an slm output: its kind and the stamp layout's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputStamp {
    pub kind: OutputKind,
    pub version: u32,
}

impl OutputStamp {
    pub fn new(kind: OutputKind) -> Self {
        OutputStamp { kind, version: STAMP_VERSION }
    }

    /// The stamp file's bytes.
    pub fn file_bytes(self) -> Vec<u8> {
        serde_json::to_vec_pretty(&self).unwrap_or_default()
    }

    /// The stamp as a JSON value (for the [`STAMP_KEY`] of a JSON output).
    pub fn json(self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// Whether an existing output may be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// Only an earlier slm output of the same kind, or an empty directory.
    SlmOutputOfSameKind,
    /// Anything that is not an input (`--force`).
    Force,
}

impl Replace {
    pub fn from_force(force: bool) -> Self {
        if force {
            Replace::Force
        } else {
            Replace::SlmOutputOfSameKind
        }
    }
}

fn refuse(out: &Path, message: String) -> ModelError {
    ModelError::Output { path: out.to_path_buf(), message }
}

/// An absolute path with `.` and `..` resolved, symbolic links followed as far as the path exists.
pub fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    // Canonicalise the longest existing ancestor, then append the rest lexically.
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(base) = std::fs::canonicalize(cur) {
            let mut out = base;
            for c in rest.iter().rev() {
                if c == ".." {
                    out.pop();
                } else if c != "." {
                    out.push(c);
                }
            }
            return out;
        }
        match (cur.file_name(), cur.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => break,
        }
    }
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The stamp of an existing output, if it has one.
pub fn read_stamp(out: &Path, dir: bool) -> Option<OutputStamp> {
    // Regular files only (a FIFO named like a stamp would block the check); a results file is a few hundred kB,
    // anything much larger is not one of ours.
    if dir {
        serde_json::from_slice(&crate::files::read_regular_file(&out.join(STAMP_FILE), 1 << 20).ok()?).ok()
    } else {
        let v: serde_json::Value =
            serde_json::from_slice(&crate::files::read_regular_file(out, 256 << 20).ok()?).ok()?;
        serde_json::from_value(v.get(STAMP_KEY)?.clone()).ok()
    }
}

/// A typed record from a JSON file that slm wrote between steps: its [`STAMP_KEY`] must name `kind` at this
/// version. The error (a message naming `path`) says what was found instead: no stamp, another kind, another
/// version, or a field the type does not accept.
pub fn from_stamped_json<T: serde::de::DeserializeOwned>(
    v: serde_json::Value,
    kind: OutputKind,
    path: &Path,
) -> std::result::Result<T, String> {
    let at = |m: String| format!("{}: {m}", path.display());
    let stamp = v.get(STAMP_KEY).ok_or_else(|| {
        at(format!("no `{STAMP_KEY}` stamp (not written by this version of slm); expected a {} file", kind.name()))
    })?;
    let stamp: OutputStamp =
        serde_json::from_value(stamp.clone()).map_err(|e| at(format!("`{STAMP_KEY}` is malformed: {e}")))?;
    if stamp.kind != kind {
        return Err(at(format!("a {} file, not a {} file", stamp.kind.name(), kind.name())));
    }
    if stamp.version != STAMP_VERSION {
        return Err(at(format!(
            "a {} file of version {}; this slm reads version {STAMP_VERSION}",
            kind.name(),
            stamp.version
        )));
    }
    serde_json::from_value(v).map_err(|e| at(format!("not a valid {} file: {e}", kind.name())))
}

/// Reads a JSON file that slm wrote between steps (a regular file of at most 256 MiB) as the typed record of
/// `kind` ([`from_stamped_json`]). Every message names `path`.
pub fn read_stamped_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    kind: OutputKind,
) -> std::result::Result<T, String> {
    let bytes = crate::files::read_regular_file(path, 256 << 20).map_err(|e| e.to_string())?;
    let v = serde_json::from_slice(&bytes).map_err(|e| format!("{}: not valid JSON: {e}", path.display()))?;
    from_stamped_json(v, kind, path)
}

/// Checks an output path before any work: not an input, not inside one, not containing one; an existing output
/// only when `replace` allows it (see the module docs). `inputs` that do not exist are ignored.
pub fn check_output(out: &Path, kind: OutputKind, inputs: &[&Path], replace: Replace) -> Result<()> {
    let target = resolve(out);
    for input in inputs {
        if !input.exists() {
            continue;
        }
        let inp = resolve(input);
        let what = if inp == target {
            "is the input"
        } else if target.starts_with(&inp) {
            "lies inside the input"
        } else if inp.starts_with(&target) {
            "contains the input"
        } else {
            continue;
        };
        return Err(refuse(out, format!("the output {what} {}; choose another output path", input.display())));
    }
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    if meta.file_type().is_symlink() {
        return Err(refuse(out, "the output is a symbolic link; give the real path".into()));
    }
    if kind.is_dir() {
        if !meta.is_dir() {
            return Err(refuse(
                out,
                format!("exists and is not a directory; slm writes a {} directory there", kind.name()),
            ));
        }
        let empty = std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if empty || replace == Replace::Force {
            return Ok(());
        }
    } else {
        if !meta.is_file() {
            return Err(refuse(
                out,
                format!("exists and is not a regular file; slm writes a {} file there", kind.name()),
            ));
        }
        if replace == Replace::Force {
            return Ok(());
        }
    }
    let stamp =
        if kind == OutputKind::Gguf { crate::gguf_write::read_gguf_stamp(out) } else { read_stamp(out, kind.is_dir()) };
    match stamp {
        Some(s) if s.kind == kind && s.version == STAMP_VERSION => Ok(()),
        Some(s) if s.kind != kind => Err(refuse(
            out,
            format!("exists and is an slm {} output, not a {} output; refusing to replace it", s.kind.name(), kind.name()),
        )),
        Some(s) => Err(refuse(
            out,
            format!("exists and is an slm output of version {} (this slm writes {STAMP_VERSION}); pass --force to replace it", s.version),
        )),
        None => Err(refuse(
            out,
            "exists and is not an earlier slm output of this kind; refusing to replace it (pass --force to replace it)"
                .into(),
        )),
    }
}

/// Creates the output directory `out` (checked by [`check_output`]) and stamps it as `kind`, before the files
/// are written into it one by one.
pub fn stamp_dir(out: &Path, kind: OutputKind) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    crate::hf::write_file_atomically(&out.join(STAMP_FILE), &OutputStamp::new(kind).file_bytes())
}

/// The temporary sibling of `path` for this process: `.NAME.TAG-PID`.
pub fn temporary_sibling(path: &Path, tag: &str) -> PathBuf {
    let parent = parent_dir(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    parent.join(format!(".{name}.{tag}-{}", std::process::id()))
}

/// The directory a path lives in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Removes the temporaries `.NAME.tmp-PID` / `.NAME.old-PID` (and `.NAME.tmp-PID.EXT`) beside `path` left by
/// runs that are no longer alive: a killed run cannot clean up after itself, so the next one does.
pub fn remove_stale_temporaries(path: &Path) {
    let parent = parent_dir(path);
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else { return };
    let Ok(entries) = std::fs::read_dir(&parent) else { return };
    for e in entries.flatten() {
        let fname = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = fname.strip_prefix(&format!(".{name}.")) else { continue };
        let Some((tag, pid)) = rest.split_once('-') else { continue };
        if tag != "tmp" && tag != "old" {
            continue;
        }
        let pid = pid.split('.').next().unwrap_or("");
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let p = e.path();
        tracing::info!("removing {} left by an earlier run (process {pid} is gone)", p.display());
        let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
    }
}

/// Whether a process with this id exists (Linux: `/proc/PID`; elsewhere assumed alive, so nothing is removed).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_overlapping_an_input_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let model = d.path().join("m");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), b"{}").unwrap();
        let r = Replace::Force;
        for (out, what) in [
            (model.clone(), "is the input"),
            (model.join("config.json"), "lies inside"),
            (model.join("sub/x"), "lies inside"),
            (d.path().to_path_buf(), "contains the input"),
            (model.join("../m/./sub"), "lies inside"),
        ] {
            let e = check_output(&out, OutputKind::Model, &[&model], r).unwrap_err().to_string();
            assert!(e.contains(what), "{}: {e}", out.display());
        }
        check_output(&d.path().join("other"), OutputKind::Model, &[&model], r).unwrap();
    }

    #[test]
    fn only_an_earlier_output_of_the_same_kind_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("o");
        std::fs::create_dir(&out).unwrap();
        let keep = Replace::SlmOutputOfSameKind;
        check_output(&out, OutputKind::Model, &[], keep).unwrap(); // empty
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        let e = check_output(&out, OutputKind::Model, &[], keep).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        check_output(&out, OutputKind::Model, &[], Replace::Force).unwrap();
        std::fs::write(out.join(STAMP_FILE), OutputStamp::new(OutputKind::Lora).file_bytes()).unwrap();
        let e = check_output(&out, OutputKind::Model, &[], keep).unwrap_err().to_string();
        assert!(e.contains("slm lora output"), "{e}");
        std::fs::write(out.join(STAMP_FILE), OutputStamp::new(OutputKind::Model).file_bytes()).unwrap();
        check_output(&out, OutputKind::Model, &[], keep).unwrap();

        let f = d.path().join("r.json");
        std::fs::write(&f, b"{\"results\": {}}").unwrap();
        assert!(check_output(&f, OutputKind::EvalResults, &[], keep).is_err());
        let stamped = serde_json::json!({"results": {}, STAMP_KEY: OutputStamp::new(OutputKind::EvalResults).json()});
        std::fs::write(&f, stamped.to_string()).unwrap();
        check_output(&f, OutputKind::EvalResults, &[], keep).unwrap();
        assert!(check_output(&f, OutputKind::Bench, &[], keep).is_err());
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("model");
        // PID 4194304 is above Linux's largest pid_max, so no such process exists.
        let dead = d.path().join(".model.tmp-4194304");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("model.safetensors"), b"partial").unwrap();
        let dead_file = d.path().join(".model.old-4194304");
        std::fs::write(&dead_file, b"x").unwrap();
        let mine = temporary_sibling(&out, "tmp");
        std::fs::create_dir(&mine).unwrap();
        let other = d.path().join(".modelx.tmp-4194304");
        std::fs::write(&other, b"x").unwrap();
        remove_stale_temporaries(&out);
        assert!(!dead.exists() && !dead_file.exists());
        assert!(mine.exists(), "this process's own temporary stays");
        assert!(other.exists(), "another output's temporary stays");
    }
}
