//! `slm logits MODEL (--ids '[1,2,3]' | --text TEXT) --out FILE.npy`: the model's logits at every position of one
//! sequence, as a float32 `.npy` of shape [tokens, vocab] (for comparing slm against another runtime, such as
//! llama.cpp in `scripts/llamacpp_check.sh`).

use std::path::PathBuf;

use anyhow::{bail, Context};
use slm_model::output::{OutputKind, Replace};

use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF directory or a .gguf file.
    pub model: PathBuf,
    /// Token ids as a JSON array.
    #[arg(long, conflicts_with = "text")]
    pub ids: Option<String>,
    /// Or a text, tokenised by the model's tokenizer (its BOS first when it wants one).
    #[arg(long)]
    pub text: Option<String>,
    /// Output `.npy` file (float32 [tokens, vocab], written atomically).
    #[arg(long)]
    pub out: PathBuf,
}

/// A float32 C-order `.npy` (format 1.0) of `shape`.
pub fn npy_bytes(values: &[f32], shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded with spaces to a multiple of 64.
    let total = (10 + header.len() + 1).next_multiple_of(64);
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = Vec::with_capacity(total + 4 * values.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    if args.out.extension().is_none_or(|e| e != "npy") {
        bail!("--out {}: give a file name ending in .npy", args.out.display());
    }
    slm_model::output::check_output(&args.out, OutputKind::EvalResults, &[&args.model], Replace::Force)
        .context("--out")?;
    let model = common.load_model(&args.model, slm_model::Residency::Auto)?;
    let ids: Vec<u32> = match (&args.ids, &args.text) {
        (Some(j), None) => serde_json::from_str(j).context("--ids: expected a JSON array of token ids")?,
        (None, Some(t)) => {
            let tok = model.tokenizer()?;
            tok.bos_to_prepend().into_iter().chain(tok.encode(t)?).collect()
        }
        _ => bail!("give --ids or --text"),
    };
    if ids.is_empty() {
        bail!("--ids / --text: no tokens");
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= model.spec.vocab_size) {
        bail!("--ids: token {bad} is past the model's vocabulary of {}", model.spec.vocab_size);
    }
    let logits = model.logits_all(&ids)?.to_device(&candle_core::Device::Cpu)?;
    let (n, v) = logits.dims2()?;
    let values: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    slm_model::write_file_atomically(&args.out, &npy_bytes(&values, &[n, v]))?;
    let last = &values[(n - 1) * v..];
    let argmax = last.iter().enumerate().fold(0, |b, (i, x)| if *x > last[b] { i } else { b });
    println!(
        "{n} positions x {v} logits to {}; last position's argmax {argmax} ({:.5})",
        args.out.display(),
        last[argmax]
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The header numpy writes for a (2, 3) float32 array: 118 bytes of dict padded so the data starts at 128.
    #[test]
    fn npy_header_is_numpys() {
        let b = super::npy_bytes(&[0.0; 6], &[2, 3]);
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hl) % 64, 0);
        let h = std::str::from_utf8(&b[10..10 + hl]).unwrap();
        assert!(h.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"), "{h}");
        assert!(h.ends_with('\n'));
        assert_eq!(b.len(), 10 + hl + 24);
    }
}
