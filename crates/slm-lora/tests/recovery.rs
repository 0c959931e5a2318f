//! Recovery training beyond LoRA on the tiny random model: full tuning of chosen layers and the head, the
//! distillation objectives (KL, hidden-state matching, a mix) against finite differences, the layer map of a
//! depth plan, checkpoints that resume bit for bit, and clear errors.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use slm_lora::train::{hidden_map_from_kept, micro_batch_gradients, ObjectiveWeights};
use slm_lora::{Checkpoints, Distill, Example, FullTune, Lora, LoraConfig, TrainConfig, Trainable};
use slm_model::testing::tiny_model;
use slm_model::Model;

fn text_examples(n: usize, len: usize, seed: u64) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let start = (i as u64 * 13 + seed) % 60;
            let ids = (0..len).map(|p| ((start + 3 * p as u64 + (p as u64 * p as u64) % 7) % 60 + 3) as u32).collect();
            Example { ids, target: (0..len).map(|p| p > 0).collect() }
        })
        .collect()
}

/// The tiny model with a tied LM head (the embedding matrix serves both), as SmolLM2 has.
fn tied(mut m: Model) -> Model {
    m.weights.lm_head = None;
    m.spec.tie_word_embeddings = true;
    m
}

fn loss_of(base: &Model, t: &dyn Trainable, ex: &[Example], d: Option<&Distill>) -> f64 {
    micro_batch_gradients(base, t, ex, d, false, 1).unwrap().0
}

/// Central differences of the loss at the largest-gradient entry of each of `vars[k]` for k in `which`, against
/// the analytic gradient `grads[k]`.
fn check_fd(base: &Model, t: &dyn Trainable, ex: &[Example], d: Option<&Distill>, grads: &[Tensor], which: &[usize]) {
    let vars = t.vars();
    for &k in which {
        let v: &Var = vars[k];
        let g = grads[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (e, &ge) = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
        assert!(ge.abs() > 1e-4, "tensor {k}: gradient too small to check ({ge})");
        let orig = v.as_tensor().copy().unwrap();
        let flat = orig.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let h = 1e-2f32;
        let at = |delta: f32| {
            let mut p = flat.clone();
            p[e] += delta;
            v.set(&Tensor::from_vec(p, orig.dims(), &Device::Cpu).unwrap()).unwrap();
            loss_of(base, t, ex, d)
        };
        let fd = (at(h) - at(-h)) / (2.0 * h as f64);
        v.set(&orig).unwrap();
        let rel = (fd - ge as f64).abs() / (ge.abs() as f64);
        assert!(rel < 0.03, "tensor {k}: finite difference {fd} against the gradient {ge} (relative {rel})");
    }
}

#[test]
fn full_tuning_gradients_match_finite_differences_and_checkpointing() {
    let base = tied(tiny_model(3, 21));
    let ex = text_examples(3, 12, 4);
    let ft = FullTune::new(&base, &[1], true).unwrap();
    let names = ft.names().iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Every tensor of layer 1 (projections and norms), the final norm and the tied embedding.
    assert!(names.iter().any(|n| n == "model.layers.1.self_attn.q_proj.weight"));
    assert!(names.iter().any(|n| n == "model.layers.1.input_layernorm.weight"));
    assert!(names.iter().any(|n| n == "model.norm.weight") && names.iter().any(|n| n == "model.embed_tokens.weight"));
    assert!(!names.iter().any(|n| n.starts_with("model.layers.0.") || n.starts_with("model.layers.2.")));
    let (lw, gw) = micro_batch_gradients(&base, &ft, &ex, None, false, 1).unwrap();
    let (lc, gc) = micro_batch_gradients(&base, &ft, &ex, None, true, 1).unwrap();
    assert!((lw - lc).abs() <= 1e-6 * lw, "loss {lw} vs {lc}");
    for (k, (a, b)) in gc.iter().zip(&gw).enumerate() {
        let top = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let d = slm_model::testing::max_abs_diff(a, b);
        assert!(top > 0.0 && d <= 1e-5 * top, "{}: checkpointed differs by {d} of {top}", names[k]);
    }
    let pick = |n: &str| names.iter().position(|x| x == n).unwrap();
    let which = [
        pick("model.layers.1.self_attn.q_proj.weight"),
        pick("model.layers.1.mlp.down_proj.weight"),
        pick("model.layers.1.post_attention_layernorm.weight"),
        pick("model.norm.weight"),
        pick("model.embed_tokens.weight"),
    ];
    check_fd(&base, &ft, &ex, None, &gw, &which);
}

#[test]
fn distillation_objectives_match_finite_differences() {
    let teacher = tiny_model(4, 31);
    // A student that is the teacher with layer 2 removed: kept windows [0,0], [1,1], [3,3].
    let mut student = teacher.clone();
    student.weights.layers.remove(2);
    student.spec.layers.remove(2);
    let map = hidden_map_from_kept(&[(0, 0), (1, 1), (3, 3)]);
    assert_eq!(map, vec![Some(0), Some(1), Some(3)]);
    let ex = text_examples(2, 10, 9);
    let lora = Lora::new(&student.spec, LoraConfig { dropout: 0.0, ..LoraConfig::default() }, 5, &Device::Cpu).unwrap();
    for p in lora.layers.iter().flatten() {
        let n = p.b.elem_count();
        let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.3).collect();
        p.b.set(&Tensor::from_vec(v, p.b.dims(), &Device::Cpu).unwrap()).unwrap();
    }
    for w in [
        ObjectiveWeights { lm: 0.0, kl: 1.0, hidden: 0.0 },
        ObjectiveWeights { lm: 0.0, kl: 0.0, hidden: 1.0 },
        ObjectiveWeights { lm: 0.5, kl: 1.0, hidden: 2.0 },
    ] {
        let d = Distill { teacher: &teacher, temperature: 2.0, weights: w, hidden_map: map.clone() };
        d.check(&student).unwrap();
        let (lw, gw) = micro_batch_gradients(&student, &lora, &ex, Some(&d), false, 1).unwrap();
        let (lc, gc) = micro_batch_gradients(&student, &lora, &ex, Some(&d), true, 1).unwrap();
        assert!((lw - lc).abs() <= 1e-5 * lw.abs().max(1e-3), "{w:?}: loss {lw} vs checkpointed {lc}");
        for (a, b) in gc.iter().zip(&gw) {
            let top = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(slm_model::testing::max_abs_diff(a, b) <= 1e-5 * top.max(1e-6), "{w:?}: checkpointed gradients");
        }
        // The B matrices of layer 2's q_proj and down_proj and layer 0's up_proj (A, B alternate per projection).
        check_fd(&student, &lora, &ex, Some(&d), &gw, &[2 * (2 * 7) + 1, 2 * (2 * 7 + 6) + 1, 2 * 5 + 1]);
    }
}

