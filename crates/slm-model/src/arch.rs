//! The architecture as data: what distinguishes Llama, Mistral, Qwen2, Qwen3 and Gemma-3 decoder stacks, read
//! from an HF `config.json` (or GGUF metadata) once, so that the forward pass, the pruning methods and the savers
//! follow it without a per-family code path.

use serde::{Deserialize, Serialize};

/// A model family: which HF `model_type` / `architectures` and GGUF architecture a model is saved as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Family {
    pub const ALL: [Family; 5] = [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3, Family::Gemma3];

    /// HF `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3_text",
        }
    }

    /// HF `architectures[0]`.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// The family of an HF `model_type`; None when slm does not know it.
    pub fn from_model_type(s: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.model_type() == s)
    }

    /// The family's defaults (the features every checkpoint of it has; the config refines the rest).
    pub fn arch(self) -> Arch {
        let base = Arch { family: self, ..Arch::default() };
        match self {
            Family::Llama | Family::Mistral => base,
            Family::Qwen2 => Arch { qkv_bias: true, ..base },
            Family::Qwen3 => Arch { qk_norm: true, ..base },
            Family::Gemma3 => Arch {
                activation: Activation::GeluTanh,
                norm_plus_one: true,
                embed_scale: true,
                qk_norm: true,
                sandwich_norms: true,
                ..base
            },
        }
    }
}

/// The MLP's gate activation: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU (`silu`).
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    /// The name HF configs use.
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }
}

/// How rotary frequencies are scaled for long contexts (HF's `rope_scaling`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Plain rotary: `inv_freq[k] = theta^(-2k/d)`.
    #[default]
    Default,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// Llama-3.1's scheme: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

/// One rotary embedding: its base and scaling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl Rope {
    /// The inverse frequencies `[head_dim / 2]`, in f32 as transformers computes them.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let half = head_dim / 2;
        // transformers: 1 / theta ** (arange(0, d, 2).float() / d); computed in f64 and rounded once to f32 (the
        // correctly rounded value), then scaled in f32 as transformers does.
        let base: Vec<f32> =
            (0..half).map(|k| (1.0 / self.theta.powf(2.0 * k as f64 / head_dim as f64)) as f32).collect();
        match self.scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = original_max_position_embeddings as f32;
                let (factor, low, high) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                        if medium {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }

    /// The rotary that a GGUF's `rope_freqs.weight` describes: llama.cpp's converter stores Llama-3.1's scaling
    /// as one divisor per frequency (`[head_dim / 2]`; 1 for kept frequencies, `factor` for divided ones, the
    /// blend between), and divides `theta^(-2k/d)` by it. The divisors determine `factor` (the largest) and the two
    /// wavelength bounds relative to `original_max_position_embeddings` (a line through the blended ones; the
    /// absolute value is not determined, so `low_freq_factor` is taken as 1, Meta's value, and the others follow;
    /// the frequencies are the same whatever the choice). With one blended entry Meta's ratio (high 4 for low 1)
    /// fixes the line through it; with none, Meta's published bounds (low 1, high 4, 8192 positions) are tried. The result is accepted only if it reproduces every divisor to
    /// 1e-4 relative; otherwise the message says why, and the caller refuses the file.
    pub fn from_gguf_factors(theta: f64, head_dim: usize, factors: &[f32]) -> Result<Rope, String> {
        let plain = Rope { theta, scaling: RopeScaling::Default };
        if factors.len() != head_dim / 2 {
            return Err(format!("has {} entries, but head_dim {head_dim} needs {}", factors.len(), head_dim / 2));
        }
        if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f >= 1.0 - 1e-6)) {
            return Err(format!("holds {bad}; Llama-3 divisors are finite and at least 1"));
        }
        let factor = factors.iter().fold(1.0f64, |m, &f| m.max(f as f64));
        if factor <= 1.0 + 1e-6 {
            return Ok(plain);
        }
        let base = plain.inv_freq(head_dim);
        // Blended entry k: 1/f_k = (1 - s)/factor + s, s = old/wavelen_k/(high - low) - low/(high - low).
        let blended: Vec<(f64, f64)> = factors
            .iter()
            .zip(&base)
            .filter(|(f, _)| (**f as f64) > 1.0 + 1e-4 && (**f as f64) < factor * (1.0 - 1e-4))
            .map(|(&f, &b)| {
                let inv_wavelen = b as f64 / (2.0 * std::f64::consts::PI);
                (inv_wavelen, (factor / f as f64 - 1.0) / (factor - 1.0))
            })
            .collect();
        let mut candidates = Vec::new();
        if blended.len() >= 2 {
            // Least squares s = a x + b; low/old = -b/a, high/old = (1 - b)/a; with low = 1: old = -a/b.
            let n = blended.len() as f64;
            let (sx, sy) = blended.iter().fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
            let (mx, my) = (sx / n, sy / n);
            let sxx: f64 = blended.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
            let sxy: f64 = blended.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
            let a = sxy / sxx;
            let b = my - a * mx;
            if a > 0.0 && b < 0.0 {
                let old = (-a / b).round();
                let high = (((1.0 - b) / a) * old * 1e6).round() / 1e6;
                candidates.push((1.0, high, old));
            }
        }
        if let Some(&(x, s)) = blended.first() {
            // One point: Meta's ratio high/low = 4 with low = 1, old through that point.
            candidates.push((1.0, 4.0, ((3.0 * s + 1.0) / x).round()));
        }
        candidates.push((1.0, 4.0, 8192.0));
        for (low, high, old) in candidates {
            if !((1.0..1e12).contains(&old) && high > low) {
                continue;
            }
            let rope = Rope {
                theta,
                scaling: RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: old as usize,
                },
            };
            let got = rope.inv_freq(head_dim);
            let fits = base.iter().zip(&got).zip(factors).all(|((&b, &g), &f)| {
                let implied = b as f64 / g as f64;
                (implied - f as f64).abs() <= 1e-4 * f as f64
            });
            if fits {
                return Ok(rope);
            }
        }
        Err("is not Llama-3.1's frequency scaling (no factor, low_freq_factor, high_freq_factor and \
             original_max_position_embeddings reproduce it)"
            .into())
    }

    /// Checks the numbers (finite, positive; Llama-3's `high_freq_factor > low_freq_factor`); the message names
    /// the key.
    pub fn validate(&self, key: &str) -> Result<(), String> {
        if !(self.theta.is_finite() && self.theta > 0.0) {
            return Err(format!("{key} {} must be finite and positive", self.theta));
        }
        match self.scaling {
            RopeScaling::Default => Ok(()),
            RopeScaling::Linear { factor } => positive("rope_scaling.factor", factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                positive("rope_scaling.factor", factor)?;
                positive("rope_scaling.low_freq_factor", low_freq_factor)?;
                positive("rope_scaling.high_freq_factor", high_freq_factor)?;
                if !(high_freq_factor > low_freq_factor) {
                    return Err(format!(
                        "`rope_scaling.high_freq_factor` {high_freq_factor} must exceed `low_freq_factor` {low_freq_factor}"
                    ));
                }
                if original_max_position_embeddings == 0 {
                    return Err("`rope_scaling.original_max_position_embeddings` must be positive".into());
                }
                Ok(())
            }
        }
    }
}

