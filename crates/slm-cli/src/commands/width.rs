//! `slm width MODEL --out DIR (--pruning-ratio R | --target-ratio P) [--importance ...] [--layers A..B]`:
//! LLM-Pruner-style removal of attention units (a KV head with its query heads) and MLP channels, ranked by
//! Taylor importance on calibration windows; writes an HF directory (per-layer widths) plus `slm_plan.json`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use slm_model::output::{OutputKind, OutputStamp};
use slm_model::StorageDType;
use slm_width::file::{GradientPassRecord, WidthPlanFile};
use slm_width::{
    apply, default_layer_range, gradient_scores, parse_layer_range, plan_width, plan_width_scored,
    ratio_for_target_rounded, Aggregation, Importance, Ratios, WidthSettings,
};

use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF directory (a depth-pruned one too) or a .gguf file.
    pub model: PathBuf,
    /// Output HF directory (written atomically), with slm_plan.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Share of the units (KV-head groups, MLP channels) removed in every pruned layer, in [0, 1).
    #[arg(long, conflicts_with = "target_ratio", value_parser = super::finite_f64)]
    pub pruning_ratio: Option<f64>,
    /// Instead: remove this share of all parameters, in (0, 1); the pruning ratio is searched.
    #[arg(long, value_parser = super::finite_f64)]
    pub target_ratio: Option<f64>,
    /// element1 (first-order Taylor), element2 (+ Fisher second order), vector, l2 (magnitude) or random.
    #[arg(long, default_value = "element1")]
    pub importance: Importance,
    /// How a unit's member matrices combine, channel by channel: sum, mean or max.
    #[arg(long, default_value = "sum")]
    pub aggregation: Aggregation,
    /// Layers to prune, A..B (end exclusive) or A..=B. Default: LLM-Pruner's 4..30 of 32 scaled to the depth
    /// (the first round(4L/32) and last round(2L/32) layers stay dense; 4..28 for 30 layers).
    #[arg(long)]
    pub layers: Option<String>,
    /// Keep each pruned layer's MLP width a multiple of N (the multiple nearest the ratio's width), so that the
    /// pruned matrices stay whole blocks of quantised types (32 for q8_0/q4_0, 256 for the k-quants) and fast on
    /// real kernels. Heads need no rounding: a unit is a whole KV head with its query heads.
    #[arg(long, value_name = "N")]
    pub round_to: Option<usize>,
    #[command(flatten)]
    pub calib: super::CalibArgs,
    /// Storage dtype of the output: f32, f16 or bf16 [default: the input's: its stored dtype for an HF
    /// directory, f32 for a GGUF (dequantised)].
    #[arg(long)]
    pub dtype: Option<StorageDType>,
}

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    let (importance, aggregation, dtype) = (args.importance, args.aggregation, args.dtype);
    if let Some(r) = args.pruning_ratio {
        slm_width::groups::check_ratio(r).context("--pruning-ratio")?;
    }
    let calib = args.calib.or(super::REFERENCE_WINDOWS)?;
    common.check_output(
        "--out",
        &args.out,
        super::export::model_output_kind(&args.out),
        &[&args.model, &calib.file],
    )?;
    let model = common.load_model(&args.model, slm_model::Residency::Mapped)?;
    let n = model.spec.num_layers();
    let range = match &args.layers {
        Some(s) => parse_layer_range(s, n).context("--layers")?,
        None => default_layer_range(n),
    };
    let ratio = match (args.pruning_ratio, args.target_ratio) {
        (Some(r), None) => Ratios::uniform(r).rounded_to(args.round_to),
        (None, Some(t)) => {
            ratio_for_target_rounded(&model.spec, &range, t, args.round_to).context("--target-ratio / --round-to")?
        }
        _ => bail!("give one of --pruning-ratio or --target-ratio"),
    };
    // Fails early (before the gradient pass) when the ratio would empty a layer.
    slm_width::parameters_after(&model.spec, ratio, &range).context("--pruning-ratio / --round-to")?;
    let layers: Vec<usize> = range.clone().collect();

    let start = Instant::now();
    let rss_before = super::memory_mib();
    let settings = WidthSettings { ratio, importance, aggregation, layers: range.clone(), seed: calib.seed };
    let (scored, windows) = if importance.needs_gradient() {
        let windows = calib.windows(&model)?;
        // Layers the backward pass goes through: from the top down to the lowest pruned one.
        let steps = model.spec.num_layers() - range.start;
        let bar = ProgressBar::new(layers.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} layers scored [{elapsed} < {eta}]")
                .expect("valid template"),
        );
        let chains = if importance.needs_fisher() { ", one backward chain per window" } else { "" };
        bar.set_message(format!(
            "gradients on {} windows of {} tokens ({steps} layers back{chains})",
            windows.len(),
            calib.seq_len
        ));
        let g = gradient_scores(&model, &windows, importance, aggregation, &layers, &mut || bar.inc(1))?;
        bar.finish_and_clear();
        (Some(g), windows.len())
    } else {
        (None, 0)
    };
    let grad_seconds = start.elapsed().as_secs_f64();
    let rss_after = super::memory_mib();
    let plan = match &scored {
        Some(s) => plan_width_scored(&model, &settings, s)?,
        None => plan_width(&model, &settings, None)?,
    };
    let pruned = apply(&model, &plan)?;

    let (before, after) = (model.spec.num_parameters(), pruned.spec.num_parameters());
    let layer_before: usize = range.clone().map(|i| model.spec.layer_parameters(&model.spec.layers[i])).sum();
    let layer_after: usize = range.clone().map(|i| pruned.spec.layer_parameters(&pruned.spec.layers[i])).sum();
    let share = 1.0 - after as f64 / before as f64;
    // A depth-pruned input keeps its own plan (read through its type), so a joint schedule's output records both.
    let previous = super::plan_file::read_plan(&args.model)?.map(|p| p.to_value());
    let plan_file = WidthPlanFile {
        slm_output: OutputStamp::new(OutputKind::WidthPlan),
        method: "llm-pruner".into(),
        importance,
        aggregation,
        pruning_ratio: ratio,
        target_ratio: args.target_ratio,
        layer_range: [range.start, range.end],
        plan,
        layers: pruned.spec.layers.clone(),
        parameters_before: before,
        parameters_after: after,
        parameter_reduction: share,
        parameter_reduction_in_pruned_layers: 1.0 - layer_after as f64 / layer_before as f64,
        calibration: scored.is_some().then(|| calib.record()),
        gradient_pass: scored.as_ref().map(|g| GradientPassRecord {
            loss: g.loss,
            backward_passes: g.backward_passes,
            seconds: grad_seconds,
            rss_mib_before: rss_before.map(|m| m.0),
            rss_mib_after: rss_after.map(|m| m.0),
            peak_rss_mib: rss_after.map(|m| m.1),
        }),
        source_model: args.model.display().to_string(),
        previous_plan: previous,
    };
    super::export::save_model_output(
        common,
        &pruned,
        &args.out,
        dtype.unwrap_or(model.storage_dtype()),
        plan_file.to_bytes(),
    )?;

    println!("importance:  {} (aggregation {})", importance.as_str(), aggregation.as_str());
    let ratio_text = if ratio.attention == ratio.mlp {
        format!("ratio {:.4}", ratio.attention)
    } else {
        format!("ratio {:.4} (attention) / {:.4} (MLP)", ratio.attention, ratio.mlp)
    };
    println!(
        "layers:      {}..{} pruned at {ratio_text}{}",
        range.start,
        range.end,
        if args.target_ratio.is_some() { " (searched for --target-ratio)" } else { "" }
    );
    let (l0, p0) = (&model.spec.layers[range.start], &pruned.spec.layers[range.start]);
    println!(
        "per layer:   heads {}/{} -> {}/{} (query/KV), MLP {} -> {}",
        l0.num_attention_heads,
        l0.num_key_value_heads,
        p0.num_attention_heads,
        p0.num_key_value_heads,
        l0.intermediate_size,
        p0.intermediate_size
    );
    println!(
        "parameters:  {before} -> {after} ({:.2}% of all removed; {:.2}% of the pruned layers')",
        100.0 * share,
        100.0 * (1.0 - layer_after as f64 / layer_before as f64)
    );
    if let Some(g) = &scored {
        let peak = rss_after
            .map(|m| format!(", peak RSS {:.0} MiB (RSS {:.0} MiB before)", m.1, rss_before.map_or(0.0, |b| b.0)))
            .unwrap_or_default();
        println!(
            "gradients:   {} backward passes on {windows} windows in {grad_seconds:.1} s, loss {:.4}{peak}",
            g.backward_passes, g.loss
        );
    }
    println!("wrote {}", args.out.display());
    Ok(())
}
