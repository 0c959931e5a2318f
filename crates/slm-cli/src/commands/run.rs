//! `slm run SCHEDULE.toml [--out DIR]`: runs every pipeline of a schedule (see [`super::schedule`]), each into
//! its own directory `OUT/<pipeline>/<n>-<step>`, reusing a prefix another pipeline already computed (its
//! directory is a symlink to the first one) or a step a previous run finished (same key in its `slm_step.json`),
//! and writes `report.md`, `report.json` and PNG plots (the files' types: [`super::run_files`]). A failed step
//! stops its pipeline only; the report records the error and `slm run` exits non-zero at the end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use slm_model::output::OutputKind;
use slm_model::{Model, ModelSpec};
use std::collections::BTreeMap;
use toml::Value;

use super::plan_file::PlanFile;
use super::run_files::{ReportRow, RunReport, StepMarker, StepRecord, TaskScore};
use super::schedule::{self, parse_args, step_argv, Schedule, StepArgs, StepKind};
use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The schedule (TOML).
    pub schedule: PathBuf,
    /// Output directory (overrides the schedule's `out`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Check the schedule and list its pipelines and steps; run nothing.
    #[arg(long)]
    pub check: bool,
}

/// The seven tasks with the metric the papers report for each (LLM-Pruner's set).
pub const TASK_METRICS: [(&str, &str); 7] = [
    ("boolq", "acc"),
    ("piqa", "acc"),
    ("hellaswag", "acc_norm"),
    ("winogrande", "acc"),
    ("arc_easy", "acc"),
    ("arc_challenge", "acc_norm"),
    ("openbookqa", "acc_norm"),
];

/// Shapes of a model path: the config of an HF directory, else (a GGUF) the loaded dense model's.
fn spec_of(path: &Path, dense: &Model, dense_path: &Path) -> anyhow::Result<ModelSpec> {
    if path == dense_path {
        return Ok(dense.spec.clone());
    }
    Ok(ModelSpec::from_hf_config(&path.join("config.json"))?)
}

/// Runs one step's subcommand in this process.
fn run_step(common: &CommonArgs, kind: StepKind, argv: &[String]) -> anyhow::Result<()> {
    use super::{depth, eval, export, lora, width};
    match schedule::parse_step(kind, argv).map_err(|e| anyhow!("{}", e.to_string().trim()))? {
        StepArgs::Depth(a) => depth::run(common, a),
        StepArgs::Width(a) => width::run(common, a),
        StepArgs::Lora(a) => lora::run(common, a),
        StepArgs::Eval(a) => eval::run(common, a),
        StepArgs::Export(a) => export::run(common, a),
    }
}

