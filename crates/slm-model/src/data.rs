//! Where the evaluation and calibration data live. The repository carries them in `data/` (sources and licences
//! in `data/README.md`); a command finds them from any working directory, and after `cargo install`, in this
//! order: an explicit `--data-dir`, the `SLM_DATA_DIR` environment variable, `share/slm/data` beside the
//! installed binary (`<prefix>/bin/slm` → `<prefix>/share/slm/data`), and the source checkout the binary was
//! built from. An error lists every place it looked.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// Environment variable naming the data directory.
pub const DATA_DIR_ENV: &str = "SLM_DATA_DIR";

/// The default calibration corpus inside the data directory (LAMBADA passages; see `data/README.md`).
pub const CALIBRATION_FILE: &str = "lambada_openai.test.jsonl";

/// The `data/` directory of the source checkout this crate was built from.
pub fn source_data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data")
}

/// The places searched for the data directory when no `--data-dir` is given, each with how it was found.
pub fn data_dir_candidates() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    if let Some(v) = std::env::var_os(DATA_DIR_ENV) {
        out.push((PathBuf::from(v), format!("${DATA_DIR_ENV}")));
    }
    if let Some(prefix) = std::env::current_exe().ok().and_then(|e| e.parent()?.parent().map(Path::to_path_buf)) {
        out.push((prefix.join("share/slm/data"), "beside the installed binary".into()));
    }
    out.push((source_data_dir(), "the source checkout".into()));
    out
}

/// The data directory: `explicit` when given (it must be a directory), else the first of
/// [`data_dir_candidates`] that is one. `$SLM_DATA_DIR`, when set, must name a directory.
pub fn find_data_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let not_found = |message: String| ModelError::DataDir { message };
    if let Some(d) = explicit {
        return if d.is_dir() {
            Ok(d.to_path_buf())
        } else {
            Err(not_found(format!("--data-dir {}: not a directory", d.display())))
        };
    }
    let candidates = data_dir_candidates();
    if let Some((p, how)) = candidates.iter().find(|(_, how)| how.starts_with('$')) {
        if !p.is_dir() {
            return Err(not_found(format!("{how} = {}: not a directory", p.display())));
        }
    }
    if let Some((p, _)) = candidates.iter().find(|(p, _)| p.is_dir()) {
        return Ok(p.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|(p, how)| format!("{} ({how})", p.display())).collect();
    Err(not_found(format!(
        "no data directory found; looked in: {}. Pass --data-dir DIR or set ${DATA_DIR_ENV}",
        looked.join(", ")
    )))
}

/// The default calibration corpus: [`CALIBRATION_FILE`] in the data directory found by [`find_data_dir`].
pub fn default_calibration_corpus(data_dir: Option<&Path>) -> Result<PathBuf> {
    Ok(find_data_dir(data_dir)?.join(CALIBRATION_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_checkout_holds_the_data() {
        // Every file the tasks and the calibration read is in the repository, not beside it.
        let d = source_data_dir();
        for f in [CALIBRATION_FILE, "boolq.validation.jsonl", "wikitext-2-raw-v1.test.jsonl", "README.md"] {
            assert!(d.join(f).is_file(), "{} missing", d.join(f).display());
        }
    }

    #[test]
    fn an_explicit_directory_wins_and_a_bad_one_is_named() {
        let tmp = std::env::temp_dir();
        assert_eq!(find_data_dir(Some(&tmp)).unwrap(), tmp);
        let e = find_data_dir(Some(Path::new("/no/such/dir"))).unwrap_err().to_string();
        assert!(e.contains("--data-dir /no/such/dir") && e.contains("not a directory"), "{e}");
    }
}
