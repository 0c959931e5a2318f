//! `slm-lora`: LoRA adapters on the seven projections of every layer, or full tuning of chosen layers and the
//! head ([`FullTune`]), recovery training on CPU with candle
//! autograd (AdamW, warm-up + linear decay, gradient accumulation, clipping, validation, response-only loss,
//! optional distillation from the dense model), merging, and PEFT-compatible adapter files.

pub mod adapter;
pub mod checkpoint;
pub mod data;
pub mod distill_data;
pub mod error;
pub mod file;
pub mod ops;
pub mod train;
pub mod trainable;

pub use adapter::{Lora, LoraConfig, LoraHook, LoraPair};
pub use checkpoint::Checkpoints;
pub use data::{Example, Format, Instruction};
pub use error::{LoraError, Result};
pub use train::{train, Distill, StepInfo, TrainConfig, TrainReport};
pub use trainable::{FullTune, TrainHook, Trainable};