/// What one pipeline produced.
#[derive(Debug, Default)]
struct Outcome {
    steps: Vec<StepRecord>,
    final_model: Option<PathBuf>,
    /// The results of the eval steps since the last step that changed the model: they all describe the final model.
    evals: Vec<PathBuf>,
    /// The directories of the pipeline's depth steps (their `slm_plan.json` outlines the heat map).
    depth_plans: Vec<PathBuf>,
    error: Option<String>,
}

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    let sched = schedule::parse(&args.schedule)?;
    let out = args.out.clone().or_else(|| sched.out.clone());
    if let Some(out) = &out {
        common.check_output("the output directory", out, OutputKind::Run, &[&args.schedule, &sched.model])?;
    }
    if args.check {
        for p in &sched.pipelines {
            let budget = p
                .budget
                .map(|b| format!(" (budget {:.0}% of dense, depth share {})", 100.0 * b, p.depth_share))
                .unwrap_or_default();
            println!("{}{budget}:", p.name);
            for (i, step) in p.steps.iter().enumerate() {
                let argv = step_argv(step, &sched.calibration, Path::new("<input>"), Path::new("<out>"), &[])?;
                println!("  {}. slm {}", i + 1, argv.join(" "));
            }
        }
        println!("{}: OK", sched.path.display());
        return Ok(());
    }
    let out = out.ok_or_else(|| anyhow!("{}: give --out or `out = \"DIR\"` in the schedule", sched.path.display()))?;
    slm_model::output::stamp_dir(&out, OutputKind::Run)?;
    let dense = common.load_model(&sched.model, slm_model::Residency::Auto)?;
    let dense_params = dense.spec.num_parameters() as f64;

    // Step key (model + resolved arguments of every step so far) → the directory that computed it.
    let mut done: HashMap<String, PathBuf> = HashMap::new();
    let (mut computed, mut reused) = (0usize, 0usize);
    let mut outcomes: Vec<Outcome> = Vec::new();
    for p in &sched.pipelines {
        let pdir = out.join(&p.name);
        std::fs::create_dir_all(&pdir).with_context(|| format!("{}: cannot create", pdir.display()))?;
        let mut input = sched.model.clone();
        let mut key = format!("model={}", sched.model.display());
        let mut o = Outcome::default();
        for (i, step) in p.steps.iter().enumerate() {
            let dir = pdir.join(format!("{}-{}", i + 1, step.kind.name()));
            let label = format!("pipeline `{}` step {} ({}, line {})", p.name, i + 1, step.kind.name(), step.line);
            let result = (|| -> anyhow::Result<(Vec<String>, bool, f64)> {
                let extra = budget_options(p, step.kind, &input, &dense, &sched.model, dense_params)?;
                let argv = step_argv(step, &sched.calibration, &input, &dir, &extra)?;
                // The key leaves out this step's output path (it differs per pipeline).
                let args_key = step_argv(step, &sched.calibration, Path::new("-"), Path::new("-"), &extra)?.join(" ");
                key = format!("{key} | {args_key}");
                if let Some(first) = done.get(&key) {
                    if dir.symlink_metadata().is_ok() {
                        remove_path(&dir)?;
                    }
                    let target = std::fs::canonicalize(first)?;
                    symlink(&target, &dir)
                        .with_context(|| format!("{}: cannot link to {}", dir.display(), target.display()))?;
                    tracing::info!("{label}: reusing {}", first.display());
                    return Ok((argv, true, 0.0));
                }
                if dir.symlink_metadata().map(|m| m.file_type().is_symlink()).unwrap_or(false) {
                    remove_path(&dir)?;
                }
                // A previous run of this schedule finished this very step (same key): keep its output.
                match StepMarker::read(&dir) {
                    Some(Ok(m)) if m.key == key => {
                        tracing::info!("{label}: already done by a previous run ({})", dir.display());
                        done.insert(key.clone(), dir.clone());
                        return Ok((argv, true, 0.0));
                    }
                    Some(Err(e)) => tracing::warn!("{label}: recomputing: {e}"),
                    _ => {}
                }
                tracing::info!("{label}: slm {}", argv.join(" "));
                let start = Instant::now();
                run_step(common, step.kind, &argv)?;
                let marker = StepMarker::new(key.clone(), argv.clone());
                slm_model::write_file_atomically(&dir.join(StepMarker::NAME), &serde_json::to_vec_pretty(&marker)?)?;
                done.insert(key.clone(), dir.clone());
                Ok((argv, false, start.elapsed().as_secs_f64()))
            })();
            match result {
                Ok((argv, was_reused, seconds)) => {
                    if was_reused {
                        reused += 1
                    } else {
                        computed += 1
                    }
                    o.steps.push(StepRecord {
                        step: step.kind.name().into(),
                        dir: dir.clone(),
                        argv: Some(argv),
                        reused: was_reused,
                        seconds,
                        error: None,
                    });
                    // A new model makes the evals so far describe an earlier one.
                    match step.kind {
                        StepKind::Depth | StepKind::Width => (input, o.evals) = (dir.clone(), Vec::new()),
                        StepKind::Lora => (input, o.evals) = (dir.join("merged"), Vec::new()),
                        StepKind::Eval => o.evals.push(dir.join("results.json")),
                        StepKind::Export => {}
                    }
                    if step.kind == StepKind::Depth {
                        o.depth_plans.push(dir.clone());
                    }
                }
                Err(e) => {
                    let msg = format!("{label}: {e:#}");
                    tracing::error!("{msg}");
                    o.steps.push(StepRecord {
                        step: step.kind.name().into(),
                        dir: dir.clone(),
                        argv: None,
                        reused: false,
                        seconds: 0.0,
                        error: Some(msg.clone()),
                    });
                    o.error = Some(msg);
                    break;
                }
            }
        }
        if o.error.is_none() {
            o.final_model = Some(input);
        }
        outcomes.push(o);
    }

    let rows = report_rows(&sched, &outcomes, &dense, dense_params)?;
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    // (pipeline index, parameters, avg-7) of every evaluated pipeline: the points of params_vs_avg7.png.
    let points: Vec<(usize, f64, f64)> =
        rows.iter().enumerate().filter_map(|(i, r)| Some((i, r.parameters? as f64, r.avg7?))).collect();
    let ranges = (!points.is_empty()).then(|| {
        let (a, b, c, d) = plot_ranges(&points, dense_params);
        [a, b, c, d]
    });
    let report = RunReport {
        slm_output: slm_model::output::OutputStamp::new(OutputKind::RunReport),
        schedule: sched.path.clone(),
        plot_ranges: ranges,
        model: sched.model.clone(),
        dense_parameters: dense_params as u64,
        steps_computed: computed,
        steps_reused: reused,
        pipelines: rows,
    };
    slm_model::write_file_atomically(&out.join(RunReport::NAME), &serde_json::to_vec_pretty(&report)?)?;
    let md = report_markdown(&report);
    slm_model::write_file_atomically(&out.join("report.md"), md.as_bytes())?;
    plots(&sched, &outcomes, &points, &dense, &out)?;
    println!("{md}");
    println!("wrote {}", out.join("report.md").display());
    if failed > 0 {
        bail!("{failed} of {} pipelines failed (see {})", outcomes.len(), out.join("report.md").display());
    }
    Ok(())
}

