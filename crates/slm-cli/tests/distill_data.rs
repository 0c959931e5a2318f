//! `slm distill-data` on the default model: a deterministic file for a seed whatever the batch size, reused when
//! the settings match, refused when they differ, and read by `slm lora` as completions (loss on the completion).

mod common;

use common::{run_err, run_ok, slm};
use slm_model::testing::default_model_path;

fn make(out: &std::path::Path, batch: &str, extra: &[&str]) -> std::process::Command {
    let mut c = slm();
    c.arg("distill-data").arg(default_model_path()).arg("--out").arg(out).args([
        "--count",
        "5",
        "--prompt-tokens",
        "12",
        "--new-tokens",
        "10",
    ]);
    if !batch.is_empty() {
        c.args(["--batch-size", batch]);
    }
    c.args(extra);
    c
}

#[test]
fn distillation_data_is_deterministic_reused_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    run_ok(&mut make(&a, "5", &[]));
    run_ok(&mut make(&b, "2", &[]));
    let bytes = std::fs::read(&a).unwrap();
    assert!(bytes == std::fs::read(&b).unwrap(), "the batch size changed the data");
    // The default batch size (all 5 prompts in one pass here) too.
    let auto = dir.path().join("auto.jsonl");
    run_ok(&mut make(&auto, "", &[]));
    assert!(bytes == std::fs::read(&auto).unwrap(), "the automatic batch size changed the data");
    let lines: Vec<serde_json::Value> =
        String::from_utf8(bytes.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6, "a settings line and 5 records");
    assert_eq!(lines[0]["slm_distill_data"]["new_tokens"], 10);
    let model = slm_model::Model::load(&default_model_path(), &candle_core::Device::Cpu).unwrap();
    for r in &lines[1..] {
        let p: Vec<u32> = serde_json::from_value(r["prompt_ids"].clone()).unwrap();
        let c: Vec<u32> = serde_json::from_value(r["completion_ids"].clone()).unwrap();
        assert_eq!(p.len(), 12);
        assert!(!c.is_empty() && c.len() <= 10);
        // Greedy: the first completion token is the model's argmax after the prompt.
        let logits = model
            .forward(std::slice::from_ref(&p), &[vec![11]], false, slm_model::Mode::Inference)
            .unwrap()
            .logits
            .unwrap();
        assert_eq!(logits.get(0).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap(), c[0]);
    }
    // The same settings: reused, untouched. Other settings: refused without --force.
    let out = run_ok(&mut make(&a, "3", &[]));
    assert!(out.contains("reusing"), "{out}");
    let e = run_err(&mut make(&a, "3", &["--seed", "7"]));
    assert!(e.contains("other settings") && e.contains("--force"), "{e}");
    assert!(std::fs::read(&a).unwrap() == bytes);
    // Sampling at a temperature is seeded too.
    let (s1, s2) = (dir.path().join("s1.jsonl"), dir.path().join("s2.jsonl"));
    run_ok(&mut make(&s1, "5", &["--temperature", "1.0"]));
    run_ok(&mut make(&s2, "4", &["--temperature", "1.0"]));
    assert!(std::fs::read(&s1).unwrap() == std::fs::read(&s2).unwrap());
    assert!(std::fs::read(&s1).unwrap() != bytes, "sampling gives other continuations than greedy");
    // An output that is an input is refused.
    let e = run_err(slm().arg("distill-data").arg(default_model_path()).arg("--out").arg(default_model_path()));
    assert!(e.contains("--out") && e.contains("is the input"), "{e}");

    // `slm lora` reads it as completions.
    let lo = dir.path().join("lora");
    let stdout =
        run_ok(slm().arg("lora").arg(default_model_path()).arg("--data").arg(&a).arg("--out").arg(&lo).args([
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--micro-batch-size",
            "1",
            "--val-size",
            "1",
            "--rank",
            "2",
        ]));
    assert!(stdout.contains("4 train / 1 validation"), "{stdout}");
    let run = slm_lora::file::LoraRunFile::read(&lo).unwrap();
    assert_eq!(run.format, slm_lora::Format::Auto);
    // Only completion tokens are scored: 4 training records, at most 10 scored tokens each.
    let tokens = run.report.tokens;
    assert!(tokens > 0 && tokens <= 2 * 22, "{tokens}");

    // A record with a token outside the vocabulary is a clear error naming the file and line.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"completion\": \"b\", \"prompt_ids\": [1], \"completion_ids\": [99999999]}\n",
    )
    .unwrap();
    let e = run_err(
        slm().arg("lora").arg(default_model_path()).arg("--data").arg(&bad).arg("--out").arg(dir.path().join("x")),
    );
    assert!(
        e.contains("bad.jsonl") && e.contains("record 1") && e.contains("99999999") && e.contains("vocabulary"),
        "{e}"
    );
}
