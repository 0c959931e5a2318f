//! LoRA end to end on the tiny random model (and the default model's tokenizer for the Alpaca mask).

use candle_core::{Device, Tensor};
use slm_lora::data::{alpaca_example, load_examples, Format, Instruction};
use slm_lora::train::{mean_loss, token_losses};
use slm_lora::{Distill, Example, Lora, LoraConfig, TrainConfig};
use slm_model::testing::{default_model_path, max_abs_diff, tiny_model};
use slm_model::{Mode, Model, PROJECTIONS};

fn random_b(lora: &Lora, seed: u64) {
    for (k, p) in (seed + 1..).zip(lora.layers.iter().flatten()) {
        let t = Tensor::randn(0f32, 0.5, p.b.dims(), &Device::Cpu).unwrap();
        // Deterministic values regardless of candle's RNG: a seeded pattern.
        let pattern: Vec<f32> = (0..t.elem_count())
            .map(|i| (((i as u64 * 7919 + k * 104729) % 1000) as f32 / 1000.0 - 0.5) * 0.4)
            .collect();
        p.b.set(&Tensor::from_vec(pattern, p.b.dims(), &Device::Cpu).unwrap()).unwrap();
    }
}

fn text_examples(n: usize, len: usize, seed: u64) -> Vec<Example> {
    // A learnable pattern: each sequence counts up from a seeded start (mod the vocab).
    (0..n)
        .map(|i| {
            let start = (i as u64 * 13 + seed) % 60;
            let ids = (0..len).map(|p| ((start + 3 * p as u64) % 60 + 3) as u32).collect();
            Example { ids, target: (0..len).map(|p| p > 0).collect() }
        })
        .collect()
}

fn logits_with(model: &Model, hook: &dyn slm_model::LayerAdapter, seqs: &[Vec<u32>]) -> Tensor {
    let batch = slm_model::Batch::new(&model.spec, seqs, &model.device).unwrap();
    let pos: Vec<Vec<usize>> = seqs.iter().map(|s| (0..s.len()).collect()).collect();
    model.forward_batch_adapted(&batch, &pos, false, Mode::Inference, hook).unwrap().logits.unwrap()
}

fn seqs() -> Vec<Vec<u32>> {
    vec![(0..17).map(|i| (i * 5 + 3) % 64).collect(), (0..9).map(|i| (i * 11 + 1) % 64).collect()]
}

#[test]
fn zero_b_gives_exactly_the_base_model() {
    let model = tiny_model(3, 1);
    let lora = Lora::new(&model.spec, LoraConfig::default(), 7, &Device::Cpu).unwrap();
    let pos: Vec<Vec<usize>> = seqs().iter().map(|s| (0..s.len()).collect()).collect();
    let base = model.forward(&seqs(), &pos, false, Mode::Inference).unwrap().logits.unwrap();
    let adapted = logits_with(&model, &lora.eval_hook(), &seqs());
    assert_eq!(max_abs_diff(&base, &adapted), 0.0);
    // The no-op hook is the plain forward pass, bit for bit.
    let noop = logits_with(&model, &slm_model::NoAdapter, &seqs());
    assert_eq!(max_abs_diff(&base, &noop), 0.0);
}

#[test]
fn merged_weights_give_the_unmerged_logits() {
    let model = tiny_model(3, 2);
    let lora = Lora::new(&model.spec, LoraConfig::default(), 3, &Device::Cpu).unwrap();
    random_b(&lora, 5);
    let unmerged = logits_with(&model, &lora.eval_hook(), &seqs());
    let merged = lora.merge(&model).unwrap();
    let pos: Vec<Vec<usize>> = seqs().iter().map(|s| (0..s.len()).collect()).collect();
    let m = merged.forward(&seqs(), &pos, false, Mode::Inference).unwrap().logits.unwrap();
    let base = model.forward(&seqs(), &pos, false, Mode::Inference).unwrap().logits.unwrap();
    assert!(max_abs_diff(&base, &m) > 1e-2, "the adapter must change the model for this test to mean anything");
    let d = max_abs_diff(&unmerged, &m);
    assert!(d <= 1e-4, "merged vs unmerged: {d}");
}

