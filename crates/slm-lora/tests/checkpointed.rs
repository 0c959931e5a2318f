//! LoRA's per-layer activation checkpointing (the backward pass of a base read when used) against the whole
//! graph on the default model: the same loss and the same gradient for every A and B within 1e-5 of the
//! tensor's largest entry, with dropout on (the recomputed layers must draw the same masks); a mapped base gives
//! the checkpointed gradients bit for bit.

use candle_core::{Device, Tensor};
use slm_lora::train::{mean_loss, micro_batch_gradients};
use slm_lora::{Example, Lora, LoraConfig};
use slm_model::testing::{default_model_path, max_abs_diff};
use slm_model::Model;

fn examples(model: &Model) -> Vec<Example> {
    let tok = model.tokenizer().unwrap();
    ["Layers are recomputed from their stored inputs, one at a time, from the top.", "A short one."]
        .iter()
        .map(|s| {
            let ids = tok.encode(s).unwrap();
            let target = (0..ids.len()).map(|p| p > 0).collect();
            Example { ids, target }
        })
        .collect()
}

fn lora_with_nonzero_b(model: &Model) -> Lora {
    let lora = Lora::new(&model.spec, LoraConfig::default(), 3, &Device::Cpu).unwrap();
    for (k, p) in lora.layers.iter().flatten().enumerate() {
        let n = p.b.elem_count();
        let v: Vec<f32> = (0..n).map(|i| (((i * 7919 + k * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.02).collect();
        p.b.set(&Tensor::from_vec(v, p.b.dims(), &Device::Cpu).unwrap()).unwrap();
    }
    lora
}

#[test]
fn checkpointed_lora_gradients_equal_the_whole_graph_and_a_mapped_base_gives_them_bit_for_bit() {
    let resident = Model::load(&default_model_path(), &Device::Cpu).unwrap();
    let mapped = Model::load_mapped(&default_model_path(), &Device::Cpu).unwrap();
    let lora = lora_with_nonzero_b(&resident);
    assert!(lora.config.dropout > 0.0, "dropout must be on: the recomputation has to draw the same masks");
    let ex = examples(&resident);
    let (lw, gw) = micro_batch_gradients(&resident, &lora, &ex, None, false, 11).unwrap();
    let (lc, gc) = micro_batch_gradients(&resident, &lora, &ex, None, true, 11).unwrap();
    assert!((lw - lc).abs() <= 1e-6 * lw, "loss {lw} vs {lc}");
    assert_eq!(gw.len(), gc.len());
    let mut worst = 0f64;
    for (a, b) in gc.iter().zip(&gw) {
        let top = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!(top > 0.0, "every A and B gets a gradient");
        worst = worst.max(max_abs_diff(a, b) as f64 / top);
    }
    assert!(worst <= 1e-5, "checkpointed gradients differ by {worst} of their largest entry");
    // Another dropout seed changes the gradients: the masks are really drawn.
    let (_, other) = micro_batch_gradients(&resident, &lora, &ex, None, true, 12).unwrap();
    assert!(max_abs_diff(&other[0], &gc[0]) > 0.0);
    // A base read when used: the same checkpointed computation, bit for bit.
    let (lm, gm) = micro_batch_gradients(&mapped, &lora, &ex, None, true, 11).unwrap();
    assert_eq!(lm.to_bits(), lc.to_bits());
    for (a, b) in gm.iter().zip(&gc) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
}

#[test]
fn lora_validation_loss_runs_on_a_bf16_head_and_equals_its_f32_upcast() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("bf16");
    let dense = Model::load(&default_model_path(), &Device::Cpu).unwrap();
    dense.save(&src, slm_model::StorageDType::BF16, &[]).unwrap();
    let bf16 = Model::load_mapped(&src, &Device::Cpu).unwrap();
    assert_eq!(bf16.weights.lm_head().dtype(), candle_core::DType::BF16);
    let mut f32m = Model::load(&src, &Device::Cpu).unwrap();
    f32m.weights = f32m.weights.to(&Device::Cpu, candle_core::DType::F32).unwrap();
    let lora = lora_with_nonzero_b(&dense);
    let ex = examples(&dense);
    let (a, b) = (mean_loss(&bf16, &lora, &ex, None).unwrap(), mean_loss(&f32m, &lora, &ex, None).unwrap());
    assert!((a - b).abs() <= 1e-5 * b, "validation loss {a} on the bf16 head vs {b} on its f32 upcast");
}
