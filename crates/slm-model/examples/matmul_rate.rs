//! Matmul rate of candle's CPU backend at the default model's shapes (f32 and bf16), median of 10.
//! `cargo run --release -p slm-model --example matmul_rate`
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for dt in [DType::F32, DType::BF16] {
        for (m, k, n) in [(2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576), (512, 576, 49152)] {
            let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(dt)?;
            // weights are held [out, in] and used transposed, as in the forward pass
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(dt)?;
            for _ in 0..3 {
                a.matmul(&w.t()?)?;
            }
            let mut ts: Vec<f64> = (0..10)
                .map(|_| {
                    let t = Instant::now();
                    a.matmul(&w.t().unwrap()).unwrap();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            ts.sort_by(f64::total_cmp);
            println!("{dt:?} {m}x{k}x{n}: {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / ts[5] / 1e9);
        }
    }
    Ok(())
}
