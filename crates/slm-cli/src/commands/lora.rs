//! `slm lora MODEL --out DIR [--data FILE] [--rank 8 --alpha 16 --epochs 2 --lr 1e-4 ...] [--distill] [--merge]`:
//! LoRA recovery training; writes PEFT adapter files (and, with `--merge`, the merged model as an HF directory).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use slm_lora::data::{load_examples, Format};
use slm_lora::file::{LoraRunFile, MergedPlanFile, Objective, Trained, ValLoss};
use slm_lora::train::ObjectiveWeights;
use slm_lora::train::{evaluate, split_validation};
use slm_lora::{Checkpoints, Distill, FullTune, Lora, LoraConfig, TrainConfig, Trainable};
use slm_model::output::{OutputKind, OutputStamp};
use slm_model::{Model, StorageDType};

use super::plan_file::PlanFile;
use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF directory or a .gguf file (e.g. a pruned model).
    pub model: PathBuf,
    /// Output directory: adapter_config.json, adapter_model.safetensors (PEFT), slm_lora.json (the run).
    #[arg(long)]
    pub out: PathBuf,
    /// Training data: Alpaca JSON/JSONL (instruction, input, output) or JSONL with a `text` field [default:
    /// lambada_openai.test.jsonl in the data directory].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The data directory for the default --data (default: $SLM_DATA_DIR, else share/slm/data beside the
    /// installed binary, else the source checkout's data/).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Data format: auto, alpaca (loss on the response only) or text (fixed windows of --cutoff tokens).
    #[arg(long, default_value = "auto")]
    pub format: Format,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (scaling α/r).
    #[arg(long, default_value_t = 16.0, value_parser = super::finite_f64)]
    pub alpha: f64,
    /// Dropout on the LoRA branch's input.
    #[arg(long, default_value_t = 0.05, value_parser = super::finite_f64)]
    pub dropout: f64,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4, value_parser = super::finite_f64)]
    pub lr: f64,
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// Tokens per sequence (Alpaca: truncation; text: window length).
    #[arg(long, default_value_t = 256)]
    pub cutoff: usize,
    /// Sequences per optimiser step (global batch).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Sequences per forward/backward pass; gradients are accumulated up to --batch-size.
    #[arg(long, default_value_t = 4)]
    pub micro_batch_size: usize,
    /// Linear warm-up steps, then linear decay to 0.
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 0.0, value_parser = super::finite_f64)]
    pub weight_decay: f64,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0, value_parser = super::finite_f64)]
    pub max_grad_norm: f64,
    /// Held-out validation sequences (default: 2000, at most a tenth of the data).
    #[arg(long)]
    pub val_size: Option<usize>,
    /// Validate every this many steps (and after the last); the best adapters by validation loss are kept.
    #[arg(long, default_value_t = 100)]
    pub eval_steps: usize,
    /// Stop after N optimiser steps (the schedule decays over the capped run).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Seed of initialisation, split, shuffling and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Train towards the teacher's token distributions (KL at --temperature) instead of the next token.
    #[arg(long)]
    pub distill: bool,
    /// The objective: `lm` (next-token cross-entropy), `kl` (the same as --distill), `hidden` (match each layer's
    /// output to the output of the teacher layer it stands for: for a depth-pruned model, the last layer of its
    /// window, from slm_plan.json), or a weighted mix such as `lm=1,kl=1,hidden=0.5`. Every term but `lm` needs
    /// the teacher.
    #[arg(long, value_parser = parse_objective)]
    pub objective: Option<ObjectiveWeights>,
    /// Teacher for --distill (default: the `source_model` recorded in MODEL/slm_plan.json).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Distillation temperature.
    #[arg(long, default_value_t = 1.0, value_parser = super::finite_f64)]
    pub temperature: f64,
    /// What trains: `lora` (adapters on the seven projections of every layer) or `layers` (full fine-tuning of
    /// every tensor of the --layers, their norms included; the output is the model itself, OUT/merged).
    #[arg(long, value_enum, default_value = "lora")]
    pub train: TrainWhat,
    /// The layers `--train layers` tunes: `cuts` (the layers next to each merged window or removed block of a
    /// depth-pruned model, from its slm_plan.json), `last:K`, or indices and ranges such as `0,5-7`
    /// [default: cuts for a depth-pruned model, else last:3].
    #[arg(long)]
    pub layers: Option<String>,
    /// Also train the final norm and the LM head (a tied head: the shared embedding matrix).
    #[arg(long)]
    pub train_head: bool,
    /// Write a checkpoint (OUT/checkpoint) every N optimiser steps (0: none); removed when the run completes.
    #[arg(long, default_value_t = 100)]
    pub save_steps: usize,
    /// Continue from the checkpoint in OUT/checkpoint (the same settings and data; bit for bit the run that was
    /// interrupted). Without a checkpoint there, the run starts from step 0.
    #[arg(long)]
    pub resume: bool,
    /// Also write the merged model (W ← W₀ + (α/r)·B·A, in f32) as an HF directory OUT/merged.
    #[arg(long)]
    pub merge: bool,
    /// Storage dtype of the output: f32, f16 or bf16 [default: the input's: its stored dtype for an HF
    /// directory, f32 for a GGUF (dequantised)].
    #[arg(long)]
    pub dtype: Option<StorageDType>,
}

