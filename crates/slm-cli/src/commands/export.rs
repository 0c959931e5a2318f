//! `slm export MODEL --out DIR [--dtype f32|f16|bf16]`.

use std::path::PathBuf;

use slm_model::output::OutputKind;
use slm_model::StorageDType;

use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF directory or a .gguf file.
    pub model: PathBuf,
    /// Output HF directory (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage dtype of the output: f32, f16 or bf16 [default: the input's: its stored dtype for an HF
    /// directory, f32 for a GGUF (dequantised)].
    #[arg(long)]
    pub dtype: Option<StorageDType>,
    /// Largest shard (bytes of tensor data; suffixes KB, MB, GB, KiB, MiB, GiB): above it the weights go into
    /// `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`.
    #[arg(long, default_value = "5GB", value_parser = super::byte_size)]
    pub shard_size: u64,
}

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    common.check_output("--out", &args.out, OutputKind::Model, &[&args.model])?;
    let model = common.load_model(&args.model, slm_model::Residency::Mapped)?;
    let dtype = args.dtype.unwrap_or(model.storage_dtype());
    model.save_sharded(&args.out, dtype, args.shard_size, &[], common.replace())?;
    println!(
        "exported {} ({} layers, {} parameters, {}) to {}",
        args.model.display(),
        model.spec.num_layers(),
        model.spec.num_parameters(),
        dtype.torch_name(),
        args.out.display()
    );
    Ok(())
}