#[test]
fn adapter_shapes_follow_each_layers_width() {
    let mut model = tiny_model(2, 3);
    model.spec.layers[1].intermediate_size = 20;
    model.spec.layers[1].num_attention_heads = 2;
    model.spec.layers[1].num_key_value_heads = 1;
    let lora = Lora::new(&model.spec, LoraConfig { rank: 4, ..LoraConfig::default() }, 1, &Device::Cpu).unwrap();
    let dims = |l: usize, p: &str| {
        let pair = lora.pair(l, p).unwrap();
        (pair.a.dims().to_vec(), pair.b.dims().to_vec())
    };
    assert_eq!(dims(0, "q_proj"), (vec![4, 32], vec![32, 4]));
    assert_eq!(dims(1, "q_proj"), (vec![4, 32], vec![16, 4]));
    assert_eq!(dims(1, "k_proj"), (vec![4, 32], vec![8, 4]));
    assert_eq!(dims(1, "o_proj"), (vec![4, 16], vec![32, 4]));
    assert_eq!(dims(1, "gate_proj"), (vec![4, 32], vec![20, 4]));
    assert_eq!(dims(1, "down_proj"), (vec![4, 20], vec![32, 4]));
    // A is Kaiming-uniform with a = √5: U(-1/√in, 1/√in); B is zero.
    let a = lora.pair(1, "down_proj").unwrap().a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bound = 1.0 / (20f32).sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| v.abs() > bound * 0.5));
    let layer0 = 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 48) + (32 + 48) + (48 + 32));
    assert_eq!(lora.num_parameters(), layer0 + lora_params_layer1());
}

fn lora_params_layer1() -> usize {
    // Layer 1: q 32→16, k 32→8, v 32→8, o 16→32, gate 32→20, up 32→20, down 20→32; r = 4.
    4 * ((32 + 16) + (32 + 8) + (32 + 8) + (16 + 32) + (32 + 20) + (32 + 20) + (20 + 32))
}

fn cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        lr: 1e-2,
        epochs: 100,
        batch_size: 4,
        micro_batch_size: 2,
        warmup_steps: 2,
        eval_steps: 5,
        max_steps: Some(steps),
        seed: 9,
        ..TrainConfig::default()
    }
}

#[test]
fn a_few_steps_lower_the_training_loss() {
    let model = tiny_model(2, 4);
    let lora = Lora::new(&model.spec, LoraConfig::default(), 1, &Device::Cpu).unwrap();
    let data = text_examples(8, 24, 1);
    let before = mean_loss(&model, &lora, &data, None).unwrap();
    let report = slm_lora::train(&model, &lora, &data, &[], &cfg(15), None, None, &mut |_| {}).unwrap();
    let after = mean_loss(&model, &lora, &data, None).unwrap();
    assert_eq!(report.steps, 15);
    assert!(after < before - 0.05, "loss {before} -> {after}");
    let first = report.history[0].loss;
    let last = report.history.last().unwrap().loss;
    assert!(last < first, "training loss {first} -> {last}");
}

#[test]
fn every_a_and_b_receives_a_gradient() {
    let model = tiny_model(3, 5);
    let lora = Lora::new(&model.spec, LoraConfig::default(), 2, &Device::Cpu).unwrap();
    let data = text_examples(4, 16, 2);
    let nonzero = |g: Option<&Tensor>| g.map(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    // Step 0: B = 0, so every B has a gradient and every A a (zero) one.
    let grads = token_losses(&model, &lora, &data, true, 1).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, pairs) in lora.layers.iter().enumerate() {
        for (k, p) in pairs.iter().enumerate() {
            assert_eq!(nonzero(grads.get(p.b.as_tensor())), Some(true), "B of layer {i} {}", PROJECTIONS[k]);
            assert!(grads.get(p.a.as_tensor()).is_some(), "A of layer {i} {}", PROJECTIONS[k]);
        }
    }
    // After one optimiser step B ≠ 0, and every A gets a non-zero gradient too.
    slm_lora::train(&model, &lora, &data, &[], &TrainConfig { warmup_steps: 0, ..cfg(1) }, None, None, &mut |_| {})
        .unwrap();
    let grads = token_losses(&model, &lora, &data, true, 1).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, pairs) in lora.layers.iter().enumerate() {
        for (k, p) in pairs.iter().enumerate() {
            assert_eq!(nonzero(grads.get(p.a.as_tensor())), Some(true), "A of layer {i} {}", PROJECTIONS[k]);
            assert_eq!(nonzero(grads.get(p.b.as_tensor())), Some(true), "B of layer {i} {}", PROJECTIONS[k]);
        }
    }
}

