//! Times forward/backward of the pieces of a training step (attention, MLP, LM head + loss).
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use slm_lora::{Lora, LoraConfig};
use slm_model::forward::{attention_block, mlp_activations};
use slm_model::{Batch, Mode, Model};

fn time<F: FnMut() -> Tensor>(name: &str, mut f: F) {
    for _ in 0..2 {
        let t = Instant::now();
        let y = f();
        let fwd = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = y.sum_all().unwrap().backward().unwrap();
        println!("{name}: fwd {fwd:.3}s bwd {:.3}s", t.elapsed().as_secs_f64());
    }
}

fn main() {
    let path = std::env::args().nth(1).expect("MODEL");
    let model = Model::load(std::path::Path::new(&path), &Device::Cpu).unwrap();
    let lora = Lora::new(&model.spec, LoraConfig::default(), 1, &Device::Cpu).unwrap();
    let hook = lora.train_hook(1);
    let seqs: Vec<Vec<u32>> =
        (0..4).map(|s| (0..256).map(|i| ((i * 7919 + s * 13) % 40000) as u32).collect()).collect();
    let batch = Batch::new(&model.spec, &seqs, &model.device).unwrap();
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 256, 576), &Device::Cpu).unwrap()).unwrap();
    let (w, l) = (&model.weights.layer(3).unwrap().into_owned(), &model.spec.layers[3]);
    let ctx = model.layer_ctx(3, Mode::Differentiable, &hook);
    time("attention block", || attention_block(x.as_tensor(), w, l, &batch, &ctx).unwrap());
    time("mlp activations", || mlp_activations(x.as_tensor(), w, &ctx).unwrap());
    time("frozen down_proj", || {
        let a = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 256, 1536), &Device::Cpu).unwrap()).unwrap();
        slm_lora::ops::frozen_linear(a.as_tensor(), &w.down_proj).unwrap()
    });
    time("rms_norm_slow", || candle_nn_free(x.as_tensor(), &w.input_layernorm));
    let h = Var::from_tensor(&Tensor::randn(0f32, 1., (1020, 576), &Device::Cpu).unwrap()).unwrap();
    let targets: Vec<u32> = (0..1020).map(|i| (i * 31 % 49152) as u32).collect();
    time("lm head + ce", || {
        let logits = slm_lora::ops::frozen_linear(h.as_tensor(), model.weights.lm_head()).unwrap();
        slm_lora::ops::token_cross_entropy(&logits, &targets).unwrap()
    });
    time("lm head only", || slm_lora::ops::frozen_linear(h.as_tensor(), model.weights.lm_head()).unwrap());
}

fn candle_nn_free(x: &Tensor, w: &Tensor) -> Tensor {
    let n = x.sqr().unwrap().mean_keepdim(2).unwrap();
    x.broadcast_div(&(n + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(w).unwrap()
}
