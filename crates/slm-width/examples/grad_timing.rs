use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let model = slm_model::Model::load(&slm_model::testing::default_model_path(), &candle_core::Device::Cpu)?;
    let tok = model.tokenizer()?;
    let windows = slm_model::calib::calibration_windows(
        &slm_model::testing::data_dir().join("lambada_openai.test.jsonl"),
        tok,
        10,
        128,
        1234,
    )?;
    let t = Instant::now();
    let loss = slm_width::importance::lm_loss(&model, &windows)?;
    println!("forward diff (no vars) {:.2}s loss {}", t.elapsed().as_secs_f64(), loss.to_scalar::<f32>()?);
    let layers: Vec<usize> = (4..28).collect();
    let t = Instant::now();
    let g = slm_width::gradients(&model, &windows, &layers, false, &mut || {})?;
    println!("grad {:.2}s", t.elapsed().as_secs_f64());
    let layers: Vec<usize> = (27..28).collect();
    let t = Instant::now();
    let g2 = slm_width::gradients(&model, &windows, &layers, false, &mut || {})?;
    println!("grad top layer only {:.2}s {}", t.elapsed().as_secs_f64(), g.loss - g2.loss);
    Ok(())
}