/// `--objective`: a name or `term=weight,...`.
fn parse_objective(s: &str) -> Result<ObjectiveWeights, String> {
    let mut w = ObjectiveWeights { lm: 0.0, kl: 0.0, hidden: 0.0 };
    match s {
        "lm" => w.lm = 1.0,
        "kl" => w.kl = 1.0,
        "hidden" => w.hidden = 1.0,
        _ => {
            for item in s.split(',') {
                let (k, v) = item
                    .split_once('=')
                    .ok_or_else(|| format!("`{item}`: give lm, kl, hidden, or weights such as lm=1,kl=1,hidden=0.5"))?;
                let v: f64 = v.trim().parse().map_err(|_| format!("`{item}`: the weight is not a number"))?;
                if !(v.is_finite() && v >= 0.0) {
                    return Err(format!("`{item}`: weights must be finite and non-negative"));
                }
                match k.trim() {
                    "lm" => w.lm = v,
                    "kl" => w.kl = v,
                    "hidden" => w.hidden = v,
                    other => return Err(format!("unknown term `{other}`: the terms are lm, kl and hidden")),
                }
            }
            if w.lm + w.kl + w.hidden <= 0.0 {
                return Err("the weights are all zero".into());
            }
        }
    }
    Ok(w)
}

/// The student-to-teacher layer map for hidden-state matching: the windows of the depth plan in the model's chain
/// of plans (its own, or the depth step before a width step), else the identity for a model with the teacher's
/// layer count.
fn hidden_map(
    args: &Args,
    chain: &[PlanFile],
    n_student: usize,
    n_teacher: usize,
) -> anyhow::Result<Vec<Option<usize>>> {
    if let Some(p) = super::plan_file::depth_plan(chain, &args.model)? {
        let kept = &p.kept_layers;
        if kept.len() != n_student {
            bail!("{}: its depth plan keeps {} layers, the model has {n_student}", args.model.display(), kept.len());
        }
        return Ok(slm_lora::train::hidden_map_from_kept(kept));
    }
    if n_student == n_teacher {
        return Ok((0..n_student).map(Some).collect());
    }
    bail!(
        "--objective with hidden: {} has {n_student} layers, the teacher {n_teacher}, and no depth plan (slm_plan.json) \
         saying which teacher layer each one stands for",
        args.model.display()
    )
}

/// What `--train` picks.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainWhat {
    Lora,
    Layers,
}