/// The stop option a pipeline budget gives a depth or width step: depth removes `depth_share` of the parameters
/// the budget removes (whole layers, the count closest to it), width removes what is left to reach the budget.
fn budget_options(
    p: &schedule::Pipeline,
    kind: StepKind,
    input: &Path,
    dense: &Model,
    dense_path: &Path,
    dense_params: f64,
) -> anyhow::Result<Vec<(String, Value)>> {
    let Some(budget) = p.budget else { return Ok(vec![]) };
    if !matches!(kind, StepKind::Depth | StepKind::Width) {
        return Ok(vec![]);
    }
    let spec = spec_of(input, dense, dense_path)?;
    let current = spec.num_parameters() as f64;
    match kind {
        StepKind::Depth => {
            let remove = (1.0 - budget) * p.depth_share * dense_params;
            if remove <= 0.0 {
                bail!("depth_share is 0: this pipeline's budget gives its depth step nothing to remove");
            }
            let n = slm_depth::layers_for_ratio(&spec, remove / current)?;
            Ok(vec![("target_layers".into(), Value::Integer(n as i64))])
        }
        StepKind::Width => {
            let target = 1.0 - budget * dense_params / current;
            if target <= 0.0 {
                bail!("the budget ({:.1}% of dense) is already met before this width step", 100.0 * budget);
            }
            Ok(vec![("target_ratio".into(), Value::Float((target * 1e6).round() / 1e6))])
        }
        _ => Ok(vec![]),
    }
}

fn remove_path(p: &Path) -> anyhow::Result<()> {
    let m = p.symlink_metadata()?;
    if m.is_dir() {
        std::fs::remove_dir_all(p)?
    } else {
        std::fs::remove_file(p)?
    }
    Ok(())
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::fs::write(link.with_extension("reused"), target.display().to_string())
}

