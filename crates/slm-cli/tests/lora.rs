//! `slm lora` end to end on the default model: adapter files, the merged model, and clear errors.

mod common;

use common::{run_err, run_ok, slm, ONE_STEP_TEXT, TEXT_PAIRS};

use slm_model::testing::default_model_path;

fn alpaca(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("alpaca.jsonl");
    let recs: Vec<String> = (0..6)
        .map(|i| {
            serde_json::json!({"instruction": format!("Add {i} and 2."), "input": if i % 2 == 0 { "" } else { "numbers" }, "output": format!("{}", i + 2)})
                .to_string()
        })
        .collect();
    std::fs::write(&p, recs.join("\n")).unwrap();
    p
}

#[test]
fn lora_writes_peft_adapter_and_merged_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    let stdout = run_ok(
        slm()
            .arg("lora")
            .arg(default_model_path())
            .arg("--data")
            .arg(alpaca(dir.path()))
            .arg("--out")
            .arg(&out)
            .args([
                "--max-steps",
                "1",
                "--batch-size",
                "2",
                "--micro-batch-size",
                "1",
                "--cutoff",
                "64",
                "--val-size",
                "2",
            ])
            .args(["--rank", "2", "--merge"]),
    );
    assert!(stdout.contains("steps:       1"), "{stdout}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 2);
    assert!(out.join("adapter_model.safetensors").is_file());
    let run = slm_lora::file::LoraRunFile::read(&out).unwrap();
    assert_eq!(run.report.steps, 1);
    assert_eq!(run.report.val_examples, 2);
    assert_eq!(run.lora.rank, 2);
    assert_eq!(run.objective, slm_lora::file::Objective::Lm);
    assert_eq!(run.trainable_parameters, 30 * 2 * (576 * 2 + (576 + 192) * 2 + 576 * 2 + (576 + 1536) * 3));
    let v: serde_json::Value =
        serde_json::from_str(&run_ok(slm().arg("inspect").arg(out.join("merged")).arg("--json"))).unwrap();
    assert_eq!(v["num_parameters"], 134_515_008u64);
    let plan_path = out.join("merged/slm_plan.json");
    let plan: serde_json::Value = serde_json::from_slice(&std::fs::read(&plan_path).unwrap()).unwrap();
    let typed = slm_lora::file::MergedPlanFile::from_json(plan, &plan_path).unwrap();
    assert_eq!(typed.lora, run, "the merged plan keeps the run as slm_lora.json records it");
    assert!(typed.base_plan.is_none(), "the base was a GGUF: no plan of its own");
}

#[test]
fn lora_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let model = default_model_path();
    let e = run_err(slm().arg("lora").arg(dir.path().join("no-such-model")).arg("--out").arg(&out));
    assert!(e.contains("no-such-model") && e.contains("does not exist"), "{e}");
    let e = run_err(slm().arg("lora").arg(&model).arg("--out").arg(&out).args(["--rank", "0"]));
    assert!(e.contains("rank must be at least 1"), "{e}");
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    let e = run_err(slm().arg("lora").arg(&model).arg("--out").arg(&out).arg("--data").arg(&empty));
    assert!(e.contains("empty.json") && e.contains("empty"), "{e}");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"instruction\": \"x\", \"output\": \"y\"}\n{\"instruction\": \"x\"}\n").unwrap();
    let e = run_err(slm().arg("lora").arg(&model).arg("--out").arg(&out).arg("--data").arg(&bad));
    assert!(e.contains("bad.jsonl") && e.contains("line 2") && e.contains("`output`"), "{e}");
    let e =
        run_err(slm().arg("lora").arg(&model).arg("--out").arg(&out).arg("--data").arg(dir.path().join("nope.jsonl")));
    assert!(e.contains("nope.jsonl") && e.contains("does not exist"), "{e}");
    let e = run_err(
        slm().arg("lora").arg(&model).arg("--out").arg(&out).arg("--data").arg(alpaca(dir.path())).arg("--distill"),
    );
    assert!(e.contains("--teacher"), "{e}");
}

/// A text corpus of a few dozen short windows (at --cutoff 32).
fn corpus(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("corpus.jsonl");
    let recs: Vec<String> = (0..24)
        .map(|i| {
            let text = format!(
                "Record {i}: the river rose {} feet in the night, and the town moved its boats up the hill before the \
                 morning bell rang {} times.",
                i % 7 + 2,
                i % 5 + 3
            );
            serde_json::json!({ "text": text }).to_string()
        })
        .collect();
    std::fs::write(&p, recs.join("\n")).unwrap();
    p
}

fn short_run(cmd: &mut std::process::Command, data: &std::path::Path, out: &std::path::Path, lr: &str) {
    cmd.arg("lora").arg(default_model_path()).arg("--data").arg(data).arg("--out").arg(out).args(TEXT_PAIRS).args([
        "--max-steps",
        "14",
        "--warmup-steps",
        "2",
        "--val-size",
        "2",
        "--eval-steps",
        "4",
        "--save-steps",
        "1",
        "--rank",
        "2",
        "--lr",
        lr,
    ]);
}