/// The layers `--train layers` tunes, from `--layers` and the model's plan.
fn chosen_layers(args: &Args, chain: &[PlanFile], n: usize) -> anyhow::Result<Vec<usize>> {
    let kept = super::plan_file::depth_plan(chain, &args.model)?.map(|p| p.kept_layers.as_slice());
    match (args.layers.as_deref(), kept) {
        (Some("cuts"), None) => bail!(
            "--layers cuts: {} has no depth plan (slm_plan.json of `slm depth`) saying where the cuts are",
            args.model.display()
        ),
        (Some("cuts") | None, Some(k)) => {
            let l = slm_lora::trainable::layers_next_to_cuts(k);
            if l.is_empty() {
                bail!("--layers cuts: the depth plan of {} cuts nothing; name the layers", args.model.display());
            }
            Ok(l)
        }
        (None, None) => Ok(slm_lora::trainable::parse_layers("last:3", n)?),
        (Some(spec), _) => Ok(slm_lora::trainable::parse_layers(spec, n)?),
    }
}

/// The teacher must cut text into the same tokens as the model: the same vocabulary size is not enough.
fn check_same_tokenizer(model: &Model, teacher: &Model) -> anyhow::Result<()> {
    let probe = "Recovery training compares the teacher's tokens with the student's: 0123 héllo, wörld!";
    let a = model.tokenizer()?.encode(probe)?;
    let b = teacher.tokenizer()?.encode(probe)?;
    if a != b {
        bail!(
            "--teacher: its tokenizer differs from the model's (a probe sentence gives {} tokens against {}); \
             distillation needs the same tokens",
            b.len(),
            a.len()
        );
    }
    Ok(())
}

