//! Schedules for `slm run`: a TOML file naming a model, calibration settings and pipelines of steps (`depth`,
//! `width`, `lora`, `eval`, and `export`: the model so far as `<step dir>/model.gguf` for llama.cpp) whose options are the subcommands' own flags (`target_layers = 13` is
//! `--target-layers 13`). Everything is parsed and checked by the subcommands' own argument parsers before any
//! work starts; errors name the file, the line and the key.
//!
//! ```toml
//! model = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! out = "out/demo"                  # `slm run --out` overrides
//! [calibration]                     # given to depth and width steps
//! samples = 10
//! [defaults.eval]                   # under every eval step's own options
//! tasks = "avg7,wikitext2-128"
//! limit = 100
//! [[pipeline]]
//! name = "slm+width"
//! budget = 0.65                     # keep 65% of the dense parameters...
//! depth_share = 0.5                 # ...removing half of the 35% by depth, the rest by width
//! steps = [{ step = "depth", method = "slm", merge = "top" }, { step = "width" }, { step = "eval" }]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::FromArgMatches;
use serde::Deserialize;
use toml::{Spanned, Table, Value};

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepKind {
    Depth,
    Width,
    Lora,
    Eval,
    /// `slm export` of the pipeline's model so far to `<dir>/model.gguf` (for llama.cpp); the model is unchanged.
    Export,
}

impl StepKind {
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Depth => "depth",
            StepKind::Width => "width",
            StepKind::Lora => "lora",
            StepKind::Eval => "eval",
            StepKind::Export => "export",
        }
    }

    /// Option keys that decide how much a step removes (a pipeline budget sets them instead).
    fn stop_keys(self) -> &'static [&'static str] {
        match self {
            StepKind::Depth => &["threshold", "target_ratio", "target_layers"],
            StepKind::Width => &["pruning_ratio", "target_ratio"],
            _ => &[],
        }
    }
}

/// One step: its kind, its options in file order (defaults first, then the step's own), and where it is.
#[derive(Debug, Clone)]
pub struct Step {
    pub kind: StepKind,
    pub options: Vec<(String, Value)>,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    /// Share of the dense model's parameters to keep, in (0, 1).
    pub budget: Option<f64>,
    /// Share of the removed parameters that depth steps remove (the rest: width).
    pub depth_share: f64,
    pub steps: Vec<Step>,
}

/// Report settings (`[report]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportSettings {
    /// Decode steps for the report's tokens/s (0: not measured).
    pub decode_tokens: usize,
    pub prompt_tokens: usize,
    /// Draw the dense model's layer-similarity heat map with each pipeline's merged groups.
    pub similarity: bool,
}

