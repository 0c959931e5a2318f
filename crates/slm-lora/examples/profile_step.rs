//! Times the phases of one LoRA training micro-batch: `cargo run --release -p slm-lora --example profile_step MODEL`.
use std::time::Instant;

use candle_core::Device;
use slm_lora::{Example, Lora, LoraConfig};
use slm_model::{Batch, Mode, Model};

fn main() -> anyhow_free::Result {
    let path = std::env::args().nth(1).expect("MODEL");
    let model = Model::load(std::path::Path::new(&path), &Device::Cpu)?;
    let lora = Lora::new(&model.spec, LoraConfig::default(), 1, &Device::Cpu)?;
    let ex: Vec<Example> = (0..4)
        .map(|s| Example {
            ids: (0..256).map(|i| ((i * 7919 + s * 13) % 40000) as u32).collect(),
            target: (0..256).map(|p| p > 0).collect(),
        })
        .collect();
    for _ in 0..3 {
        let seqs: Vec<Vec<u32>> = ex.iter().map(|e| e.ids.clone()).collect();
        let t = Instant::now();
        let pos: Vec<Vec<usize>> = seqs.iter().map(|s| (0..s.len()).collect()).collect();
        let _ = model.forward(&seqs, &pos, false, Mode::Inference)?;
        let inf = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let batch = Batch::new(&model.spec, &seqs, &model.device)?;
        let _ = model.forward_batch(&batch, &pos, false, Mode::Differentiable)?;
        let diff = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let losses = slm_lora::train::token_losses(&model, &lora, &ex, true, 3)?;
        let loss = losses.mean_all()?;
        let fwd = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _g = loss.backward()?;
        let bwd = t.elapsed().as_secs_f64();
        println!(
            "inference fwd {inf:.2}s  differentiable fwd {diff:.2}s  train fwd+loss {fwd:.2}s  backward {bwd:.2}s"
        );
    }
    Ok(())
}

mod anyhow_free {
    pub type Result = std::result::Result<(), Box<dyn std::error::Error>>;
}
