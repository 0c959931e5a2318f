//! `slm eval MODEL --tasks a,b,... [--limit N] [--batch-size B] [--output-path P] [--log-samples]`: zero-shot
//! evaluation with lm-evaluation-harness 0.4.13's prompts, scoring and results layout.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use slm_eval::{
    reports_avg7, results_file_name, results_json, sanitize_model_name, to_pretty_string, to_python_line, RunInfo,
    Task, TaskRun,
};
use slm_model::output::OutputKind;

use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF directory or a .gguf file.
    pub model: PathBuf,
    /// Comma-separated tasks: boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, wikitext,
    /// wikitext2-128; `avg7` stands for the first seven.
    #[arg(long, value_delimiter = ',', required = true, value_parser = task_name)]
    pub tasks: Vec<String>,
    /// Evaluate only the first N documents of each task (wikitext2-128: the first N windows).
    #[arg(long, value_parser = super::positive_usize)]
    pub limit: Option<usize>,
    /// Sequences per forward pass (a sequence holds one context and all its continuations).
    #[arg(long, default_value_t = 16, value_parser = super::positive_usize)]
    pub batch_size: usize,
    /// Directory holding the task JSONL files (names as in data/README.md) [default: $SLM_DATA_DIR, else
    /// share/slm/data beside the installed binary, else the source checkout's data/].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Truncate requests on the left to this many tokens (default: the model's max_position_embeddings).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Where to write the results JSON: a `.json` file, or a directory (lm-eval's layout:
    /// DIR/<model>/results_<time>.json).
    #[arg(long)]
    pub output_path: Option<PathBuf>,
    /// Also write per-document records (samples_<task>_<time>.jsonl) next to the results JSON.
    #[arg(long, requires = "output_path")]
    pub log_samples: bool,
    #[command(flatten)]
    pub compute: super::ComputeArgs,
}

/// One name of `--tasks`, checked as clap parses it (so `slm run --check` refuses a bad one).
fn task_name(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s == "avg7" || Task::from_name(s).is_ok() {
        Ok(s.to_string())
    } else {
        Err(format!(
            "unknown task `{s}` (known: {}, avg7)",
            slm_eval::TASKS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
        ))
    }
}

/// Task names from `--tasks`, expanded and checked before any work starts.
pub fn parse_tasks(names: &[String]) -> anyhow::Result<Vec<Task>> {
    let mut tasks: Vec<Task> = Vec::new();
    for n in names.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let expanded: Vec<&str> = if n == "avg7" { slm_eval::AVG7.iter().map(|(t, _)| *t).collect() } else { vec![n] };
        for e in expanded {
            let t = Task::from_name(e).context("--tasks")?;
            if !tasks.contains(&t) {
                tasks.push(t);
            }
        }
    }
    if tasks.is_empty() {
        bail!("--tasks: no task given");
    }
    Ok(tasks)
}

struct Bar(Option<ProgressBar>);

impl slm_eval::Progress for Bar {
    fn start(&mut self, task: &str, requests: u64) {
        let pb = ProgressBar::new(requests);
        pb.set_style(
            ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} requests  {elapsed} < ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        pb.set_prefix(task.to_string());
        self.0 = Some(pb);
    }
    fn advance(&mut self, requests: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(requests);
        }
    }
    fn finish(&mut self) {
        if let Some(pb) = self.0.take() {
            pb.finish_and_clear();
        }
    }
}