#[test]
fn hidden_targets_are_the_dense_layers_each_kept_layer_stands_for() {
    // A merged window's layer stands for the window's last dense layer.
    assert_eq!(hidden_map_from_kept(&[(0, 0), (1, 3), (4, 4), (7, 9)]), vec![Some(0), Some(3), Some(4), Some(9)]);
    // A student that is the teacher's first layers exactly: every matched output equals its target, so the
    // hidden-state loss is 0 and so is its gradient (up to the rounding between the teacher's inference kernels
    // and the student's differentiable ones).
    let teacher = tiny_model(4, 41);
    let mut student = teacher.clone();
    student.weights.layers.truncate(2);
    student.spec.layers.truncate(2);
    let d = Distill {
        teacher: &teacher,
        temperature: 1.0,
        weights: ObjectiveWeights { lm: 0.0, kl: 0.0, hidden: 1.0 },
        hidden_map: hidden_map_from_kept(&[(0, 0), (1, 1)]),
    };
    let ft = FullTune::new(&student, &[0, 1], false).unwrap();
    let ex = text_examples(2, 9, 3);
    let (loss, grads) = micro_batch_gradients(&student, &ft, &ex, Some(&d), false, 1).unwrap();
    assert!(loss < 1e-10, "{loss}");
    assert!(grads.iter().all(|g| g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6));
    // Matched one layer off (student layer 1 against teacher layer 2), the loss is positive.
    let off = Distill { hidden_map: vec![Some(0), Some(2)], ..d };
    assert!(micro_batch_gradients(&student, &ft, &ex, Some(&off), false, 1).unwrap().0 > 1e-3);
}

fn cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        lr: 5e-3,
        epochs: 3,
        batch_size: 2,
        micro_batch_size: 1,
        warmup_steps: 2,
        eval_steps: 2,
        max_steps: Some(steps),
        seed: 7,
        ..TrainConfig::default()
    }
}

fn bits(t: &dyn Trainable) -> HashMap<String, Vec<u32>> {
    t.named_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, x)| (n, x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|f| f.to_bits()).collect()))
        .collect()
}

fn ckpt(dir: &std::path::Path, resume: bool, run: serde_json::Value) -> Checkpoints {
    Checkpoints { dir: dir.to_path_buf(), every: 2, resume, run }
}

