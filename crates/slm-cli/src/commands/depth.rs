//! `slm depth MODEL --out DIR (--threshold T | --target-ratio R | --target-layers N) [--method ...] [--merge ...]`:
//! depth pruning by sliding layer merging or a baseline; writes an HF directory plus `slm_plan.json`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use slm_depth::file::{DepthPlanFile, SearchRecord};
use slm_depth::{apply, plan_depth, Calibration, Criterion, MergeOp, Method, Settings, Stop};
use slm_model::output::{OutputKind, OutputStamp};
use slm_model::StorageDType;

use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF directory or a .gguf file.
    pub model: PathBuf,
    /// Output HF directory (written atomically), with slm_plan.json.
    #[arg(long)]
    pub out: PathBuf,
    /// slm-dp (merge windows chosen jointly by dynamic programming on local window costs; the default because it
    /// measured best here: README, depth table), slm (sliding layer merging, the reference loop: with
    /// `--merge reference` it is the reference code), shortgpt, laco, sleb or ppl (Shortened-LLaMA).
    #[arg(long, default_value = "slm-dp")]
    pub method: Method,
    /// Merge operator for slm/slm-dp/laco: paper, reference, average, delete or top [default: reference; top for
    /// slm-dp].
    #[arg(long)]
    pub merge: Option<MergeOp>,
    /// Similarity criterion for slm/laco: cosine (the reference), token-cosine or kl [default: cosine]. For slm-dp
    /// it picks among the plans the DP proposes [default: kl].
    #[arg(long)]
    pub criterion: Option<Criterion>,
    /// Merge while the similarity to the dense model stays above T, in (0, 1] (slm/laco).
    #[arg(long, conflicts_with_all = ["target_ratio", "target_layers"], value_parser = super::finite_f64)]
    pub threshold: Option<f64>,
    /// Remove this share of the parameters, in (0, 1) (rounded to whole layers).
    #[arg(long, conflicts_with = "target_layers", value_parser = super::finite_f64)]
    pub target_ratio: Option<f64>,
    /// Remove this many layers.
    #[arg(long)]
    pub target_layers: Option<usize>,
    #[command(flatten)]
    pub calib: super::CalibArgs,
    /// LaCo: layers per merge (base + followers) and the step after a merge.
    #[arg(long, default_value_t = 4)]
    pub laco_layers: usize,
    #[arg(long, default_value_t = 2)]
    pub laco_interval: usize,
    /// Recompute every candidate from the embeddings instead of from the lowest changed layer (for comparison).
    #[arg(long)]
    pub no_incremental: bool,
    /// Re-fit the down_proj of every layer that stands in for several dense layers by ridge least squares on the
    /// calibration activations (λ = RIDGE · mean diagonal of AᵀA). Off unless given; 0.1 is a good start.
    #[arg(long, value_name = "RIDGE", value_parser = super::finite_f64)]
    pub refit: Option<f64>,
    /// Storage dtype of the output: f32, f16 or bf16 [default: the input's: its stored dtype for an HF
    /// directory, f32 for a GGUF (dequantised)].
    #[arg(long)]
    pub dtype: Option<StorageDType>,
    #[command(flatten)]
    pub compute: super::ComputeArgs,
}

