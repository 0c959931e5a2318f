//! `slm synth --out DIR (--preset llama2-7b|llama2-13b | --hidden H --layers L --heads N [--kv-heads K]
//! --intermediate I) [--seed S] [--dtype bf16] [--shard-size 5GB] [--tokenizer-from MODEL]`: a Llama-shaped HF
//! directory with seeded random weights, for scale tests ([`slm_model::synth`]).

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use slm_model::output::OutputKind;
use slm_model::synth::SynthShape;
use slm_model::{Model, StorageDType};

use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output HF directory (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// A published shape: llama2-7b (4096, 32 layers, 32 heads, MLP 11008) or llama2-13b (5120, 40, 40, 13824).
    #[arg(long, conflicts_with_all = ["hidden", "layers", "heads", "kv_heads", "intermediate"])]
    pub preset: Option<String>,
    #[arg(long, value_parser = super::positive_usize)]
    pub hidden: Option<usize>,
    #[arg(long, value_parser = super::positive_usize)]
    pub layers: Option<usize>,
    #[arg(long, value_parser = super::positive_usize)]
    pub heads: Option<usize>,
    /// KV heads [default: --heads].
    #[arg(long, value_parser = super::positive_usize)]
    pub kv_heads: Option<usize>,
    #[arg(long, value_parser = super::positive_usize)]
    pub intermediate: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage dtype: f32, f16 or bf16.
    #[arg(long, default_value = "bf16")]
    pub dtype: StorageDType,
    /// Largest shard (bytes of tensor data; suffixes KB, MB, GB, KiB, MiB, GiB).
    #[arg(long, default_value = "5GB", value_parser = super::byte_size)]
    pub shard_size: u64,
    /// The model whose tokenizer (and vocabulary size, BOS, EOS) the synthetic model gets [default: the default
    /// model].
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
}

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    let shape = match &args.preset {
        Some(p) => SynthShape::preset(p)
            .ok_or_else(|| anyhow::anyhow!("--preset `{p}` is not known (llama2-7b, llama2-13b)"))?,
        None => {
            let need =
                |v: Option<usize>, flag: &str| v.ok_or_else(|| anyhow::anyhow!("{flag} is needed without --preset"));
            let heads = need(args.heads, "--heads")?;
            SynthShape {
                hidden: need(args.hidden, "--hidden")?,
                layers: need(args.layers, "--layers")?,
                heads,
                kv_heads: args.kv_heads.unwrap_or(heads),
                intermediate: need(args.intermediate, "--intermediate")?,
            }
        }
    };
    let source = args.tokenizer_from.clone().unwrap_or_else(slm_model::testing::default_model_path);
    let mut inputs = vec![source.as_path()];
    inputs.retain(|p| p.exists());
    common.check_output("--out", &args.out, OutputKind::Model, &inputs)?;
    let donor = Model::load(&source, &candle_core::Device::Cpu)?;
    let tokenizer = donor.tokenizer()?;
    let spec = shape
        .spec(donor.spec.vocab_size, donor.spec.bos_token_id, donor.spec.eos_token_id)
        .map_err(|e| anyhow::anyhow!("the synthetic shape: {e}"))?;
    let bytes = spec.num_parameters() as u64 * args.dtype.dtype().size_in_bytes() as u64;
    tracing::info!(params = spec.num_parameters(), bytes, "writing a synthetic model");
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("synth [{bar:30}] {pos}/{len} tensors  {elapsed} < ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    slm_model::synth::write_synthetic(
        &args.out,
        &spec,
        tokenizer,
        slm_model::synth::SynthOptions {
            seed: args.seed,
            dtype: args.dtype,
            max_shard_bytes: args.shard_size,
            replace: common.replace(),
        },
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    println!(
        "wrote a synthetic Llama ({} layers, hidden {}, {} parameters, {:.2} GB {}) to {}",
        spec.num_layers(),
        spec.hidden_size,
        spec.num_parameters(),
        bytes as f64 / 1e9,
        args.dtype.torch_name(),
        args.out.display()
    );
    Ok(())
}