/// One report row per pipeline, from the step outputs (eval results, model configs) and a decode measurement.
fn report_rows(
    sched: &Schedule,
    outcomes: &[Outcome],
    dense: &Model,
    dense_params: f64,
) -> anyhow::Result<Vec<ReportRow>> {
    let mut decode_cache: HashMap<PathBuf, f64> = HashMap::new();
    let mut rows = Vec::new();
    for (p, o) in sched.pipelines.iter().zip(outcomes) {
        let mut row = ReportRow {
            pipeline: p.name.clone(),
            budget: p.budget,
            depth_share: p.depth_share,
            steps: o.steps.clone(),
            error: o.error.clone(),
            final_model: None,
            layers: None,
            parameters: None,
            share_of_dense: None,
            decode_tokens_per_s: None,
            tasks: BTreeMap::new(),
            avg7: None,
            wikitext2_128_ppl: None,
            eval_results: Vec::new(),
        };
        if let Some(m) = &o.final_model {
            let spec = spec_of(m, dense, &sched.model)?;
            row.final_model = Some(m.clone());
            row.layers = Some(spec.num_layers());
            row.parameters = Some(spec.num_parameters() as u64);
            row.share_of_dense = Some(spec.num_parameters() as f64 / dense_params);
            if sched.report.decode_tokens > 0 {
                let key = std::fs::canonicalize(m).unwrap_or_else(|_| m.clone());
                let tps = match decode_cache.get(&key) {
                    Some(t) => *t,
                    None => {
                        let model = if m == &sched.model { dense.clone() } else { Model::load(m, &dense.device)? };
                        let r = super::bench::measure(
                            &model,
                            &p.name,
                            sched.report.prompt_tokens,
                            sched.report.decode_tokens,
                            1,
                            1,
                        )?;
                        decode_cache.insert(key, r.decode_tokens_per_s);
                        r.decode_tokens_per_s
                    }
                };
                row.decode_tokens_per_s = Some(tps);
            }
        }
        if o.error.is_none() && !o.evals.is_empty() {
            // Several eval steps of the same model (say the tasks on some documents, perplexity on other windows)
            // make one row: each number comes from the last of them that has it.
            for path in &o.evals {
                let ev = slm_eval::ResultsSummary::read(path).context("reading a pipeline's eval results")?;
                for (t, metric) in TASK_METRICS {
                    if let Some(value) = ev.metric(t, metric) {
                        row.tasks.insert(t.to_string(), TaskScore { metric: metric.into(), value });
                    }
                }
                if let Some(a) = &ev.avg7 {
                    row.avg7 = Some(a.value);
                }
                if let Some(ppl) = ev.metric("wikitext2-128", "perplexity") {
                    row.wikitext2_128_ppl = Some(ppl);
                }
            }
            row.eval_results = o.evals.clone();
        }
        rows.push(row);
    }
    Ok(rows)
}

fn fmt(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map(|x| format!("{:.*}", digits, x * scale)).unwrap_or_else(|| "-".into())
}

/// `report.md`: one table, a row per pipeline.
pub fn report_markdown(report: &RunReport) -> String {
    let mut s = String::from("| pipeline | layers | parameters | % of dense | WikiText-2 PPL (128) |");
    for (t, m) in TASK_METRICS {
        s.push_str(&format!(" {t} ({m}) |"));
    }
    s.push_str(" avg-7 | decode tok/s |\n|---|---|---|---|---|");
    s.push_str(&"---|".repeat(TASK_METRICS.len() + 2));
    s.push('\n');
    for r in &report.pipelines {
        if let Some(e) = &r.error {
            s.push_str(&format!("| {} | failed: {} |\n", r.pipeline, e.replace('|', "/").replace('\n', " ")));
            continue;
        }
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |",
            r.pipeline,
            r.layers.map(|l| l.to_string()).unwrap_or("-".into()),
            r.parameters.map(|p| format!("{:.2}M", p as f64 / 1e6)).unwrap_or("-".into()),
            fmt(r.share_of_dense, 100.0, 1),
            fmt(r.wikitext2_128_ppl, 1.0, 2),
        ));
        for (t, _) in TASK_METRICS {
            s.push_str(&format!(" {} |", fmt(r.tasks.get(t).map(|x| x.value), 100.0, 2)));
        }
        s.push_str(&format!(" {} | {} |\n", fmt(r.avg7, 100.0, 2), fmt(r.decode_tokens_per_s, 1.0, 1)));
    }
    if let Some(v) = report.plot_ranges {
        s.push_str(&format!(
            "\nparams_vs_avg7.png: x = parameters from {:.1}M to {:.1}M, y = avg-7 from {:.2} to {:.2}; each point labelled with its pipeline.",
            v[0] / 1e6, v[1] / 1e6, 100.0 * v[2], 100.0 * v[3]
        ));
    }
    s.push_str(&format!(
        "\nSteps computed: {}, reused (from another pipeline or a previous run): {}. Plot colours (params_vs_avg7.png), in pipeline order: {}.\n",
        report.steps_computed,
        report.steps_reused,
        report.pipelines.iter().enumerate()
            .map(|(i, r)| format!("{} {}", r.pipeline, PALETTE_NAMES[i % PALETTE.len()]))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    s
}

const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];
const PALETTE_NAMES: [&str; 8] = ["blue", "orange", "green", "red", "purple", "brown", "pink", "grey"];