fn positive(key: &str, x: f64) -> Result<(), String> {
    if x.is_finite() && x > 0.0 {
        Ok(())
    } else {
        Err(format!("`{key}` {x} must be finite and positive"))
    }
}

/// Everything about a decoder stack beyond its shapes. The default is plain Llama.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Arch {
    pub family: Family,
    pub activation: Activation,
    /// Gemma's RMSNorm: `x̂ · (1 + w)` instead of `x̂ · w` (every norm of the model, q/k norms included).
    pub norm_plus_one: bool,
    /// Embeddings multiplied by √hidden_size (Gemma).
    pub embed_scale: bool,
    /// Biases on q, k and v (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k before the rotary embedding (Qwen3, Gemma-3).
    pub qk_norm: bool,
    /// Norms after attention and after the MLP, before each residual add (Gemma-3).
    pub sandwich_norms: bool,
    /// The rotary embedding of global-attention layers.
    pub rope: Rope,
    /// The rotary embedding of sliding-window layers when it differs (Gemma-3's `rope_local_base_freq`).
    pub local_rope: Option<Rope>,
    /// Keys a sliding-window layer sees: the query's own position and the `sliding_window - 1` before it.
    pub sliding_window: Option<usize>,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim^-1/2` (Gemma).
    pub query_pre_attn_scalar: Option<f64>,
}

impl Default for Arch {
    fn default() -> Self {
        Arch {
            family: Family::Llama,
            activation: Activation::Silu,
            norm_plus_one: false,
            embed_scale: false,
            qkv_bias: false,
            qk_norm: false,
            sandwich_norms: false,
            rope: Rope { theta: 10_000.0, scaling: RopeScaling::Default },
            local_rope: None,
            sliding_window: None,
            query_pre_attn_scalar: None,
        }
    }
}

impl Arch {
    /// The rotary embedding of a layer.
    pub fn rope_of(&self, sliding: bool) -> Rope {
        match (sliding, self.local_rope) {
            (true, Some(r)) => r,
            _ => self.rope,
        }
    }

    /// The softmax scale of a layer with this head_dim.
    pub fn attn_scale(&self, head_dim: usize) -> f64 {
        1.0 / self.query_pre_attn_scalar.unwrap_or(head_dim as f64).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-3.1's published scaling (factor 8, low 1, high 4, 8192 original positions) on head_dim 128 and theta
    /// 500000: frequencies whose wavelength is under 2048 positions are kept, over 8192 divided by 8, and the
    /// ones between blended. Values computed by hand from the formula.
    #[test]
    fn llama3_scaling_keeps_high_divides_low_blends_between() {
        let plain = Rope { theta: 500_000.0, scaling: RopeScaling::Default };
        let scaled = Rope {
            theta: 500_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        };
        let (p, s) = (plain.inv_freq(128), scaled.inv_freq(128));
        assert_eq!(p[0], 1.0);
        for k in 0..64 {
            let wavelen = 2.0 * std::f32::consts::PI / p[k];
            if wavelen < 2048.0 {
                assert_eq!(s[k], p[k], "k={k}: high frequency kept");
            } else if wavelen > 8192.0 {
                assert_eq!(s[k], p[k] / 8.0, "k={k}: low frequency divided by the factor");
            } else {
                let smooth = (8192.0 / wavelen - 1.0) / 3.0;
                let want = (1.0 - smooth) * p[k] / 8.0 + smooth * p[k];
                assert!((s[k] - want).abs() <= 1e-6 * want, "k={k}: blended {} vs {want}", s[k]);
                assert!(s[k] < p[k] && s[k] > p[k] / 8.0);
            }
        }
        let linear = Rope { theta: 10_000.0, scaling: RopeScaling::Linear { factor: 4.0 } };
        let base = Rope { theta: 10_000.0, scaling: RopeScaling::Default };
        assert_eq!(linear.inv_freq(8)[1], base.inv_freq(8)[1] / 4.0);
    }

    /// llama.cpp's converter writes `rope_freqs.weight` as `1 / ((1 - s)/factor + s)` per blended frequency, 1
    /// or `factor` outside (convert_hf_to_gguf.py, LlamaModel): the inference recovers a scaling with the same
    /// frequencies, for Llama-3.1-8B's and Llama-3.2-1B's published values and for non-Meta bounds; an arbitrary
    /// vector is refused.
    #[test]
    fn llama3_scaling_is_recovered_from_gguf_factors() {
        let gguf_factors = |theta: f64, d: usize, factor: f64, low: f64, high: f64, old: f64| -> Vec<f32> {
            let (lw, hw) = (old / low, old / high);
            (0..d / 2)
                .map(|k| {
                    let freq = (1.0 / theta.powf(2.0 * k as f64 / d as f64)) as f32 as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    (if wavelen < hw {
                        1.0
                    } else if wavelen > lw {
                        factor
                    } else {
                        let s = (old / wavelen - low) / (high - low);
                        1.0 / ((1.0 - s) / factor + s)
                    }) as f32
                })
                .collect()
        };
        for (factor, low, high, old) in [(8.0, 1.0, 4.0, 8192.0), (32.0, 1.0, 4.0, 8192.0), (16.0, 2.0, 6.0, 4096.0)] {
            let want = Rope {
                theta: 500_000.0,
                scaling: RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: old as usize,
                },
            };
            let f = gguf_factors(500_000.0, 128, factor, low, high, old);
            let got = Rope::from_gguf_factors(500_000.0, 128, &f).unwrap();
            let (a, b) = (got.inv_freq(128), want.inv_freq(128));
            for k in 0..64 {
                assert!((a[k] - b[k]).abs() <= 1e-5 * b[k], "factor {factor} k {k}: {} vs {}", a[k], b[k]);
            }
            if low == 1.0 {
                assert_eq!(got, want, "Meta's bounds come back exactly");
            }
        }
        let ones = vec![1.0f32; 64];
        assert_eq!(Rope::from_gguf_factors(10_000.0, 128, &ones).unwrap().scaling, RopeScaling::Default);
        let mut odd = gguf_factors(500_000.0, 128, 8.0, 1.0, 4.0, 8192.0);
        odd[2] = 3.0;
        assert!(Rope::from_gguf_factors(500_000.0, 128, &odd).unwrap_err().contains("not Llama-3.1"));
        assert!(Rope::from_gguf_factors(500_000.0, 128, &ones[..10]).unwrap_err().contains("10 entries"));
        assert!(Rope::from_gguf_factors(500_000.0, 128, &[f32::NAN; 64]).is_err());
    }

    #[test]
    fn gemma_scale_and_local_rope() {
        let a = Arch {
            query_pre_attn_scalar: Some(256.0),
            local_rope: Some(Rope { theta: 10_000.0, scaling: RopeScaling::Default }),
            ..Family::Gemma3.arch()
        };
        assert_eq!(a.attn_scale(64), 1.0 / 16.0);
        assert_eq!(Arch::default().attn_scale(64), 0.125);
        assert_eq!(a.rope_of(true).theta, 10_000.0);
        assert_eq!(a.rope_of(false), a.rope);
    }
}