#[test]
fn a_resumed_run_ends_bit_for_bit_where_the_uninterrupted_one_does() {
    let base = tied(tiny_model(3, 51));
    let data = text_examples(8, 10, 2);
    let (train, val) = slm_lora::train::split_validation(data, 2, 3).unwrap();
    let run = serde_json::json!({"test": 1});
    let lora_cfg = LoraConfig::default();
    assert!(lora_cfg.dropout > 0.0, "dropout on: the resumed run must continue its generator");
    let make: [&dyn Fn() -> Box<dyn Trainable>; 2] =
        [&|| Box::new(Lora::new(&base.spec, lora_cfg.clone(), 3, &Device::Cpu).unwrap()), &|| {
            Box::new(FullTune::new(&base, &[2], true).unwrap())
        }];
    for make in make {
        let dir = tempfile::tempdir().unwrap();
        // The uninterrupted run: 5 steps, checkpoints at 2 and 4 (the one at 4 is left in the directory).
        let a = make();
        let ra = slm_lora::train(
            &base,
            a.as_ref(),
            &train,
            &val,
            &cfg(5),
            None,
            Some(&ckpt(dir.path(), false, run.clone())),
            &mut |_| {},
        )
        .unwrap();
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).unwrap()).unwrap();
        assert_eq!(state["step"], 4);
        // A fresh process's view: new tensors, continued from step 4.
        let b = make();
        let mut seen = vec![];
        let rb = slm_lora::train(
            &base,
            b.as_ref(),
            &train,
            &val,
            &cfg(5),
            None,
            Some(&ckpt(dir.path(), true, run.clone())),
            &mut |s| seen.push(s.step),
        )
        .unwrap();
        assert_eq!(seen, vec![5], "{}: only the last step runs after the resume", a.kind());
        assert_eq!(bits(a.as_ref()), bits(b.as_ref()), "{}: resumed tensors differ", a.kind());
        let losses = |r: &slm_lora::TrainReport| r.history.iter().map(|h| h.loss.to_bits()).collect::<Vec<_>>();
        assert_eq!(losses(&ra), losses(&rb));
        assert_eq!(
            (ra.best_step, ra.best_val_loss.map(f64::to_bits)),
            (rb.best_step, rb.best_val_loss.map(f64::to_bits))
        );
        assert_eq!(ra.tokens, rb.tokens);
        // Another run's checkpoint is refused, naming what differs.
        let c = make();
        let other = TrainConfig { lr: 1e-3, ..cfg(5) };
        let e = slm_lora::train(
            &base,
            c.as_ref(),
            &train,
            &val,
            &other,
            None,
            Some(&ckpt(dir.path(), true, run.clone())),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("state.json") && e.contains("another run") && e.contains("`train.lr`"), "{e}");
        let e = slm_lora::train(
            &base,
            c.as_ref(),
            &train[1..],
            &val,
            &cfg(5),
            None,
            Some(&ckpt(dir.path(), true, run.clone())),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`train_data."), "{e}");
    }
}

#[test]
fn full_tuning_changes_only_the_chosen_tensors() {
    let base = tiny_model(3, 61);
    let before: HashMap<String, Tensor> = base.weights.named_tensors(&base.spec.arch).unwrap().into_iter().collect();
    let ft = FullTune::new(&base, &[1], false).unwrap();
    let data = text_examples(6, 10, 5);
    slm_lora::train(&base, &ft, &data, &[], &cfg(3), None, None, &mut |_| {}).unwrap();
    let merged = ft.merge(&base).unwrap();
    let after: HashMap<String, Tensor> = merged.weights.named_tensors(&merged.spec.arch).unwrap().into_iter().collect();
    assert_eq!(before.keys().collect::<std::collections::BTreeSet<_>>(), after.keys().collect());
    for (name, b) in &before {
        let d = slm_model::testing::max_abs_diff(b, &after[name]);
        if name.starts_with("model.layers.1.") {
            assert!(d > 0.0, "{name} is trained and did not change");
        } else {
            assert_eq!(d, 0.0, "{name} is frozen and changed");
        }
    }
    // The base model itself is untouched.
    for (name, t) in base.weights.named_tensors(&base.spec.arch).unwrap() {
        assert_eq!(slm_model::testing::max_abs_diff(&t, &before[&name]), 0.0, "{name} of the base changed");
    }
}

#[test]
fn bad_choices_are_clear_errors() {
    let base = tiny_model(3, 71);
    let e = FullTune::new(&base, &[3], false).err().unwrap().to_string();
    assert!(e.contains("--layers") && e.contains("layer 3 of a 3-layer model"), "{e}");
    let e = FullTune::new(&base, &[], false).err().unwrap().to_string();
    assert!(e.contains("nothing to train"), "{e}");
    let mut other = tiny_model(3, 72);
    other.spec.vocab_size = 65;
    let d = Distill::kl(&other, 1.0);
    assert!(d.check(&base).unwrap_err().to_string().contains("teacher vocabulary (65)"));
    let teacher = tiny_model(3, 73);
    let d = Distill {
        teacher: &teacher,
        temperature: 1.0,
        weights: ObjectiveWeights { lm: 0.0, kl: 0.0, hidden: 1.0 },
        hidden_map: vec![Some(0), Some(1), Some(5)],
    };
    assert!(d.check(&base).unwrap_err().to_string().contains("names teacher layer 5; the teacher has 3"));
    let d = Distill { hidden_map: vec![Some(0)], ..d };
    assert!(d.check(&base).unwrap_err().to_string().contains("covers 1 layers, the model has 3"));
}
