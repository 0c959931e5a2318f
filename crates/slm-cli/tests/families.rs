//! Every command on a second real family: Gemma-3-270M (Q4_K_M GGUF from `scripts/setup.sh`: sentencepiece
//! tokenizer with `<bos>`, GeGLU, (1 + w) and sandwich norms, q/k norms, sliding and global layers, one KV head),
//! with small settings. The outputs are checked for what each command promises (the family kept in the saved
//! config, shapes, files), not for quality.

mod common;

use std::path::{Path, PathBuf};

use common::{run_ok, slm};

fn gemma() -> PathBuf {
    let p = slm_model::testing::workspace_root().join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(p.is_file(), "Gemma-3-270M not found at {}: run `scripts/setup.sh` first", p.display());
    p
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

const CALIB: [&str; 4] = ["--samples", "4", "--seq-len", "16"];

#[test]
fn every_command_runs_on_gemma3() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let inspect = run_ok(slm().arg("inspect").arg(gemma()));
    assert!(inspect.contains("gemma3_text") && inspect.contains("sliding") && inspect.contains("GeGLU"), "{inspect}");

    // Depth: ShortGPT removes two layers; slm-dp merges windows (sliding and global layers mixed).
    let short = d.join("short");
    run_ok(
        slm()
            .arg("depth")
            .arg(gemma())
            .arg("--out")
            .arg(&short)
            .args(["--method", "shortgpt", "--target-layers", "2"])
            .args(CALIB),
    );
    let cfg = config(&short);
    assert_eq!((cfg["model_type"].as_str(), cfg["num_hidden_layers"].as_u64()), (Some("gemma3_text"), Some(16)));
    assert_eq!(cfg["layer_types"].as_array().unwrap().len(), 16);
    let dp = d.join("dp");
    run_ok(slm().arg("depth").arg(gemma()).arg("--out").arg(&dp).args(["--target-layers", "3", "--samples", "4"]));
    assert_eq!(config(&dp)["num_hidden_layers"], 15);

    // Width: attention units are query heads (one KV head per layer), element1 needs the gradient pass.
    let width = d.join("width");
    run_ok(
        slm()
            .arg("width")
            .arg(&short)
            .arg("--out")
            .arg(&width)
            .args(["--pruning-ratio", "0.25", "--importance", "element1"])
            .args(CALIB),
    );
    let wcfg = config(&width);
    let layers = wcfg["slm_layers"].as_array().expect("pruned layers differ in width");
    assert!(layers.iter().any(|l| l["num_attention_heads"] == 3 && l["num_key_value_heads"] == 1), "{wcfg}");

    // Eval on the pruned model, with lm-eval's <bos> (two documents of one task and perplexity windows).
    let results = d.join("results.json");
    run_ok(
        slm()
            .arg("eval")
            .arg(&width)
            .args(["--tasks", "arc_easy,wikitext2-128", "--limit", "2"])
            .arg("--output-path")
            .arg(&results),
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&results).unwrap()).unwrap();
    assert!(
        r["results"]["arc_easy"]["acc,none"].is_number()
            && r["results"]["wikitext2-128"]["perplexity,none"].is_number()
    );

    // Similarity, bench, LoRA (one step, merged) and export.
    let sim = d.join("sim");
    run_ok(slm().arg("similarity").arg(gemma()).arg("--out").arg(&sim).args(CALIB));
    assert!(std::fs::read_dir(&sim).unwrap().any(|e| e.unwrap().path().extension().is_some_and(|x| x == "png")));
    let bench = run_ok(slm().arg("bench").arg(gemma()).arg("--compare").arg(&short).args([
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "4",
        "--runs",
        "1",
        "--warmup",
        "0",
    ]));
    assert!(bench.contains("decode"), "{bench}");
    let text = d.join("text.jsonl");
    std::fs::write(
        &text,
        (0..8)
            .map(|i| format!("{{\"text\": \"Sentence number {i} is about a cat and a dog.\"}}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let lora = d.join("lora");
    run_ok(slm().arg("lora").arg(&short).arg("--data").arg(&text).arg("--out").arg(&lora).args([
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "1",
        "--cutoff",
        "16",
        "--val-size",
        "2",
        "--rank",
        "2",
        "--merge",
    ]));
    assert_eq!(config(&lora.join("merged"))["model_type"], "gemma3_text");
    let export = d.join("export");
    run_ok(slm().arg("export").arg(gemma()).arg("--out").arg(&export));
    let e = config(&export);
    assert_eq!(
        (e["architectures"][0].as_str(), e["query_pre_attn_scalar"].as_f64()),
        (Some("Gemma3ForCausalLM"), Some(256.0))
    );
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(export.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["add_bos_token"], true, "the export keeps Gemma's <bos>");

    // A schedule: depth then width at a budget, evaluated; the report has the row.
    let data = slm_model::testing::data_dir();
    let out = d.join("run");
    let schedule = format!(
        "model = \"{}\"\nout = \"{}\"\n\n[calibration]\ncalib = \"{}\"\nsamples = 2\nseq_len = 16\n\n\
         [defaults.eval]\ntasks = \"openbookqa\"\nlimit = 2\ndata_dir = \"{}\"\n\n[report]\ndecode_tokens = 2\n\
         prompt_tokens = 8\n\n[[pipeline]]\nname = \"joint\"\nbudget = 0.95\ndepth_share = 0.5\n\
         steps = [{{ step = \"depth\", method = \"shortgpt\" }}, {{ step = \"width\", importance = \"l2\" }}, {{ step = \"eval\" }}]\n",
        gemma().display(),
        out.display(),
        data.join("lambada_openai.test.jsonl").display(),
        data.display()
    );
    std::fs::write(d.join("s.toml"), schedule).unwrap();
    run_ok(slm().arg("run").arg(d.join("s.toml")));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let row = &report["pipelines"][0];
    assert!(row["error"].is_null() && row["tasks"]["openbookqa"]["value"].is_number(), "{row}");
    let share = row["share_of_dense"].as_f64().unwrap();
    assert!((share - 0.95).abs() < 0.01, "budget 95%: {share}");
}
