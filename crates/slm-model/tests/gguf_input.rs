//! GGUF loading on small files written here: the Q/K un-permutation end to end, and clear errors for an
//! unsupported architecture or tensor type.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use slm_model::testing::tiny_model;
use slm_model::{Model, ModelError};

/// llama.cpp's `permute` for interleaved rotary (convert_hf_to_gguf.py).
fn llama_cpp_permute(w: &Tensor, n_head: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((n_head, 2, out / n_head / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// Writes `m` as a GGUF of architecture `arch` the way llama.cpp's converter would: f32 tensors, `{arch}.*` keys,
/// Q/K rows permuted for `llama` only (Qwen uses the rotate-half "NEOX" rotary in llama.cpp), biases as
/// `attn_q.bias`, q/k norms as `attn_q_norm.weight`.
fn write_gguf(m: &Model, path: &std::path::Path, arch: &str) {
    write_gguf_with(m, path, arch, &[])
}

/// [`write_gguf`] with extra top-level tensors (such as `rope_freqs.weight`).
fn write_gguf_with(m: &Model, path: &std::path::Path, arch: &str, extra: &[(&str, Tensor)]) {
    let s = &m.spec;
    let l = s.layers[0];
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut push = |name: String, t: &Tensor| tensors.push((name, QTensor::quantize(t, GgmlDType::F32).unwrap()));
    push("token_embd.weight".into(), &m.weights.embed_tokens);
    push("output_norm.weight".into(), &m.weights.norm);
    push("output.weight".into(), m.weights.lm_head.as_ref().unwrap());
    for (name, t) in extra {
        push(name.to_string(), t);
    }
    for (i, w) in m.weights.layers.iter().enumerate() {
        let w = &*w.get().unwrap();
        push(format!("blk.{i}.attn_norm.weight"), &w.input_layernorm);
        if arch == "llama" {
            push(format!("blk.{i}.attn_q.weight"), &llama_cpp_permute(&w.q_proj, l.num_attention_heads));
            push(format!("blk.{i}.attn_k.weight"), &llama_cpp_permute(&w.k_proj, l.num_key_value_heads));
        } else {
            push(format!("blk.{i}.attn_q.weight"), &w.q_proj);
            push(format!("blk.{i}.attn_k.weight"), &w.k_proj);
        }
        push(format!("blk.{i}.attn_v.weight"), &w.v_proj);
        push(format!("blk.{i}.attn_output.weight"), &w.o_proj);
        push(format!("blk.{i}.ffn_norm.weight"), &w.post_attention_layernorm);
        push(format!("blk.{i}.ffn_gate.weight"), &w.gate_proj);
        push(format!("blk.{i}.ffn_up.weight"), &w.up_proj);
        push(format!("blk.{i}.ffn_down.weight"), &w.down_proj);
        for (name, t) in [
            ("attn_q.bias", &w.q_bias),
            ("attn_k.bias", &w.k_bias),
            ("attn_v.bias", &w.v_bias),
            ("attn_q_norm.weight", &w.q_norm),
            ("attn_k_norm.weight", &w.k_norm),
        ] {
            if let Some(t) = t {
                push(format!("blk.{i}.{name}"), t);
            }
        }
    }
    let k = |key: &str| format!("{arch}.{key}");
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (k("block_count"), Value::U32(s.layers.len() as u32)),
        (k("embedding_length"), Value::U32(s.hidden_size as u32)),
        (k("feed_forward_length"), Value::U32(l.intermediate_size as u32)),
        (k("attention.head_count"), Value::U32(l.num_attention_heads as u32)),
        (k("attention.head_count_kv"), Value::U32(l.num_key_value_heads as u32)),
        (k("attention.key_length"), Value::U32(l.head_dim as u32)),
        (k("rope.freq_base"), Value::F32(s.arch.rope.theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(s.rms_norm_eps as f32)),
        (k("context_length"), Value::U32(s.max_position_embeddings as u32)),
        (k("vocab_size"), Value::U32(s.vocab_size as u32)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
}

fn err_of(r: Result<Model, ModelError>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn gguf_round_trip_recovers_hf_layout_and_logits() {
    let m = tiny_model(2, 11);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_gguf(&m, &p, "llama");
    let back = Model::load(&p, &Device::Cpu).unwrap();
    assert_eq!(back.spec.layers, m.spec.layers);
    assert_eq!((back.spec.vocab_size, back.spec.hidden_size), (m.spec.vocab_size, m.spec.hidden_size));
    assert!((back.spec.rms_norm_eps - m.spec.rms_norm_eps).abs() < 1e-12, "eps is stored as f32");
    for ((na, a), (_, b)) in m
        .weights
        .named_tensors(&m.spec.arch)
        .unwrap()
        .iter()
        .zip(back.weights.named_tensors(&back.spec.arch).unwrap().iter())
    {
        assert_eq!(a.to_vec2::<f32>().ok(), b.to_vec2::<f32>().ok(), "{na}");
    }
    let ids = [1u32, 2, 3, 40, 50];
    let d = slm_model::testing::max_abs_diff(&m.logits_all(&ids).unwrap(), &back.logits_all(&ids).unwrap());
    assert_eq!(d, 0.0);
}

#[test]
fn unsupported_architecture_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("gpt2.gguf");
    write_gguf(&tiny_model(1, 1), &p, "gpt2");
    let e = err_of(Model::load(&p, &Device::Cpu));
    assert!(e.contains("gpt2.gguf") && e.contains("`general.architecture` `gpt2` is not supported"), "{e}");
}

#[test]
fn unsupported_quantisation_type_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("iq.gguf");
    write_gguf(&tiny_model(1, 2), &p, "llama");
    // Rewrite the first tensor's type field (u32 after its name, rank and dims) to 16 = IQ2_XXS.
    let mut bytes = std::fs::read(&p).unwrap();
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let rank = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * rank;
    assert_eq!(u32::from_le_bytes(bytes[type_at..type_at + 4].try_into().unwrap()), 0, "expected F32 before patching");
    bytes[type_at..type_at + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let e = err_of(Model::load(&p, &Device::Cpu));
    assert!(e.contains("iq.gguf") && e.contains("unsupported quantisation type"), "{e}");
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.gguf");
    write_gguf(&tiny_model(1, 3), &p, "llama");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(Model::load(&p, &Device::Cpu));
    assert!(e.contains("cut.gguf") && e.contains("invalid GGUF"), "{e}");
}

#[test]
fn qwen2_and_qwen3_ggufs_load_with_their_biases_and_qk_norms() {
    for (arch, family) in [("qwen2", slm_model::Family::Qwen2), ("qwen3", slm_model::Family::Qwen3)] {
        let m = slm_model::testing::tiny_model_of(family, 2, 4);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(format!("{arch}.gguf"));
        write_gguf(&m, &p, arch);
        let back = Model::load(&p, &Device::Cpu).unwrap();
        assert_eq!(back.spec.arch.family, family);
        assert_eq!(back.spec.layers, m.spec.layers);
        assert_eq!(back.weights.layer(1).unwrap().q_bias.is_some(), family == slm_model::Family::Qwen2);
        assert_eq!(back.weights.layer(1).unwrap().k_norm.is_some(), family == slm_model::Family::Qwen3);
        let ids = [1u32, 2, 3, 40, 50];
        let d = slm_model::testing::max_abs_diff(&m.logits_all(&ids).unwrap(), &back.logits_all(&ids).unwrap());
        assert_eq!(d, 0.0, "{arch}");
    }
}

/// llama.cpp's `rope_freqs.weight` for Llama-3.1 scaling (convert_hf_to_gguf.py, LlamaModel): per frequency of
/// `theta^(-2k/d)` (computed in f32 as torch does), 1 below the high-frequency wavelength, `factor` above the
/// low-frequency one, `1 / ((1 - s)/factor + s)` between.
fn llama_cpp_rope_factors(theta: f64, d: usize, factor: f64, low: f64, high: f64, old: f64) -> Tensor {
    let f: Vec<f32> = (0..d / 2)
        .map(|k| {
            let freq = (1.0 / theta.powf(2.0 * k as f64 / d as f64)) as f32 as f64;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            (if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor
            } else {
                let s = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - s) / factor + s)
            }) as f32
        })
        .collect();
    Tensor::new(f, &Device::Cpu).unwrap()
}

/// A Llama-3.x GGUF carries its rotary scaling as the `rope_freqs.weight` tensor: the golden tiny Llama-3 (factor
/// 32, low 1, high 4, 64 original positions) written that way loads with the same scaling and the same logits as
/// its HF directory, which match transformers. A divisor vector that is no Llama-3 scaling, or of the wrong
/// length, is refused naming the tensor.
#[test]
fn llama3_gguf_rope_freqs_give_the_hf_scaling_and_logits() {
    let hf = Model::load(&slm_model::testing::golden_dir().join("archs/llama3"), &Device::Cpu).unwrap();
    let slm_model::RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } =
        hf.spec.arch.rope.scaling
    else {
        panic!("the golden llama3 model has llama3 scaling")
    };
    let (theta, d) = (hf.spec.arch.rope.theta, hf.spec.layers[0].head_dim);
    let factors = llama_cpp_rope_factors(
        theta,
        d,
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings as f64,
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("llama3.gguf");
    write_gguf_with(&hf, &p, "llama", &[("rope_freqs.weight", factors.clone())]);
    let back = Model::load(&p, &Device::Cpu).unwrap();
    assert_eq!(back.spec.arch.rope, hf.spec.arch.rope);
    let ids = [1u32, 7, 300, 42, 5, 9, 77, 100];
    let d_logits = slm_model::testing::max_abs_diff(&hf.logits_all(&ids).unwrap(), &back.logits_all(&ids).unwrap());
    assert_eq!(d_logits, 0.0);

    let mut bad = factors.to_vec1::<f32>().unwrap();
    bad[1] = 30.0;
    let p2 = dir.path().join("odd.gguf");
    write_gguf_with(&hf, &p2, "llama", &[("rope_freqs.weight", Tensor::new(bad, &Device::Cpu).unwrap())]);
    let e = err_of(Model::load(&p2, &Device::Cpu));
    assert!(e.contains("odd.gguf") && e.contains("rope_freqs.weight") && e.contains("not Llama-3.1"), "{e}");
    let p3 = dir.path().join("short.gguf");
    write_gguf_with(&hf, &p3, "llama", &[("rope_freqs.weight", Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap())]);
    let e = err_of(Model::load(&p3, &Device::Cpu));
    assert!(e.contains("rope_freqs.weight") && e.contains("shape [2]"), "{e}");
}