/// The teacher for `--distill`: `--teacher`, or the dense model at the start of the pruned model's chain of
/// plans (for depth then width, the model the depth step pruned).
fn teacher_path(args: &Args, chain: &[PlanFile]) -> anyhow::Result<PathBuf> {
    if let Some(t) = &args.teacher {
        return Ok(t.clone());
    }
    let source = super::plan_file::dense_source(chain).map(PathBuf::from);
    source.with_context(|| {
        format!("distillation needs --teacher: {} has no slm_plan.json naming a source model", args.model.display())
    })
}

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    let lora_cfg = LoraConfig { rank: args.rank, alpha: args.alpha, dropout: args.dropout };
    lora_cfg.validate().context("LoRA settings")?;
    let cfg = TrainConfig {
        lr: args.lr,
        epochs: args.epochs,
        batch_size: args.batch_size,
        micro_batch_size: args.micro_batch_size,
        warmup_steps: args.warmup_steps,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        eval_steps: args.eval_steps,
        max_steps: args.max_steps,
        seed: args.seed,
        ..TrainConfig::default()
    };
    cfg.validate().context("training settings")?;
    let (format, dtype) = (args.format, args.dtype);
    if !(args.temperature > 0.0) {
        bail!("--temperature must be positive, got {}", args.temperature);
    }
    let data = match &args.data {
        Some(d) => d.clone(),
        None => slm_model::data::default_calibration_corpus(args.data_dir.as_deref())?,
    };
    let mut inputs: Vec<&Path> = vec![&args.model, &data];
    inputs.extend(args.teacher.as_deref());
    common.check_output("--out", &args.out, OutputKind::Lora, &inputs)?;
    let device = common.device()?;
    let model = common.load_model(&args.model, slm_model::Residency::Auto)?;
    // The model's chain of plans (read once): the teacher, the layer map and `--layers cuts` come from it.
    let chain = super::plan_file::plan_chain(&args.model)?;
    if !data.is_file() {
        bail!("{}: training data file does not exist", data.display());
    }
    let weights = match (args.objective, args.distill) {
        (Some(_), true) => bail!("--distill is --objective kl; give one of the two"),
        (Some(w), false) => w,
        (None, true) => ObjectiveWeights { lm: 0.0, kl: 1.0, hidden: 0.0 },
        (None, false) => ObjectiveWeights { lm: 1.0, kl: 0.0, hidden: 0.0 },
    };
    let needs_teacher = weights.kl > 0.0 || weights.hidden > 0.0;
    let teacher = if needs_teacher {
        let p = teacher_path(&args, &chain)?;
        Some(Model::load(&p, &device).with_context(|| format!("loading the teacher {}", p.display()))?)
    } else {
        None
    };
    let distill = match &teacher {
        Some(t) => {
            let map = if weights.hidden > 0.0 {
                hidden_map(&args, &chain, model.spec.num_layers(), t.spec.num_layers())?
            } else {
                vec![]
            };
            let d = Distill { teacher: t, temperature: args.temperature, weights, hidden_map: map };
            d.check(&model).context("--teacher")?;
            check_same_tokenizer(&model, t)?;
            Some(d)
        }
        None => None,
    };

    let tok = model.tokenizer()?;
    let examples = load_examples(&data, format, tok, model.spec.eos_token_id, args.cutoff)
        .with_context(|| format!("reading training data {}", data.display()))?;
    let val_size = args.val_size.unwrap_or_else(|| 2000.min(examples.len() / 10));
    let (train, val) = split_validation(examples, val_size, args.seed).context("--val-size")?;
    if args.train == TrainWhat::Lora && (args.layers.is_some() || args.train_head) {
        bail!("--layers and --train-head choose what `--train layers` tunes; with --train lora they do nothing");
    }
    if args.train == TrainWhat::Layers && args.dtype.is_none() && model.storage_dtype() != StorageDType::F32 {
        tracing::info!("the tuned model is written in the input's storage dtype; --dtype f32 keeps the f32 updates");
    }
    let trained = match args.train {
        TrainWhat::Lora => Trained { kind: "lora".into(), layers: vec![], head: false },
        TrainWhat::Layers => Trained {
            kind: "layers".into(),
            layers: chosen_layers(&args, &chain, model.spec.num_layers())?,
            head: args.train_head,
        },
    };
    let lora = match args.train {
        TrainWhat::Lora => Some(Lora::new(&model.spec, lora_cfg.clone(), args.seed, &device)?),
        TrainWhat::Layers => None,
    };
    let full = match args.train {
        TrainWhat::Layers => Some(FullTune::new(&model, &trained.layers, args.train_head)?),
        TrainWhat::Lora => None,
    };
    let trainable: &dyn Trainable = match (&lora, &full) {
        (Some(l), _) => l,
        (None, Some(f)) => f,
        (None, None) => unreachable!("one of the two is built above"),
    };
    let total = cfg.total_steps(train.len());
    let train_tokens: usize = train.iter().map(|e| e.ids.len()).sum();
    tracing::info!(
        train = train.len(),
        val = val.len(),
        train_tokens,
        steps = total,
        trainable = trainable.num_parameters(),
        what = trainable.kind(),
        layers = ?trained.layers,
        objective = ?weights,
        "LoRA training"
    );
    let val_before = if val.is_empty() {
        None
    } else {
        let v = evaluate(&model, trainable, &val, distill.as_ref(), cfg.micro_batch_size * 2)?;
        tracing::info!(val_loss = v.0, val_lm_loss = v.1, "validation before training");
        Some(v)
    };

    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
            .expect("valid template"),
    );
    let mut on_step = |s: &slm_lora::StepInfo| {
        let val = s.val_loss.map(|v| format!("  val {v:.4}")).unwrap_or_default();
        bar.set_message(format!(
            "loss {:.4}{val}  lr {:.2e}  {:.0} tok/s",
            s.loss,
            s.lr,
            s.tokens as f64 / s.seconds.max(1e-9)
        ));
        bar.set_position(s.step as u64);
        if s.val_loss.is_some() {
            bar.suspend(|| tracing::info!(step = s.step, loss = s.loss, val_loss = s.val_loss, "step"));
        }
    };
    let base_name = args.model.display().to_string();
    let checkpoints = (args.save_steps > 0 || args.resume).then(|| Checkpoints {
        dir: args.out.join("checkpoint"),
        every: args.save_steps.max(1),
        resume: args.resume,
        run: serde_json::json!({
            "model": base_name,
            "data": data.display().to_string(),
            "format": format,
            "cutoff": args.cutoff,
            "val_size": val_size,
            "lora": if args.train == TrainWhat::Lora { serde_json::to_value(&lora_cfg).unwrap_or_default() } else { serde_json::Value::Null },
            "trained": trained,
            "train": cfg,
            "objective": weights,
            "teacher": teacher.as_ref().and_then(|t| t.source.as_ref()).map(|p| p.display().to_string()),
            "temperature": args.temperature,
        }),
    });
    if let Some(c) = checkpoints.as_ref().filter(|c| !c.resume) {
        // A fresh run: a checkpoint left in OUT by an earlier run is not continued.
        if c.dir.exists() {
            std::fs::remove_dir_all(&c.dir)
                .with_context(|| format!("removing the old checkpoint {}", c.dir.display()))?;
        }
    }
    if checkpoints.is_some() {
        // The directory is stamped before the first checkpoint so that a rerun (with --resume) may write into it.
        slm_model::output::stamp_dir(&args.out, OutputKind::Lora)?;
    }
    let report =
        slm_lora::train(&model, trainable, &train, &val, &cfg, distill.as_ref(), checkpoints.as_ref(), &mut on_step)?;
    bar.finish_and_clear();

    slm_model::output::stamp_dir(&args.out, OutputKind::Lora)?;
    if let Some(lora) = &lora {
        lora.save(&args.out, &base_name).with_context(|| format!("writing the adapter to {}", args.out.display()))?;
    }
    let run = LoraRunFile {
        slm_output: OutputStamp::new(OutputKind::LoraRun),
        source_model: base_name,
        data: data.display().to_string(),
        format,
        cutoff: args.cutoff,
        lora: lora_cfg,
        trained: Some(trained),
        train: cfg,
        objective: Objective::of(&weights),
        objective_weights: Some(weights),
        teacher: teacher.as_ref().and_then(|t| t.source.as_ref()).map(|p| p.display().to_string()),
        temperature: (weights.kl > 0.0).then_some(args.temperature),
        trainable_parameters: trainable.num_parameters(),
        val_before: val_before.map(|(loss, lm_loss)| ValLoss { loss, lm_loss }),
        report,
    };
    slm_model::write_file_atomically(&args.out.join(LoraRunFile::NAME), &run.to_bytes())?;
    if args.merge || args.train == TrainWhat::Layers {
        let merged = trainable.merge(&model)?;
        let dir = args.out.join("merged");
        let plan = merged_plan(&args.model, &chain, &run)?;
        merged.save_replacing(
            &dir,
            dtype.unwrap_or(model.storage_dtype()),
            &[("slm_plan.json", plan)],
            common.replace(),
        )?;
        println!("merged:      {}", dir.display());
    }
    match args.train {
        TrainWhat::Lora => {
            println!("trainable:   {} parameters (r {}, alpha {})", trainable.num_parameters(), args.rank, args.alpha)
        }
        TrainWhat::Layers => println!(
            "trainable:   {} parameters (layers {:?}{})",
            trainable.num_parameters(),
            run.trained.as_ref().map(|t| t.layers.clone()).unwrap_or_default(),
            if args.train_head { ", final norm and LM head" } else { "" }
        ),
    }
    println!("data:        {} train / {} validation sequences", run.report.train_examples, run.report.val_examples);
    println!(
        "steps:       {} ({} tokens, {:.1} s, {:.0} tokens/s)",
        run.report.steps, run.report.tokens, run.report.seconds, run.report.tokens_per_s
    );
    if let (Some(b), Some(s)) = (run.report.best_val_loss, run.report.best_step) {
        let before = val_before.map(|v| format!("{:.4} before, ", v.0)).unwrap_or_default();
        println!("validation:  {before}best {b:.4} at step {s}");
    }
    if let Some(c) = &checkpoints {
        // The run is complete: its outputs replace the checkpoint.
        let _ = std::fs::remove_dir_all(&c.dir);
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// slm_plan.json of the merged model: this run and the base model's plan (if any), read through its type.
fn merged_plan(model: &Path, chain: &[PlanFile], run: &LoraRunFile) -> anyhow::Result<Vec<u8>> {
    let source_model = super::plan_file::dense_source(chain).map(String::from);
    let base = chain.first();
    Ok(MergedPlanFile {
        slm_output: OutputStamp::new(OutputKind::MergedPlan),
        base_model: model.display().to_string(),
        source_model,
        lora: run.clone(),
        base_plan: base.map(|p| p.to_value()),
    }
    .to_bytes())
}
