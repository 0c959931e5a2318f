//! `slm lora` end to end on the default model: adapter files, the merged model, and clear errors.

mod common;

use common::{run_err, run_ok, slm};

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
