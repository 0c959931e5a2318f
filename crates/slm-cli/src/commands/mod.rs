//! One module per subcommand, and the options every command shares.

pub mod bench;
pub mod depth;
pub mod distill_data;
pub mod eval;
pub mod export;
pub mod inspect;
pub mod logits;
pub mod lora;
pub mod plan_file;
pub mod run;
pub mod run_files;
pub mod schedule;
pub mod similarity;
pub mod synth;
pub mod width;

use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use slm_model::output::{OutputKind, Replace};

/// Options shared by every command.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Where to compute: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Replace an existing output that is not an earlier slm output of the same kind (never an input).
    #[arg(long, global = true)]
    pub force: bool,
    /// How the model's layers are held: `resident` (read into memory at load), `mapped` (left in the file,
    /// each read, and a GGUF layer dequantised, when used: memory for one layer at a time, for models near or
    /// above the machine's memory) or `auto` (resident when the layers fit in half the available memory).
    /// Same results either way (LoRA on a mapped base trains with per-layer checkpointing: the same gradients
    /// up to float rounding). Default: mapped for depth, similarity, width and export (they work layer by
    /// layer), auto for eval, lora, bench and run.
    #[arg(long, global = true, value_name = "resident|mapped|auto")]
    pub weights: Option<slm_model::Residency>,
}

impl CommonArgs {
    pub fn device(&self) -> anyhow::Result<Device> {
        slm_model::parse_device(&self.device).context("--device")
    }

    /// Loads the model at `path` with `--weights`, or `default` when it is not given.
    pub fn load_model(&self, path: &Path, default: slm_model::Residency) -> anyhow::Result<slm_model::Model> {
        let residency = self.weights.unwrap_or(default);
        slm_model::Model::load_as(path, &self.device()?, residency)
            .with_context(|| format!("loading {}", path.display()))
    }

    /// The replacement rule of `--force`.
    pub fn replace(&self) -> Replace {
        Replace::from_force(self.force)
    }

    /// Checks an output path (named by `flag`) against the inputs before any work: see
    /// [`slm_model::output::check_output`].
    pub fn check_output(&self, flag: &str, out: &Path, kind: OutputKind, inputs: &[&Path]) -> anyhow::Result<()> {
        slm_model::output::check_output(out, kind, inputs, self.replace()).with_context(|| flag.to_string())
    }
}

/// The dtype activations are computed in, for the commands that only run the model forward (eval, depth,
/// similarity, bench). Gradient work (width, lora) computes in f32.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
}

impl ComputeDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            ComputeDtype::F32 => candle_core::DType::F32,
            ComputeDtype::Bf16 => candle_core::DType::BF16,
        }
    }

    /// The flag's spelling.
    pub fn name(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
        }
    }

    /// The name transformers and lm-eval give it (`float32`, `bfloat16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "float32",
            ComputeDtype::Bf16 => "bfloat16",
        }
    }

    /// `model` computing in this dtype (a cheap copy: tensors are shared). Outputs are built from the original
    /// model, so a saved model's final norm keeps its precision.
    pub fn apply(self, model: &slm_model::Model) -> anyhow::Result<slm_model::Model> {
        let mut m = model.clone();
        m.set_compute_dtype(self.dtype()).context("--compute-dtype")?;
        Ok(m)
    }
}

/// `--compute-dtype`, flattened into the commands that take it.
#[derive(clap::Args, Debug, Clone)]
pub struct ComputeArgs {
    /// The dtype layers compute in: f32, or bf16 (weights converted per use; the residual stream is bf16 as in
    /// transformers' bf16 inference; attention scores, softmax and the LM head's logits stay f32). bf16 halves
    /// activation memory and is the fast path on GPUs; on CPU it measured 0.66× f32's eval speed. On the
    /// default model's golden documents its log-likelihoods differ from f32's by 0.11 per request on average
    /// (worst 0.57) and 173 of 175 acc/acc_norm decisions agree.
    #[arg(long, value_enum, default_value_t = ComputeDtype::F32, value_name = "f32|bf16")]
    pub compute_dtype: ComputeDtype,
}

pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// A flag's number, refused when it is NaN or infinite (each command then checks its own range).
pub fn finite_f64(s: &str) -> Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if x.is_finite() {
        Ok(x)
    } else {
        Err(format!("`{s}` is not a finite number"))
    }
}

/// A count that must be at least 1 (`--limit 0` would evaluate nothing and print an empty table).
pub fn positive_usize(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("`{s}` is not a whole number: {e}")),
    }
}

/// A byte count: a whole number with an optional suffix KB/MB/GB (powers of 1000) or KiB/MiB/GiB (of 1024).
pub fn byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (such as 5GB, 500MB, 2GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (B, KB, MB, GB, KiB, MiB, GiB)")),
    };
    match n.checked_mul(mult) {
        Some(0) => Err("must be at least 1 byte".into()),
        Some(b) => Ok(b),
        None => Err(format!("`{s}` is too large")),
    }
}

/// Calibration text options shared by the commands that sample calibration windows.
#[derive(clap::Args, Debug, Clone)]
pub struct CalibArgs {
    /// Calibration corpus: JSONL with a `text` field per line [default: lambada_openai.test.jsonl in the data
    /// directory].
    #[arg(long = "calib")]
    pub file: Option<std::path::PathBuf>,
    /// The data directory (default: $SLM_DATA_DIR, else share/slm/data beside the installed binary, else the
    /// source checkout's data/).
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// Number of calibration windows [default: 10; `slm depth --method slm-dp`: 40].
    #[arg(long, value_parser = positive_usize)]
    pub samples: Option<usize>,
    /// Tokens per calibration window [default: 128; `slm depth --method slm-dp`: 32].
    #[arg(long, value_parser = positive_usize)]
    pub seq_len: Option<usize>,
    /// Seed of the calibration sampling.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
}

/// The reference code's calibration: 10 windows of 128 tokens.
pub const REFERENCE_WINDOWS: (usize, usize) = (10, 128);

impl CalibArgs {
    /// These settings, with `(samples, seq_len)` where the command line gave none, and the corpus found.
    pub fn or(&self, (samples, seq_len): (usize, usize)) -> anyhow::Result<Calib> {
        let file = match &self.file {
            Some(f) => f.clone(),
            None => slm_model::data::default_calibration_corpus(self.data_dir.as_deref())?,
        };
        Ok(Calib {
            file,
            samples: self.samples.unwrap_or(samples),
            seq_len: self.seq_len.unwrap_or(seq_len),
            seed: self.seed,
        })
    }
}

/// Calibration settings with every value decided.
#[derive(Debug, Clone)]
pub struct Calib {
    pub file: std::path::PathBuf,
    pub samples: usize,
    pub seq_len: usize,
    pub seed: u64,
}

impl Calib {
    /// The seeded calibration windows, tokenised with the model's tokenizer.
    pub fn windows(&self, model: &slm_model::Model) -> anyhow::Result<Vec<Vec<u32>>> {
        slm_model::calib::calibration_windows(&self.file, model.tokenizer()?, self.samples, self.seq_len, self.seed)
            .with_context(|| format!("sampling calibration windows from {}", self.file.display()))
    }

    /// The settings as the output files record them.
    pub fn record(&self) -> slm_model::calib::CalibrationRecord {
        slm_model::calib::CalibrationRecord {
            file: self.file.display().to_string(),
            samples: self.samples,
            seq_len: self.seq_len,
            seed: self.seed,
        }
    }
}

/// (current, peak) resident memory of this process in MiB (procfs's reading of /proc/self/status; None off
/// Linux).
#[cfg(target_os = "linux")]
pub fn memory_mib() -> Option<(f64, f64)> {
    let status = procfs::process::Process::myself().ok()?.status().ok()?;
    let mib = |kb: u64| kb as f64 / 1024.0;
    Some((mib(status.vmrss?), mib(status.vmhwm?)))
}

#[cfg(not(target_os = "linux"))]
pub fn memory_mib() -> Option<(f64, f64)> {
    None
}