/// One task's entry of the results' `throughput`: what was computed and how fast (useful GFLOP/s counts the layer
/// and LM-head matmuls of the tokens run, as [`slm_eval::EngineStats::useful_flops`]).
fn throughput_record(
    docs: usize,
    requests: usize,
    stats: &slm_eval::EngineStats,
    flops: f64,
    secs: f64,
) -> serde_json::Value {
    serde_json::json!({
        "docs": docs,
        "requests": requests,
        "tokens": stats.tokens,
        "logit_rows": stats.logit_rows,
        "seconds": secs,
        "docs_per_s": docs as f64 / secs,
        "tokens_per_s": stats.tokens as f64 / secs,
        "useful_gflop_per_s": flops / secs / 1e9,
    })
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    let tasks = parse_tasks(&args.tasks)?;
    let data_dir = slm_model::data::find_data_dir(args.data_dir.as_deref())?;
    for t in &tasks {
        let p = t.data_path(&data_dir);
        if !p.is_file() {
            bail!("data file for task `{}` not found: {} (set --data-dir)", t.name(), p.display());
        }
    }
    let start_time = unix_now();
    let location = args.output_path.as_deref().map(|out| output_location(out, &args.model, start_time));
    if let Some((results_path, _)) = &location {
        common.check_output("--output-path", results_path, OutputKind::EvalResults, &[&args.model, &data_dir])?;
    }
    let model = args.compute.compute_dtype.apply(&common.load_model(&args.model, slm_model::Residency::Auto)?)?;
    let dtype_name = args.compute.compute_dtype.torch_name();
    let max_length = args.max_length.unwrap_or(model.spec.max_position_embeddings);
    if max_length < 2 {
        bail!("--max-length must be at least 2, got {max_length}");
    }
    let settings = slm_eval::Settings {
        data_dir: &data_dir,
        limit: args.limit,
        max_length,
        batch_size: args.batch_size,
        share_context: true,
    };
    let mut runs: Vec<TaskRun> = Vec::new();
    let mut throughput = serde_json::Map::new();
    let (mut flops, mut seconds) = (0.0, 0.0);
    for &task in &tasks {
        let t0 = Instant::now();
        let run = slm_eval::evaluate(&model, task, &settings, &mut Bar(None))
            .with_context(|| format!("task {}", task.name()))?;
        let (f, secs) = (run.stats.useful_flops(&model.spec), t0.elapsed().as_secs_f64());
        let docs = run.report.n_effective;
        tracing::info!(
            task = task.name(),
            docs,
            requests = run.requests,
            tokens = run.stats.tokens,
            seconds = format!("{secs:.1}"),
            docs_per_s = format!("{:.2}", docs as f64 / secs),
            tokens_per_s = format!("{:.0}", run.stats.tokens as f64 / secs),
            gflop_per_s = format!("{:.1}", f / secs / 1e9),
            "evaluated"
        );
        throughput.insert(task.name().to_string(), throughput_record(docs, run.requests, &run.stats, f, secs));
        flops += f;
        seconds += secs;
        runs.push(run);
    }
    tracing::info!(
        "useful compute: {:.1} GFLOP in {seconds:.1} s = {:.1} GFLOP/s (layer and LM-head matmuls of the tokens run)",
        flops / 1e9,
        flops / seconds / 1e9
    );
    let reports: Vec<_> = runs.iter().map(|r| r.report.clone()).collect();
    print!("{}", table(&reports));
    let avg = reports_avg7(&reports);
    if let Some(a) = avg {
        println!("\navg-7 (acc: boolq piqa winogrande arc_easy; acc_norm: hellaswag arc_challenge openbookqa): {a:.4}");
    }

    if let Some((results_path, dir)) = location {
        let tok = model.tokenizer().ok();
        let token = |id: Option<u32>| id.map(|i| (tok.and_then(|t| t.inner().id_to_token(i)).unwrap_or_default(), i));
        let info = RunInfo {
            model: "slm".into(),
            model_args: vec![
                ("pretrained".into(), args.model.display().to_string()),
                ("dtype".into(), dtype_name.into()),
            ],
            model_name: args.model.display().to_string(),
            model_num_parameters: model.spec.num_parameters() as u64,
            model_dtype: dtype_name.into(),
            batch_size: args.batch_size,
            device: common.device.clone(),
            limit: args.limit,
            max_length,
            pad_token: token(model.spec.eos_token_id),
            eos_token: token(model.spec.eos_token_id),
            bos_token: token(model.spec.bos_token_id),
            eot_token_id: model.spec.eos_token_id,
            start_time,
            end_time: unix_now(),
        };
        let mut json = results_json(&reports, &info, &data_dir.display().to_string());
        // slm's own key (lm-eval has none): how fast each task ran, on this machine, in this run.
        json["throughput"] = serde_json::Value::Object(throughput);
        slm_model::write_file_atomically(&results_path, to_pretty_string(&json).as_bytes())?;
        println!("results: {}", results_path.display());
        if args.log_samples {
            let stamp = results_file_name(start_time);
            let stamp = stamp.trim_start_matches("results_").trim_end_matches(".json");
            for run in &runs {
                let p = dir.join(format!("samples_{}_{stamp}.jsonl", run.report.task.name()));
                let mut text = String::new();
                for s in &run.samples {
                    text.push_str(&to_python_line(s));
                    text.push('\n');
                }
                slm_model::write_file_atomically(&p, text.as_bytes())?;
                println!("samples: {}", p.display());
            }
        }
    }
    Ok(())
}

/// lm-eval's `--output_path`: a path ending in `.json` is the results file itself; anything else is a directory
/// under which `<sanitised model name>/results_<time>.json` goes. Returns (results file, its directory).
fn output_location(out: &Path, model: &Path, start_time: f64) -> (PathBuf, PathBuf) {
    if out.extension().is_some_and(|e| e == "json") {
        let dir = out.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        (out.to_path_buf(), dir)
    } else {
        let dir = out.join(sanitize_model_name(&model.display().to_string()));
        (dir.join(results_file_name(start_time)), dir)
    }
}

/// lm-eval's markdown results table.
fn table(reports: &[slm_eval::TaskReport]) -> String {
    let mut s = String::from("|    Tasks    |Version|n-shot|    Metric     |   | Value  |   |Stderr|\n");
    s.push_str("|-------------|------:|-----:|---------------|---|-------:|---|-----:|\n");
    for r in reports {
        for (i, m) in r.metrics.iter().enumerate() {
            let (name, version) = if i == 0 {
                (r.task.name().to_string(), format!("{}", r.task.spec().version))
            } else {
                (String::new(), String::new())
            };
            let arrow = if m.metric.higher_is_better() { "↑" } else { "↓" };
            let stderr = m.stderr.map(|e| format!("{e:.4}")).unwrap_or_else(|| "N/A".into());
            s.push_str(&format!(
                "|{name:<13}|{version:>7}|{:>6}|{:<15}|{arrow}  |{:>8.4}|±  |{stderr:>6}|\n",
                0,
                m.metric.name(),
                m.value
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avg7_expands_and_duplicates_collapse() {
        let t = parse_tasks(&["avg7".into(), "boolq".into(), "wikitext2-128".into()]).unwrap();
        assert_eq!(t.len(), 8);
        assert_eq!(t[0].name(), "boolq");
        assert_eq!(t[7].name(), "wikitext2-128");
    }

    #[test]
    fn unknown_task_is_an_error_naming_it() {
        let e = parse_tasks(&["piqa".into(), "mmlu".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("mmlu"), "{e:#}");
    }

    #[test]
    fn output_path_json_file_or_directory() {
        let (f, d) = output_location(Path::new("out/r.json"), Path::new("m.gguf"), 0.0);
        assert_eq!((f.as_path(), d.as_path()), (Path::new("out/r.json"), Path::new("out")));
        let (f, d) = output_location(Path::new("out"), Path::new("models/x.gguf"), 0.0);
        assert_eq!(d, Path::new("out/models__x.gguf"));
        assert!(f.starts_with(&d) && f.to_string_lossy().ends_with(".json"));
    }
}