/// Starts `cmd` and kills it (SIGKILL) once its checkpoint has reached `step`.
fn kill_at_checkpoint(cmd: &mut std::process::Command, out: &std::path::Path, step: u64) {
    let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let state = out.join("checkpoint/state.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let at = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["step"].as_u64());
        if at.is_some_and(|s| s >= step) {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its checkpoint at step {step}");
        assert!(std::time::Instant::now() < deadline, "no checkpoint at step {step} in 600 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn lora_resumed_after_kill_9_gives_the_uninterrupted_adapter_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let mut c = slm();
    short_run(&mut c, &data, &a, "1e-3");
    run_ok(&mut c);
    assert!(!a.join("checkpoint").exists(), "a completed run removes its checkpoint");
    let mut c = slm();
    short_run(&mut c, &data, &b, "1e-3");
    kill_at_checkpoint(&mut c, &b, 3);
    assert!(!b.join("adapter_model.safetensors").exists(), "killed before the end: no adapter yet");
    // Resuming with other settings is refused, naming the setting; the checkpoint stays.
    let mut c = slm();
    short_run(&mut c, &data, &b, "5e-4");
    let e = run_err(c.arg("--resume"));
    assert!(e.contains("another run") && e.contains("lr") && e.contains("state.json"), "{e}");
    let mut c = slm();
    short_run(&mut c, &data, &b, "1e-3");
    run_ok(c.arg("--resume"));
    let (fa, fb) = (
        std::fs::read(a.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(b.join("adapter_model.safetensors")).unwrap(),
    );
    assert!(fa == fb, "the resumed run's adapter differs from the uninterrupted run's");
    let losses = |d: &std::path::Path| {
        let r = slm_lora::file::LoraRunFile::read(d).unwrap();
        r.report.history.iter().map(|h| (h.step, h.loss.to_bits(), h.val_loss.map(f64::to_bits))).collect::<Vec<_>>()
    };
    assert_eq!(losses(&a), losses(&b));
}

#[test]
fn lora_train_layers_writes_the_tuned_model_and_refuses_bad_choices() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("ft");
    let stdout = run_ok(
        slm()
            .arg("lora")
            .arg(default_model_path())
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args(TEXT_PAIRS)
            .args(ONE_STEP_TEXT)
            .args(["--train", "layers", "--layers", "last:1", "--lr", "1e-4", "--warmup-steps", "0"]),
    );
    assert!(stdout.contains("layers [29]"), "{stdout}");
    assert!(!out.join("adapter_model.safetensors").exists(), "full tuning writes the model, not an adapter");
    let run = slm_lora::file::LoraRunFile::read(&out).unwrap();
    let trained = run.trained.unwrap();
    assert_eq!((trained.kind.as_str(), trained.layers, trained.head), ("layers", vec![29], false));
    let base = slm_model::Model::load(&default_model_path(), &candle_core::Device::Cpu).unwrap();
    let tuned = slm_model::Model::load(&out.join("merged"), &candle_core::Device::Cpu).unwrap();
    let diff = |i: usize| {
        let (x, y) = (base.weights.layer(i).unwrap(), tuned.weights.layer(i).unwrap());
        slm_model::testing::max_abs_diff(&x.q_proj, &y.q_proj)
    };
    assert_eq!(diff(0), 0.0, "a frozen layer is written unchanged");
    assert!(diff(29) > 0.0, "the tuned layer changed");

    let model = default_model_path();
    let base_cmd = |extra: &[&str]| {
        let mut c = slm();
        c.arg("lora").arg(&model).arg("--data").arg(&data).arg("--out").arg(dir.path().join("x")).args(extra);
        c
    };
    let e = run_err(&mut base_cmd(&["--train", "layers", "--layers", "30"]));
    assert!(e.contains("--layers `30`") && e.contains("0-29"), "{e}");
    let e = run_err(&mut base_cmd(&["--train", "layers", "--layers", "cuts"]));
    assert!(e.contains("--layers cuts") && e.contains("no depth plan"), "{e}");
    let e = run_err(&mut base_cmd(&["--train-head"]));
    assert!(e.contains("--train layers"), "{e}");
    let e = run_err(&mut base_cmd(&["--objective", "lm=1,rl=2"]));
    assert!(e.contains("unknown term `rl`"), "{e}");
    let e = run_err(base_cmd(&["--objective", "kl", "--distill", "--teacher"]).arg(&model));
    assert!(e.contains("--distill is --objective kl"), "{e}");

    // A teacher with the same vocabulary size but another tokenizer (two tokens' ids swapped).
    let teacher = dir.path().join("teacher");
    base.save(&teacher, slm_model::StorageDType::BF16, &[]).unwrap();
    let tok_path = teacher.join("tokenizer.json");
    let mut tok: serde_json::Value = serde_json::from_slice(&std::fs::read(&tok_path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let (x, y) = (vocab["the"].clone(), vocab["Ġthe"].clone());
    vocab.insert("the".into(), y);
    vocab.insert("Ġthe".into(), x);
    std::fs::write(&tok_path, serde_json::to_vec(&tok).unwrap()).unwrap();
    let e = run_err(base_cmd(&["--objective", "kl", "--teacher"]).arg(&teacher));
    assert!(e.contains("--teacher") && e.contains("tokenizer differs"), "{e}");
}