/// Axis ranges of `params_vs_avg7.png`: parameters from the smallest pipeline minus 5% of dense to dense plus 3%
/// (so the dense model's point is drawn whole), avg-7 from 2 points below the lowest to 2 points above the highest.
fn plot_ranges(points: &[(usize, f64, f64)], dense: f64) -> (f64, f64, f64, f64) {
    let min_p = points.iter().map(|p| p.1).fold(dense, f64::min);
    let min_a = points.iter().map(|p| p.2).fold(f64::INFINITY, f64::min);
    let max_a = points.iter().map(|p| p.2).fold(f64::NEG_INFINITY, f64::max);
    ((min_p - 0.05 * dense).max(0.0), 1.03 * dense, min_a - 0.02, max_a + 0.02)
}

/// `params_vs_avg7.png` (a point per evaluated pipeline, labelled with its name; x: parameters in millions,
/// y: avg-7 in %, ranges from [`plot_ranges`], stated in report.md) and, with `[report] similarity`, the dense
/// model's layer CKA heat map, once plain and once per pipeline with a depth step, its merged windows / removed
/// layers outlined.
fn plots(
    sched: &Schedule,
    outcomes: &[Outcome],
    points: &[(usize, f64, f64)],
    dense: &Model,
    out: &Path,
) -> anyhow::Result<()> {
    if !points.is_empty() {
        let (x0, x1, y0, y1) = plot_ranges(points, dense.spec.num_parameters() as f64);
        let marks: Vec<slm_plot::ScatterPoint> = points
            .iter()
            .map(|&(i, params, avg)| slm_plot::ScatterPoint {
                x: params / 1e6,
                y: 100.0 * avg,
                label: sched.pipelines.get(i).map(|p| p.name.clone()).unwrap_or_default(),
                colour: PALETTE[i % PALETTE.len()],
            })
            .collect();
        let spec = slm_plot::Scatter {
            title: "Parameters vs avg-7 accuracy",
            x_desc: "parameters (millions)",
            y_desc: "avg-7 accuracy (%)",
            x_range: (x0 / 1e6, x1 / 1e6),
            y_range: (100.0 * y0, 100.0 * y1),
            points: &marks,
        };
        slm_plot::scatter_png(&out.join("params_vs_avg7.png"), &spec)?;
    }
    if sched.report.similarity {
        let calib: super::CalibArgs = {
            let mut argv = vec!["calibration".to_string()];
            argv.extend(schedule::option_args(&sched.calibration)?);
            parse_args("calibration", &argv).map_err(|e| anyhow!("[calibration]: {}", e.to_string().trim()))?
        };
        let windows = calib.or(super::REFERENCE_WINDOWS)?.windows(dense)?;
        let hidden = slm_depth::similarity::layer_outputs(dense, &windows)?;
        let cka = slm_depth::similarity::cka_matrix(&hidden)?;
        let labels = slm_plot::layer_labels(cka.len());
        let sim = |path: PathBuf, title: &str, groups: &[(usize, usize)]| {
            let spec = super::similarity::heatmap(title, &cka, (0.0, 1.0), &labels, "linear CKA", groups);
            slm_plot::heatmap_png(&path, &spec)
        };
        sim(out.join("similarity_dense.png"), "Layer similarity (linear CKA), dense model", &[])?;
        for (p, o) in sched.pipelines.iter().zip(outcomes) {
            let (mut groups, mut merged, mut removed) = (Vec::new(), false, false);
            for step_dir in &o.depth_plans {
                let Some(PlanFile::Depth(file)) = super::plan_file::read_plan(step_dir)? else { continue };
                if file.plan.num_layers != dense.spec.num_layers() {
                    continue; // a depth step after another one: indices are not the dense model's
                }
                // Matrix index i + 1 is layer i's output (index 0: the embeddings).
                for &[a, b] in &file.plan.merges {
                    groups.push((a + 1, b + 1));
                    merged = true;
                }
                for &r in &file.plan.removed {
                    groups.push((r + 1, r + 1));
                    removed = true;
                }
            }
            if !groups.is_empty() {
                let what = match (merged, removed) {
                    (true, true) => "merged windows / removed layers",
                    (false, true) => "removed layers",
                    _ => "merged windows",
                };
                let title = format!("Layer similarity (linear CKA), {what} outlined (pipeline {})", p.name);
                sim(out.join(format!("similarity_{}.png", p.name)), &title, &groups)?;
            }
        }
    }
    Ok(())
}