impl Default for ReportSettings {
    fn default() -> Self {
        ReportSettings { decode_tokens: 32, prompt_tokens: 64, similarity: true }
    }
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub path: PathBuf,
    pub model: PathBuf,
    pub out: Option<PathBuf>,
    /// `[calibration]` as flags of depth/width (calib, samples, seq_len, seed).
    pub calibration: Vec<(String, Value)>,
    pub report: ReportSettings,
    pub pipelines: Vec<Pipeline>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSchedule {
    model: String,
    out: Option<String>,
    #[serde(default)]
    calibration: Table,
    #[serde(default)]
    defaults: BTreeMap<String, Table>,
    #[serde(default)]
    report: ReportSettings,
    #[serde(default)]
    pipeline: Vec<FilePipeline>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePipeline {
    name: String,
    budget: Option<f64>,
    depth_share: Option<f64>,
    steps: Vec<Spanned<Table>>,
}

/// 1-based line of byte offset `at`.
fn line_of(src: &str, at: usize) -> usize {
    src[..at.min(src.len())].matches('\n').count() + 1
}

/// The line of `key = ...` inside the byte range `span` (the step's table), else the table's first line.
fn key_line(src: &str, span: std::ops::Range<usize>, key: &str) -> usize {
    let text = &src[span.start.min(src.len())..span.end.min(src.len())];
    let mut from = 0;
    while let Some(i) = text[from..].find(key) {
        let at = from + i;
        let before_ok = at == 0 || !text.as_bytes()[at - 1].is_ascii_alphanumeric() && text.as_bytes()[at - 1] != b'_';
        let rest = text[at + key.len()..].trim_start();
        if before_ok && rest.starts_with('=') {
            return line_of(src, span.start + at);
        }
        from = at + key.len();
    }
    line_of(src, span.start)
}

/// `--flag value` arguments for options: `a_b = 1` → `--a-b 1`; `true` → `--a-b`; `false` → nothing; arrays are
/// comma-joined.
pub fn option_args(options: &[(String, Value)]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for (k, v) in options {
        let flag = format!("--{}", k.replace('_', "-"));
        let scalar = |v: &Value| -> anyhow::Result<String> {
            Ok(match v {
                Value::String(s) => s.clone(),
                Value::Integer(i) => i.to_string(),
                Value::Float(f) => f.to_string(),
                other => bail!("`{k}`: expected a string or a number, got {}", other.type_str()),
            })
        };
        match v {
            Value::Boolean(true) => out.push(flag),
            Value::Boolean(false) => {}
            Value::Array(items) => {
                out.push(flag);
                out.push(items.iter().map(scalar).collect::<anyhow::Result<Vec<_>>>()?.join(","));
            }
            other => {
                out.push(flag);
                out.push(scalar(other)?);
            }
        }
    }
    Ok(out)
}

/// Parses `argv` (`[name, positional..., --flags...]`) with a subcommand's own clap parser.
pub fn parse_args<A: clap::Args + FromArgMatches>(name: &'static str, argv: &[String]) -> Result<A, clap::Error> {
    let cmd = A::augment_args(clap::Command::new(name).no_binary_name(false));
    let m = cmd.try_get_matches_from(argv)?;
    A::from_arg_matches(&m)
}

/// The argument vector of a step, as its subcommand takes it. `input`/`out` are the step's model and output.
pub fn step_argv(
    step: &Step,
    calibration: &[(String, Value)],
    input: &Path,
    out: &Path,
    extra: &[(String, Value)],
) -> anyhow::Result<Vec<String>> {
    let mut argv = vec![step.kind.name().to_string(), input.display().to_string()];
    match step.kind {
        StepKind::Depth | StepKind::Width => {
            argv.extend(["--out".into(), out.display().to_string()]);
            let own: Vec<&str> = step.options.iter().map(|(k, _)| k.as_str()).collect();
            let calib: Vec<(String, Value)> =
                calibration.iter().filter(|(k, _)| !own.contains(&k.as_str())).cloned().collect();
            argv.extend(option_args(&calib)?);
        }
        StepKind::Lora => argv.extend(["--out".into(), out.display().to_string(), "--merge".into()]),
        StepKind::Eval => argv.extend(["--output-path".into(), out.join("results.json").display().to_string()]),
        StepKind::Export => argv.extend(["--out".into(), out.join("model.gguf").display().to_string()]),
    }
    argv.extend(option_args(&step.options)?);
    argv.extend(option_args(extra)?);
    Ok(argv)
}

/// A step's arguments as its subcommand parsed them.
pub enum StepArgs {
    Depth(super::depth::Args),
    Width(super::width::Args),
    Lora(super::lora::Args),
    Eval(super::eval::Args),
    Export(super::export::Args),
}

/// Parses a step's argument vector with its subcommand's own parser (nothing runs).
pub fn parse_step(kind: StepKind, argv: &[String]) -> Result<StepArgs, clap::Error> {
    Ok(match kind {
        StepKind::Depth => StepArgs::Depth(parse_args("depth", argv)?),
        StepKind::Width => StepArgs::Width(parse_args("width", argv)?),
        StepKind::Lora => StepArgs::Lora(parse_args("lora", argv)?),
        StepKind::Eval => StepArgs::Eval(parse_args("eval", argv)?),
        StepKind::Export => StepArgs::Export(parse_args("export", argv)?),
    })
}

/// The first line of a clap error, without its "error: " prefix.
fn clap_message(e: &clap::Error) -> String {
    let s = e.to_string();
    let first = s.lines().next().unwrap_or("").trim();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Reads and checks a schedule; nothing runs.
pub fn parse(path: &Path) -> anyhow::Result<Schedule> {
    let src = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read the schedule", path.display()))?;
    let file: FileSchedule = toml::from_str(&src).map_err(|e| {
        let line = e.span().map(|s| format!("line {}: ", line_of(&src, s.start))).unwrap_or_default();
        anyhow!("{}: {line}{}", path.display(), e.message())
    })?;
    let at = |line: usize| format!("{}: line {line}", path.display());
    let calibration: Vec<(String, Value)> = file.calibration.into_iter().collect();
    for (k, _) in &calibration {
        if !["calib", "data_dir", "samples", "seq_len", "seed"].contains(&k.as_str()) {
            bail!(
                "{}: [calibration]: unknown key `{k}` (expected calib, data_dir, samples, seq_len, seed)",
                path.display()
            );
        }
    }
    for k in file.defaults.keys() {
        if !["depth", "width", "lora", "eval", "export"].contains(&k.as_str()) {
            bail!(
                "{}: [defaults.{k}]: unknown step `{k}` (expected depth, width, lora, eval or export)",
                path.display()
            );
        }
    }
    if file.pipeline.is_empty() {
        bail!("{}: no [[pipeline]]", path.display());
    }
    let mut names = std::collections::HashSet::new();
    let mut pipelines = Vec::new();
    for p in file.pipeline {
        let where_ = format!("{}: pipeline `{}`", path.display(), p.name);
        if p.name.is_empty() || p.name.contains(['/', '\\']) || p.name.starts_with('.') {
            bail!("{where_}: a name must be non-empty and usable as a directory name");
        }
        if !names.insert(p.name.clone()) {
            bail!("{where_}: the name is used twice");
        }
        if let Some(b) = p.budget {
            if !(b > 0.0 && b < 1.0) {
                bail!("{where_}: budget (share of parameters kept) must be in (0, 1), got {b}");
            }
        }
        if p.steps.is_empty() {
            bail!("{where_}: no steps");
        }
        let has = |k: &str| p.steps.iter().any(|s| s.get_ref().get("step").and_then(Value::as_str) == Some(k));
        let depth_share = match (p.depth_share, has("depth"), has("width")) {
            (Some(s), _, _) if !(0.0..=1.0).contains(&s) => bail!("{where_}: depth_share must be in [0, 1], got {s}"),
            (Some(s), _, _) => s,
            (None, true, true) if p.budget.is_some() => {
                bail!("{where_}: a budget over depth and width steps needs depth_share (the share removed by depth)")
            }
            (None, _, width) => {
                if width {
                    0.0
                } else {
                    1.0
                }
            }
        };
        let mut steps = Vec::new();
        for (i, spanned) in p.steps.iter().enumerate() {
            let span = spanned.span();
            let table = spanned.get_ref();
            let line = line_of(&src, span.start);
            let kind = match table.get("step").and_then(Value::as_str) {
                Some("depth") => StepKind::Depth,
                Some("width") => StepKind::Width,
                Some("lora") => StepKind::Lora,
                Some("eval") => StepKind::Eval,
                Some("export") => StepKind::Export,
                Some(other) => bail!(
                    "{}, key `step`: pipeline `{}` step {}: unknown step `{other}` (expected depth, width, lora, eval or export)",
                    at(key_line(&src, span.clone(), "step")),
                    p.name,
                    i + 1
                ),
                None => bail!("{}: pipeline `{}` step {}: no `step = \"...\"` key", at(line), p.name, i + 1),
            };
            let mut options: Vec<(String, Value)> =
                file.defaults.get(kind.name()).map(|t| t.clone().into_iter().collect()).unwrap_or_default();
            for (k, v) in table.iter().filter(|(k, _)| k.as_str() != "step") {
                let kl = key_line(&src, span.clone(), k);
                if ["out", "output_path", "model"].contains(&k.as_str()) {
                    bail!("{}, key `{k}`: pipeline `{}`: `{k}` is set by `slm run` (each step writes into the pipeline's directory)", at(kl), p.name);
                }
                if p.budget.is_some() && kind.stop_keys().contains(&k.as_str()) {
                    bail!(
                        "{}, key `{k}`: pipeline `{}` has a budget, which sets how much each step removes; drop `{k}`",
                        at(kl),
                        p.name
                    );
                }
                options.retain(|(d, _)| d != k);
                options.push((k.clone(), v.clone()));
            }
            let step = Step { kind, options, line };
            // A budget stands in for the stop options: check with a placeholder value.
            let extra: Vec<(String, Value)> = match (kind, p.budget) {
                (StepKind::Depth, Some(_)) => vec![("target_layers".into(), Value::Integer(1))],
                (StepKind::Width, Some(_)) => vec![("target_ratio".into(), Value::Float(0.1))],
                _ => vec![],
            };
            if p.budget.is_none()
                && !kind.stop_keys().is_empty()
                && !step.options.iter().any(|(k, _)| kind.stop_keys().contains(&k.as_str()))
            {
                bail!(
                    "{}: pipeline `{}` step {} ({}): give the pipeline a budget or the step one of {}",
                    at(line),
                    p.name,
                    i + 1,
                    kind.name(),
                    kind.stop_keys().join(", ")
                );
            }
            let argv = step_argv(&step, &calibration, Path::new("MODEL"), Path::new("OUT"), &extra)
                .map_err(|e| anyhow!("{}: pipeline `{}` step {}: {e}", at(line), p.name, i + 1))?;
            if let Err(e) = parse_step(kind, &argv) {
                // Name the offending key when clap names its flag.
                let msg = clap_message(&e);
                let key =
                    step.options.iter().map(|(k, _)| k).find(|k| msg.contains(&format!("--{}", k.replace('_', "-"))));
                let (l, key_text) = match key {
                    Some(k) => (key_line(&src, span.clone(), k), format!(", key `{k}`")),
                    None => (line, String::new()),
                };
                let msg = msg.replace("unexpected argument", "unknown option");
                bail!("{}{key_text}: pipeline `{}` step {} ({}): {msg}", at(l), p.name, i + 1, kind.name());
            }
            steps.push(step);
        }
        pipelines.push(Pipeline { name: p.name, budget: p.budget, depth_share, steps });
    }
    Ok(Schedule {
        path: path.to_path_buf(),
        model: PathBuf::from(file.model),
        out: file.out.map(PathBuf::from),
        calibration,
        report: file.report,
        pipelines,
    })
}