/// slm-dp's calibration unless given: 40 windows of 32 tokens (the reference's 1280 tokens in short windows).
pub const SLM_DP_WINDOWS: (usize, usize) = (40, 32);

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    let method = args.method;
    let op = args.merge.unwrap_or(method.default_merge());
    let criterion = args.criterion.unwrap_or(method.default_criterion());
    let dtype = args.dtype;
    if let Some(r) = args.refit {
        if !(r > 0.0) {
            bail!("--refit: the ridge must be positive, got {r}");
        }
    }
    if let Some(t) = args.threshold {
        slm_depth::search::check_threshold(t).context("--threshold")?;
        if !method.takes_threshold() {
            bail!(
                "--threshold: `{}` removes a number of layers; give --target-layers or --target-ratio",
                method.name()
            );
        }
    }
    // slm-dp compares whole plans by their next-token distributions; short windows weigh them the way the
    // zero-shot tasks do (most of their contexts are under 40 tokens), at the reference's token count.
    let calib = args.calib.or(if method == Method::SlmDp { SLM_DP_WINDOWS } else { super::REFERENCE_WINDOWS })?;
    common.check_output(
        "--out",
        &args.out,
        super::export::model_output_kind(&args.out),
        &[&args.model, &calib.file],
    )?;
    let model = common.load_model(&args.model, slm_model::Residency::Mapped)?;
    let stop = match (args.threshold, args.target_ratio, args.target_layers) {
        (Some(t), None, None) => Stop::Threshold(t),
        (None, Some(r), None) => {
            Stop::TargetLayers(slm_depth::layers_for_ratio(&model.spec, r).context("--target-ratio")?)
        }
        (None, None, Some(n)) => Stop::TargetLayers(n),
        _ => bail!("give one of --threshold, --target-ratio or --target-layers"),
    };
    if let Stop::TargetLayers(n) = stop {
        slm_depth::method::check_target(model.spec.num_layers(), n).context("--target-layers")?;
    }
    let windows = calib.windows(&model)?;

    let start = Instant::now();
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("valid template"));
    spinner.set_message(format!("{} search on {} calibration windows", method.name(), windows.len()));
    spinner.enable_steady_tick(Duration::from_millis(200));
    // The search computes in --compute-dtype; the output is built from the model as loaded.
    let scorer = args.compute.compute_dtype.apply(&model)?;
    let mut cal = Calibration::new(&scorer, windows, op)?;
    cal.incremental = !args.no_incremental;
    let settings = Settings {
        criterion,
        laco_layers: args.laco_layers,
        laco_interval: args.laco_interval,
        ..Settings::new(method, stop)
    };
    let outcome = plan_depth(&mut cal, &settings)?;
    spinner.finish_and_clear();
    let search_seconds = start.elapsed().as_secs_f64();

    let mut pruned = match args.refit {
        Some(ridge) => slm_depth::refit::apply_with_refit(&cal, &outcome.plan, ridge).context("--refit")?,
        None => apply(&model, &outcome.plan)?,
    };
    // The final norm names the compute dtype: the saved model keeps the loaded one (f32, not a bf16 rounding).
    pruned.weights.norm = model.weights.norm.clone();
    let (before, after) = (model.spec.num_parameters(), pruned.spec.num_parameters());
    let ratio = 1.0 - after as f64 / before as f64;
    let plan_file = DepthPlanFile {
        slm_output: OutputStamp::new(OutputKind::DepthPlan),
        method,
        operator: method.merges().then_some(op),
        criterion: method.merges().then_some(criterion),
        threshold: outcome.threshold,
        stop: stop.into(),
        kept_layers: outcome.plan.output_layers(),
        plan: outcome.plan.clone(),
        refit_ridge: args.refit,
        layers_before: model.spec.num_layers(),
        layers_after: pruned.spec.num_layers(),
        parameters_before: before,
        parameters_after: after,
        parameter_reduction: ratio,
        calibration: calib.record(),
        search: SearchRecord {
            steps: outcome.steps.clone(),
            layer_scores: outcome.layer_scores.clone(),
            dp_candidates: outcome.dp_candidates.clone(),
            evaluations: cal.evaluations,
            reference_loop_evaluations: outcome.reference_evaluations,
            layer_forwards: cal.layer_forwards,
            layer_forwards_full_recompute: cal.full_layer_forwards,
            incremental: cal.incremental,
            seconds: search_seconds,
        },
        source_model: args.model.display().to_string(),
    };
    let plan_bytes = plan_file.to_bytes();
    super::export::save_model_output(common, &pruned, &args.out, dtype.unwrap_or(model.storage_dtype()), plan_bytes)?;

    println!(
        "method:      {}{}",
        method.name(),
        if method.merges() { format!(" (operator {op}, criterion {})", criterion.name()) } else { String::new() }
    );
    if let Some(t) = outcome.threshold {
        let how = if matches!(stop, Stop::Threshold(_)) { "given" } else { "found by search" };
        println!("threshold:   {t:.6} ({how})");
    }
    println!("merges:      {:?}", outcome.plan.merges);
    println!("removed:     {:?}", outcome.plan.removed);
    println!(
        "layers:      {} -> {} ({} removed)",
        model.spec.num_layers(),
        pruned.spec.num_layers(),
        outcome.plan.layers_removed()
    );
    println!("parameters:  {before} -> {after} ({:.2}% removed)", 100.0 * ratio);
    println!(
        "search:      {:.1} s, {} candidate evaluations, {} layer-forwards ({} if every candidate ran from the embeddings)",
        search_seconds, cal.evaluations, cal.layer_forwards, cal.full_layer_forwards
    );
    println!("wrote {}", args.out.display());
    Ok(())
}
