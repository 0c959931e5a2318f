//! `slm inspect MODEL [--json]`.

use std::path::PathBuf;

use serde_json::{json, Value};
use slm_model::{Model, ModelSpec};

use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF directory or a .gguf file.
    pub model: PathBuf,
    /// Print JSON with HF config key names instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The JSON view: HF config fields, per-layer shapes with parameter counts, and the total.
pub fn inspect_json(spec: &ModelSpec) -> Value {
    let mut v = spec.to_hf_config("float32");
    let obj = v.as_object_mut().expect("config is an object");
    obj.remove("slm_layers");
    obj.remove("torch_dtype");
    let layers: Vec<Value> = spec
        .layers
        .iter()
        .map(|l| {
            json!({
                "num_attention_heads": l.num_attention_heads,
                "num_key_value_heads": l.num_key_value_heads,
                "head_dim": l.head_dim,
                "intermediate_size": l.intermediate_size,
                "attention": if l.sliding { "sliding" } else { "global" },
                "num_parameters": spec.layer_parameters(l),
            })
        })
        .collect();
    obj.insert("layers".into(), Value::Array(layers));
    obj.insert("num_parameters".into(), json!(spec.num_parameters()));
    v
}

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    // The spec alone (config or GGUF header): inspecting a 13B model reads no weights.
    let _ = common.device()?;
    let spec = Model::load_spec(&args.model)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&inspect_json(&spec))?);
        return Ok(());
    }
    let s = &spec;
    println!("model:        {}", args.model.display());
    println!("vocab_size:   {}", s.vocab_size);
    println!("hidden_size:  {}", s.hidden_size);
    println!("layers:       {}", s.num_layers());
    println!("family:       {} ({})", s.arch.family.model_type(), s.arch.family.architecture());
    println!("rope_theta:   {} (scaling: {:?})", s.arch.rope.theta, s.arch.rope.scaling);
    if let (Some(w), Some(local)) = (s.arch.sliding_window, s.arch.local_rope) {
        println!("sliding:      window {w}, rope_theta {}", local.theta);
    } else if let Some(w) = s.arch.sliding_window {
        println!("sliding:      window {w}");
    }
    let a = &s.arch;
    let features: Vec<&str> = [
        (a.qkv_bias, "q/k/v biases"),
        (a.qk_norm, "q/k norms"),
        (a.norm_plus_one, "(1 + w) norms"),
        (a.sandwich_norms, "norms after attention and MLP"),
        (a.embed_scale, "embeddings × √hidden"),
        (a.activation == slm_model::Activation::GeluTanh, "GeGLU (gelu_pytorch_tanh)"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    if !features.is_empty() {
        println!("features:     {}", features.join(", "));
    }
    println!("rms_norm_eps: {:e}", s.rms_norm_eps);
    println!("tied lm_head: {}", s.tie_word_embeddings);
    println!("parameters:   {} ({:.1} M)", s.num_parameters(), s.num_parameters() as f64 / 1e6);
    println!();
    println!(
        "{:>5} {:>6} {:>8} {:>8} {:>12} {:>9} {:>12}",
        "layer", "heads", "kv_heads", "head_dim", "intermediate", "attention", "params"
    );
    for (i, l) in s.layers.iter().enumerate() {
        println!(
            "{:>5} {:>6} {:>8} {:>8} {:>12} {:>9} {:>12}",
            i,
            l.num_attention_heads,
            l.num_key_value_heads,
            l.head_dim,
            l.intermediate_size,
            if l.sliding { "sliding" } else { "global" },
            s.layer_parameters(l)
        );
    }
    Ok(())
}