fn snapshot(lora: &Lora) -> Vec<Vec<f32>> {
    lora.named_tensors().unwrap().into_iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

#[test]
fn same_seed_gives_bit_identical_adapters() {
    let model = tiny_model(2, 6);
    let data = text_examples(12, 20, 3);
    let (train, val) = slm_lora::train::split_validation(data, 2, 5).unwrap();
    let run = |seed: u64| {
        let lora =
            Lora::new(&model.spec, LoraConfig { dropout: 0.1, ..LoraConfig::default() }, seed, &Device::Cpu).unwrap();
        slm_lora::train(&model, &lora, &train, &val, &TrainConfig { seed, ..cfg(6) }, None, None, &mut |_| {}).unwrap();
        snapshot(&lora)
    };
    let (a, b, c) = (run(11), run(11), run(12));
    assert!(a == b, "same seed, different adapters");
    assert!(a != c, "different seeds, same adapters");
}

#[test]
fn best_checkpoint_by_validation_loss_is_restored() {
    let model = tiny_model(2, 8);
    let data = text_examples(10, 20, 4);
    let (train, val) = slm_lora::train::split_validation(data, 2, 1).unwrap();
    let lora = Lora::new(&model.spec, LoraConfig::default(), 1, &Device::Cpu).unwrap();
    let c = TrainConfig { eval_steps: 2, ..cfg(8) };
    let report = slm_lora::train(&model, &lora, &train, &val, &c, None, None, &mut |_| {}).unwrap();
    let evals: Vec<(usize, f64)> = report.history.iter().filter_map(|s| s.val_loss.map(|v| (s.step, v))).collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 4, 6, 8]);
    let best = evals.iter().cloned().fold((0, f64::INFINITY), |b, e| if e.1 < b.1 { e } else { b });
    assert_eq!(report.best_step, Some(best.0));
    let (now, _) = slm_lora::train::evaluate(&model, &lora, &val, None, 4).unwrap();
    assert!((now - best.1).abs() < 1e-6, "restored adapters give {now}, best was {}", best.1);
}

#[test]
fn distillation_lowers_the_kl_to_the_teacher() {
    let teacher = tiny_model(3, 10);
    // The student: the teacher without its middle layer.
    let mut student = teacher.clone();
    student.spec.layers.remove(1);
    student.weights.layers.remove(1);
    let data = text_examples(8, 20, 5);
    let lora = Lora::new(&student.spec, LoraConfig::default(), 1, &Device::Cpu).unwrap();
    let d = Distill::kl(&teacher, 2.0);
    let before = mean_loss(&student, &lora, &data, Some(&d)).unwrap();
    slm_lora::train(&student, &lora, &data, &[], &cfg(10), Some(&d), None, &mut |_| {}).unwrap();
    let after = mean_loss(&student, &lora, &data, Some(&d)).unwrap();
    assert!(before > 0.0 && after < before * 0.9, "KL {before} -> {after}");
}

