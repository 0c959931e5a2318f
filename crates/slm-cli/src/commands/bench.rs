//! `slm bench MODEL [--compare OTHER]`: prefill and decode tokens/s and peak memory, batch 1, greedy decoding
//! with a KV cache (the paper's efficiency table). Warm-up runs are excluded; medians over `--runs`. Each model is
//! measured in its own child process, so its peak RSS is its own.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use slm_model::output::{OutputKind, OutputStamp};
use slm_model::Model;

use super::CommonArgs;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// An HF directory or a .gguf file.
    pub model: PathBuf,
    /// Another model measured the same way, shown side by side (ratios against MODEL).
    #[arg(long)]
    pub compare: Vec<PathBuf>,
    /// Prompt length (a window of the calibration corpus).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Decode steps after the prefill.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Also write the measurements as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Measure MODEL alone in this process and print one JSON line (what the parent runs per model).
    #[arg(long, hide = true)]
    pub single: bool,
    #[command(flatten)]
    pub compute: super::ComputeArgs,
}

/// The `--json` file: the stamp of an slm bench output, then one measurement per model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub slm_output: OutputStamp,
    pub results: Vec<BenchResult>,
}

/// One model's measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    pub model: String,
    pub layers: usize,
    pub parameters: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub runs: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Peak resident memory of the measuring process (MiB); None off Linux.
    pub peak_rss_mib: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Times greedy generation on a loaded model (used by `slm bench` and by `slm run`'s report).
pub fn measure(
    model: &Model,
    name: &str,
    prompt_tokens: usize,
    new_tokens: usize,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<BenchResult> {
    if runs == 0 || prompt_tokens == 0 {
        bail!("bench needs at least one run and one prompt token");
    }
    let prompt = match model.tokenizer() {
        Ok(tok) => slm_model::data::default_calibration_corpus(None)
            .and_then(|corpus| slm_model::calib::calibration_windows(&corpus, tok, 1, prompt_tokens, 0))
            .map(|mut w| w.remove(0))
            .unwrap_or_else(|_| (0..prompt_tokens as u32).map(|i| 100 + i % 1000).collect()),
        Err(_) => (0..prompt_tokens as u32).map(|i| i % model.spec.vocab_size as u32).collect(),
    };
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for r in 0..warmup + runs {
        let g = model.generate_greedy(&prompt, new_tokens, false)?;
        if r >= warmup {
            prefill.push(prompt.len() as f64 / g.prefill_seconds);
            decode.push(g.decode_steps as f64 / g.decode_seconds.max(1e-12));
        }
    }
    Ok(BenchResult {
        model: name.to_string(),
        layers: model.spec.num_layers(),
        parameters: model.spec.num_parameters(),
        prompt_tokens: prompt.len(),
        new_tokens,
        runs,
        prefill_tokens_per_s: median(prefill),
        decode_tokens_per_s: median(decode),
        peak_rss_mib: super::memory_mib().map(|(_, peak)| peak),
    })
}

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    if args.single {
        let model = args.compute.compute_dtype.apply(&common.load_model(&args.model, slm_model::Residency::Auto)?)?;
        let r = measure(
            &model,
            &args.model.display().to_string(),
            args.prompt_tokens,
            args.new_tokens,
            args.warmup,
            args.runs,
        )?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    if let Some(p) = &args.json {
        let inputs: Vec<&Path> = std::iter::once(&args.model).chain(&args.compare).map(PathBuf::as_path).collect();
        common.check_output("--json", p, OutputKind::Bench, &inputs)?;
    }
    let exe = std::env::current_exe().context("locating the slm binary")?;
    let mut results = Vec::new();
    for path in std::iter::once(&args.model).chain(&args.compare) {
        if !path.exists() {
            bail!("{}: model path does not exist", path.display());
        }
        tracing::info!(model = %path.display(), "measuring");
        let mut child = Command::new(&exe);
        child.arg("--device").arg(&common.device);
        if let Some(w) = common.weights {
            child.arg("--weights").arg(w.name());
        }
        let out = child
            .arg("bench")
            .arg(path)
            .args([
                "--single",
                "--prompt-tokens",
                &args.prompt_tokens.to_string(),
                "--new-tokens",
                &args.new_tokens.to_string(),
            ])
            .args(["--warmup", &args.warmup.to_string(), "--runs", &args.runs.to_string()])
            .args(["--compute-dtype", args.compute.compute_dtype.name()])
            .output()
            .context("running the measuring child process")?;
        if !out.status.success() {
            bail!("measuring {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let r: BenchResult = serde_json::from_str(line.trim())
            .with_context(|| format!("reading the measurement of {}", path.display()))?;
        results.push(r);
    }
    let base = results[0].clone();
    println!(
        "batch 1, prompt {} tokens, {} decode steps, medians of {} runs after {} warm-up",
        base.prompt_tokens, args.new_tokens, args.runs, args.warmup
    );
    println!("| model | layers | params | prefill tok/s | decode tok/s | decode × | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {:.1}M | {:.0} | {:.1} | {:.2} | {} |",
            r.model,
            r.layers,
            r.parameters as f64 / 1e6,
            r.prefill_tokens_per_s,
            r.decode_tokens_per_s,
            r.decode_tokens_per_s / base.decode_tokens_per_s,
            r.peak_rss_mib.map_or("-".into(), |m| format!("{m:.0}"))
        );
    }
    if let Some(p) = &args.json {
        let report = BenchReport { slm_output: OutputStamp::new(OutputKind::Bench), results };
        slm_model::write_file_atomically(p, &serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}