#[test]
fn adapters_round_trip_exactly_through_peft_files() {
    let model = tiny_model(2, 11);
    let cfg = LoraConfig { rank: 3, alpha: 12.0, dropout: 0.1 };
    let lora = Lora::new(&model.spec, cfg.clone(), 4, &Device::Cpu).unwrap();
    random_b(&lora, 9);
    let dir = tempfile::tempdir().unwrap();
    lora.save(dir.path(), "base-model").unwrap();
    let back = Lora::load(dir.path(), &model.spec, &Device::Cpu).unwrap();
    assert_eq!(back.config, cfg);
    assert!(snapshot(&lora) == snapshot(&back));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 3);
    assert_eq!(json["lora_alpha"], 12.0);
    assert_eq!(json["bias"], "none");
    assert_eq!(json["base_model_name_or_path"], "base-model");
    assert_eq!(json["target_modules"].as_array().unwrap().len(), 7);
    let st = slm_model::hf::read_safetensors(&dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(st.len(), 2 * 7 * 2);
    assert_eq!(st["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].dims(), &[3, 32]);
    assert_eq!(st["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].dims(), &[32, 3]);
    assert_eq!(st["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].dims(), &[3, 48]);
    // An adapter for another shape is refused with the tensor named.
    let other = tiny_model(3, 1);
    let e = Lora::load(dir.path(), &other.spec, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("adapter_model.safetensors") && e.contains("layers.2"), "{e}");
}

#[test]
fn response_only_mask_matches_a_hand_built_example_and_scores_no_prompt_token() {
    let model = Model::load(&default_model_path(), &Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    let r = Instruction { instruction: "Name a colour.".into(), input: String::new(), output: "Blue.".into() };
    let eos = model.spec.eos_token_id;
    let ex = alpaca_example(&r, tok, eos, 256).unwrap();
    let prompt = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n";
    let n_prompt = tok.encode(prompt).unwrap().len();
    let mut ids = tok.encode(&format!("{prompt}Blue.")).unwrap();
    ids.push(eos.unwrap());
    assert_eq!(ex.ids, ids);
    let target: Vec<bool> = (0..ids.len()).map(|p| p >= n_prompt).collect();
    assert_eq!(ex.target, target);
    assert_eq!(ex.num_targets(), ids.len() - n_prompt);
    // With an input, the other template.
    let r2 = Instruction { input: "x".into(), ..r.clone() };
    assert!(r2.prompt().contains("### Input:\nx\n\n### Response:\n"));

    // The loss is the mean cross-entropy over response tokens only.
    let lora = Lora::new(&model.spec, LoraConfig::default(), 1, &Device::Cpu).unwrap();
    let losses = token_losses(&model, &lora, std::slice::from_ref(&ex), false, 0).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(losses.len(), ids.len() - n_prompt);
    let logits = model.logits_all(&ids).unwrap();
    let logp = candle_nn_free_log_softmax(&logits);
    for (j, p) in (n_prompt - 1..ids.len() - 1).enumerate() {
        let want = -logp[p][ids[p + 1] as usize];
        assert!((losses[j] - want).abs() < 1e-3, "position {p}: {} vs {want}", losses[j]);
    }
    // Truncation at the cutoff drops EOS; a cutoff inside the prompt scores nothing.
    let short = alpaca_example(&r, tok, eos, n_prompt - 2).unwrap();
    assert_eq!(short.num_targets(), 0);
}

fn candle_nn_free_log_softmax(logits: &Tensor) -> Vec<Vec<f32>> {
    logits
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|row| {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + row.iter().map(|v| ((v - m) as f64).exp()).sum::<f64>().ln() as f32;
            row.iter().map(|v| v - lse).collect()
        })
        .collect()
}

#[test]
fn bad_input_is_a_clear_error() {
    let model = Model::load(&default_model_path(), &Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, s: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, s).unwrap();
        p
    };
    let empty = write("empty.jsonl", "\n");
    let e = load_examples(&empty, Format::Auto, tok, None, 64).unwrap_err().to_string();
    assert!(e.contains("empty.jsonl") && e.contains("empty"), "{e}");
    let bad = write("bad.json", r#"[{"instruction": "a", "output": "b"}, {"instruction": "c", "input": ""}]"#);
    let e = load_examples(&bad, Format::Auto, tok, None, 64).unwrap_err().to_string();
    assert!(e.contains("bad.json") && e.contains("record 2") && e.contains("`output`"), "{e}");
    let short = write("short.jsonl", "{\"text\": \"a few words\"}\n");
    let e = load_examples(&short, Format::Auto, tok, None, 64).unwrap_err().to_string();
    assert!(e.contains("short.jsonl") && e.contains("no training example"), "{e}");
    let e = Lora::new(&model.spec, LoraConfig { rank: 0, ..LoraConfig::default() }, 1, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank must be at least 1"), "{e}");
    let e = TrainConfig { batch_size: 6, micro_batch_size: 4, ..TrainConfig::default() }
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of the micro-batch size"), "{e}");
    let e = Lora::load(dir.path(), &model.spec, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
}

#[test]
fn text_windows_and_lr_schedule() {
    let c = TrainConfig { lr: 1.0, warmup_steps: 4, ..TrainConfig::default() };
    // HF's get_linear_schedule_with_warmup over 10 steps.
    let lrs: Vec<f64> = (0..10).map(|s| c.lr_at(s, 10)).collect();
    let want = [0.0, 0.25, 0.5, 0.75, 1.0, 5.0 / 6.0, 4.0 / 6.0, 0.5, 2.0 / 6.0, 1.0 / 6.0];
    for (a, b) in lrs.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{lrs:?}");
    }
    assert_eq!(c.total_steps(130), 6);
    assert_eq!(TrainConfig { max_steps: Some(3), ..c }.total_steps(130), 3);
}
