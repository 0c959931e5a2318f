//! The `slm` binary end to end: inspect, export, and clear errors for bad flags.

mod common;

use std::path::Path;

use common::{run_err, run_ok, slm, ONE_STEP_TEXT, TEXT_PAIRS};

use slm_model::testing::default_model_path;

#[test]
fn inspect_json_uses_hf_names_and_counts_parameters() {
    let out = run_ok(slm().arg("inspect").arg(default_model_path()).arg("--json"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["num_hidden_layers"], 30);
    assert_eq!(v["hidden_size"], 576);
    assert_eq!(v["num_attention_heads"], 9);
    assert_eq!(v["num_key_value_heads"], 3);
    assert_eq!(v["tie_word_embeddings"], true);
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 30);
    assert_eq!(layers[0]["intermediate_size"], 1536);
    assert_eq!(layers[0]["head_dim"], 64);
    // Hand count per layer: 2*576 norms + 576*(576+192+192+576) attention + 3*576*1536 MLP.
    assert_eq!(layers[0]["num_parameters"], 3_540_096);
    // transformers reports 134,515,008 parameters for this model (lm-eval's results.json).
    assert_eq!(v["num_parameters"], 134_515_008u64);
}

#[test]
fn export_then_inspect_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bf16");
    run_ok(slm().arg("export").arg(default_model_path()).arg("--out").arg(&out).args(["--dtype", "bf16"]));
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    let st = std::fs::metadata(out.join("model.safetensors")).unwrap().len();
    assert!(st > 2 * 134_000_000 && st < 2 * 136_000_000, "bf16 file of {st} bytes");
    let v: serde_json::Value = serde_json::from_str(&run_ok(slm().arg("inspect").arg(&out).arg("--json"))).unwrap();
    assert_eq!(v["num_parameters"], 134_515_008u64);
}

#[test]
fn bad_flags_and_paths_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = run_err(
        slm().arg("export").arg(default_model_path()).arg("--out").arg(dir.path().join("x")).args(["--dtype", "f8"]),
    );
    assert!(e.contains("unknown dtype `f8`"), "{e}");
    let e = run_err(slm().arg("inspect").arg(default_model_path()).args(["--device", "tpu"]));
    assert!(e.contains("unknown device `tpu`"), "{e}");
    let e = run_err(slm().arg("inspect").arg(dir.path().join("missing-model")));
    assert!(e.contains("missing-model") && e.contains("does not exist"), "{e}");
    let e = run_err(slm().arg("inspect").arg(dir.path()));
    assert!(e.contains("not a model"), "{e}");
}

fn golden_results() -> serde_json::Value {
    let p = slm_model::testing::golden_dir().join("lm-eval-first25/results.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn eval_writes_lm_eval_results_and_samples_that_match_the_golden_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.json");
    let stdout = run_ok(
        slm()
            .args(["eval"])
            .arg(default_model_path())
            .args(["--tasks", "winogrande,openbookqa", "--limit", "25", "--batch-size", "8", "--log-samples"])
            .arg("--data-dir")
            .arg(slm_model::testing::data_dir())
            .arg("--output-path")
            .arg(&out),
    );
    assert!(stdout.contains("|openbookqa"), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let g = golden_results();
    for task in ["winogrande", "openbookqa"] {
        let ours = &r["results"][task];
        let theirs = &g["results"][format!("{task}_local")];
        for key in ["acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"] {
            assert_eq!(ours.get(key), theirs.get(key), "{task} {key}");
        }
        assert_eq!(r["n-samples"][task], g["n-samples"][format!("{task}_local")], "{task} n-samples");
        assert_eq!(r["versions"][task], 1.0);
        assert_eq!(r["n-shot"][task], 0);
    }
    // Not all seven tasks: no avg-7.
    assert!(r.get("avg-7").is_none());
    // slm's throughput record per task: counts of what was run and rates that agree with them.
    for task in ["winogrande", "openbookqa"] {
        let t = &r["throughput"][task];
        assert_eq!(t["docs"], 25, "{task}: {t}");
        assert_eq!(t["requests"], if task == "winogrande" { 50 } else { 100 }, "{task}: {t}");
        let (secs, tokens) = (t["seconds"].as_f64().unwrap(), t["tokens"].as_f64().unwrap());
        assert!(secs > 0.0 && tokens > 0.0 && t["logit_rows"].as_u64().unwrap() > 0, "{task}: {t}");
        assert!((t["docs_per_s"].as_f64().unwrap() * secs - 25.0).abs() < 1e-6, "{task}: {t}");
        assert!((t["tokens_per_s"].as_f64().unwrap() * secs - tokens).abs() < 1e-3, "{task}: {t}");
        assert!(t["useful_gflop_per_s"].as_f64().unwrap() > 0.0, "{task}: {t}");
    }
    // Per-document records next to the results file, one line per document, metrics as in the golden samples.
    let samples: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("samples_openbookqa_"))
        .collect();
    assert_eq!(samples.len(), 1);
    let golden_lines =
        std::fs::read_to_string(slm_model::testing::golden_dir().join("lm-eval-first25/openbookqa.jsonl")).unwrap();
    let ours = std::fs::read_to_string(&samples[0]).unwrap();
    assert_eq!(ours.lines().count(), 25);
    for (a, b) in ours.lines().zip(golden_lines.lines()) {
        let (a, b): (serde_json::Value, serde_json::Value) =
            (serde_json::from_str(a).unwrap(), serde_json::from_str(b).unwrap());
        for key in ["doc_id", "gold", "requests", "metrics"] {
            assert_eq!(a[key], b[key], "{key}");
        }
    }
}

#[test]
fn eval_rejects_unknown_task_missing_file_and_malformed_record() {
    let e = run_err(slm().arg("eval").arg(default_model_path()).args(["--tasks", "piqa,mmlu"]));
    assert!(e.contains("unknown task `mmlu`"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let e = run_err(
        slm().arg("eval").arg(default_model_path()).args(["--tasks", "arc_easy", "--data-dir"]).arg(dir.path()),
    );
    assert!(e.contains("arc_easy.test.jsonl") && e.contains("not found"), "{e}");

    let good = std::fs::read_to_string(slm_model::testing::data_dir().join("arc_easy.test.jsonl")).unwrap();
    let first = good.lines().next().unwrap();
    std::fs::write(dir.path().join("arc_easy.test.jsonl"), format!("{first}\n{{\"id\": \"x\", \"question\": 3}}\n"))
        .unwrap();
    let e = run_err(
        slm().arg("eval").arg(default_model_path()).args(["--tasks", "arc_easy", "--data-dir"]).arg(dir.path()),
    );
    assert!(e.contains("arc_easy.test.jsonl: line 2: field `question`: expected a string"), "{e}");
}

/// `slm depth` on the default model into `out` with `flags`, calibrated on 2 windows of 32 LAMBADA tokens.
fn depth_on_default(out: &std::path::Path, flags: &[&str]) -> std::process::Command {
    let mut cmd = slm();
    cmd.arg("depth").arg(default_model_path()).arg("--out").arg(out).args(flags);
    cmd.args(["--samples", "2", "--seq-len", "32", "--calib"]);
    cmd.arg(slm_model::testing::data_dir().join("lambada_openai.test.jsonl"));
    cmd
}

#[test]
fn depth_writes_a_loadable_model_with_its_plan() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pruned");
    let stdout = run_ok(&mut depth_on_default(&out, &["--method", "shortgpt", "--target-layers", "5"]));
    assert!(stdout.contains("30 -> 25 (5 removed)"), "{stdout}");
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("slm_plan.json")).unwrap()).unwrap();
    assert_eq!(plan["method"], "shortgpt");
    assert_eq!(plan["plan"]["removed"].as_array().unwrap().len(), 5);
    assert_eq!(plan["layers_after"], 25);
    let m = slm_model::Model::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(m.spec.num_layers(), 25);
    assert_eq!(plan["parameters_after"].as_u64().unwrap() as usize, m.spec.num_parameters());
    // The plan reads back through its type; another kind, another version or no stamp is refused by name.
    let path = out.join("slm_plan.json");
    let typed = slm_depth::DepthPlanFile::from_json(plan.clone(), &path).unwrap();
    assert_eq!((typed.method, typed.layers_after, typed.plan.removed.len()), (slm_depth::Method::ShortGpt, 25, 5));
    let e = slm_width::WidthPlanFile::from_json(plan.clone(), &path).unwrap_err().to_string();
    assert!(e.contains("slm_plan.json: a depth-plan file, not a width-plan file"), "{e}");
    let mut newer = plan.clone();
    newer["slm_output"]["version"] = 2.into();
    let e = slm_depth::DepthPlanFile::from_json(newer, &path).unwrap_err().to_string();
    assert!(e.contains("a depth-plan file of version 2; this slm reads version 1"), "{e}");
    let mut old = plan.clone();
    old.as_object_mut().unwrap().remove("slm_output");
    let e = slm_depth::DepthPlanFile::from_json(old, &path).unwrap_err().to_string();
    assert!(e.contains("no `slm_output` stamp"), "{e}");
    let mut bad = plan;
    bad["method"] = "slmm".into();
    let e = slm_depth::DepthPlanFile::from_json(bad, &path).unwrap_err().to_string();
    assert!(e.contains("not a valid depth-plan file") && e.contains("slmm"), "{e}");
}

#[test]
fn depth_slm_dp_merges_windows_for_the_target_and_records_its_proposals() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dp");
    let stdout = run_ok(&mut depth_on_default(&out, &["--method", "slm-dp", "--target-ratio", "0.2"]));
    assert!(stdout.contains("slm-dp (operator top, criterion kl)"), "{stdout}");
    assert!(stdout.contains("30 -> 22 (8 removed)"), "{stdout}");
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("slm_plan.json")).unwrap()).unwrap();
    assert_eq!(plan["method"], "slm-dp");
    assert_eq!(plan["operator"], "top");
    let merges: Vec<[usize; 2]> = serde_json::from_value(plan["plan"]["merges"].clone()).unwrap();
    assert_eq!(merges.iter().map(|[lo, hi]| hi - lo).sum::<usize>(), 8);
    // The plan is the best-scoring proposal, and every window's local cost is recorded.
    let proposals = plan["search"]["dp_candidates"].as_array().unwrap();
    let best = proposals.iter().map(|c| c["score"].as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
    let chosen = proposals.iter().find(|c| c["merges"] == plan["plan"]["merges"]).expect("chosen among the proposals");
    assert_eq!(chosen["score"].as_f64().unwrap(), best);
    let steps = plan["search"]["steps"].as_array().unwrap();
    assert_eq!(steps.iter().filter(|s| s["passed"] == true).count(), merges.len());
    let m = slm_model::Model::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(m.spec.num_layers(), 22);
    // slm-dp needs a layer count.
    let e = run_err(slm().arg("depth").arg(default_model_path()).arg("--out").arg(dir.path().join("t")).args([
        "--method",
        "slm-dp",
        "--threshold",
        "0.5",
    ]));
    assert!(e.contains("--target-layers or --target-ratio"), "{e}");
}

#[test]
fn depth_calibration_defaults_depend_on_the_method() {
    // slm-dp: 40 windows of 32 tokens; every other method: the reference's 10 of 128; a flag overrides only itself.
    let dir = tempfile::tempdir().unwrap();
    let lambada = slm_model::testing::data_dir().join("lambada_openai.test.jsonl");
    for (i, (flags, samples, seq_len)) in [
        (vec!["--method", "slm-dp"], 40, 32),
        (vec!["--method", "shortgpt"], 10, 128),
        (vec!["--method", "slm-dp", "--seq-len", "16"], 40, 16),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("m{i}"));
        run_ok(
            slm()
                .arg("depth")
                .arg(default_model_path())
                .arg("--out")
                .arg(&out)
                .args(&flags)
                .args(["--target-layers", "1"])
                .arg("--calib")
                .arg(lambada.clone()),
        );
        let plan: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("slm_plan.json")).unwrap()).unwrap();
        assert_eq!(
            (plan["calibration"]["samples"].as_u64(), plan["calibration"]["seq_len"].as_u64()),
            (Some(samples), Some(seq_len)),
            "{flags:?}"
        );
    }
}

#[test]
fn depth_rejects_bad_threshold_ratio_and_method() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    for (flags, want) in [
        (vec!["--threshold", "1.5"], "threshold must be in (0, 1]"),
        (vec!["--threshold", "0"], "threshold must be in (0, 1]"),
        (vec!["--target-ratio", "1.2"], "target ratio must be in (0, 1)"),
        (vec!["--target-layers", "29"], "at least two must remain"),
        (vec!["--method", "magic", "--target-layers", "3"], "unknown depth method `magic`"),
        (vec!["--merge", "median", "--target-layers", "3"], "unknown merge operator `median`"),
    ] {
        let e = run_err(slm().arg("depth").arg(default_model_path()).arg("--out").arg(&out).args(&flags));
        assert!(e.contains(want), "{flags:?}: {e}");
    }
    assert!(!out.exists());
}

#[test]
fn width_prunes_a_depth_pruned_model_and_the_result_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let calib = slm_model::testing::data_dir().join("lambada_openai.test.jsonl");
    let depth = dir.path().join("depth");
    run_ok(&mut depth_on_default(&depth, &["--method", "shortgpt", "--target-layers", "13"]));
    let width = dir.path().join("width");
    let stdout = run_ok(
        slm()
            .arg("width")
            .arg(&depth)
            .arg("--out")
            .arg(&width)
            .args(["--pruning-ratio", "0.25", "--importance", "element2", "--samples", "2", "--seq-len", "32"])
            .arg("--calib")
            .arg(&calib),
    );
    // 17 layers: the default range keeps round(4*17/32) = 2 first and round(2*17/32) = 1 last layers dense.
    assert!(stdout.contains("layers:      2..16 pruned at ratio 0.2500"), "{stdout}");
    // 3 - floor(2.25) = 1 KV head (3 query heads) and 1536 - 1152 = 384 channels per pruned layer.
    assert!(stdout.contains("heads 9/3 -> 6/2 (query/KV), MLP 1536 -> 1152"), "{stdout}");
    // element2: one backward chain per window, which gives the Fisher diagonal and the gradient.
    assert!(stdout.contains("2 backward passes on 2 windows"), "{stdout}");
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(width.join("slm_plan.json")).unwrap()).unwrap();
    assert_eq!(plan["previous_plan"]["method"], "shortgpt", "the depth step's plan is kept");
    let typed = slm_width::WidthPlanFile::from_json(plan.clone(), &width.join("slm_plan.json")).unwrap();
    assert_eq!(typed.layers.len(), 17);
    slm_depth::DepthPlanFile::from_json(typed.previous_plan.clone().unwrap(), Path::new("previous")).unwrap();
    assert_eq!(plan["plan"]["layers"].as_array().unwrap().len(), 14);
    let m = slm_model::Model::load(&width, &candle_core::Device::Cpu).unwrap();
    assert_eq!(m.spec.num_layers(), 17);
    assert_eq!(m.spec.layers[5].intermediate_size, 1152);
    assert_eq!(m.spec.layers[0].intermediate_size, 1536);
    // Per pruned layer: 3 query heads (192 q rows, 192 o columns) + 1 KV head (64 k, 64 v rows) = 576*512, plus
    // 384 channels * 3 * 576; 14 layers.
    let removed = 14 * (576 * 512 + 384 * 3 * 576);
    assert_eq!(
        plan["parameters_before"].as_u64().unwrap() - plan["parameters_after"].as_u64().unwrap(),
        removed as u64
    );
    assert_eq!(m.spec.num_parameters() as u64, plan["parameters_after"].as_u64().unwrap());
    let eval = run_ok(
        slm()
            .arg("eval")
            .arg(&width)
            .args(["--tasks", "wikitext2-128", "--limit", "2", "--data-dir"])
            .arg(slm_model::testing::data_dir()),
    );
    assert!(eval.contains("wikitext2-128"), "{eval}");

    // Distillation of the joint model: the teacher is the dense model the depth step pruned (not the depth
    // step's output, which the width plan names as its source), and hidden-state matching maps the 17 layers to
    // the dense layers through the depth plan kept inside the width plan (the depth output has 17 layers too, so
    // taking it as the teacher would silently match layer i to its layer i). `--layers cuts` reads the same plan.
    let ft = dir.path().join("ft");
    let stdout = run_ok(
        slm()
            .arg("lora")
            .arg(&width)
            .arg("--out")
            .arg(&ft)
            .arg("--data")
            .arg(&calib)
            .args(TEXT_PAIRS)
            .args(ONE_STEP_TEXT)
            .args(["--train", "layers", "--layers", "cuts", "--objective", "kl=1,hidden=1", "--merge"]),
    );
    let depth_plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(depth.join("slm_plan.json")).unwrap()).unwrap();
    let depth_typed = slm_depth::DepthPlanFile::from_json(depth_plan, &depth.join("slm_plan.json")).unwrap();
    let cuts = slm_lora::trainable::layers_next_to_cuts(&depth_typed.kept_layers);
    assert!(!cuts.is_empty());
    let run = slm_lora::file::LoraRunFile::read(&ft).unwrap();
    assert_eq!(run.teacher.as_deref(), Some(default_model_path().display().to_string().as_str()), "{stdout}");
    assert_eq!(run.trained.unwrap().layers, cuts, "--layers cuts from the depth plan inside the width plan");
    let merged_path = ft.join("merged/slm_plan.json");
    let merged: serde_json::Value = serde_json::from_slice(&std::fs::read(&merged_path).unwrap()).unwrap();
    let merged = slm_lora::file::MergedPlanFile::from_json(merged, &merged_path).unwrap();
    assert_eq!(merged.source_model.as_deref(), Some(default_model_path().display().to_string().as_str()));
}

#[test]
fn width_target_ratio_lands_on_the_requested_share() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w");
    let stdout = run_ok(slm().arg("width").arg(default_model_path()).arg("--out").arg(&out).args([
        "--target-ratio",
        "0.2",
        "--importance",
        "l2",
    ]));
    // Ratio 0.3106 on layers 4..28: 1 of 3 KV heads (576*512 parameters) and 478 of 1536 channels per layer.
    assert!(stdout.contains("4..28 pruned at ratio 0.3106"), "{stdout}");
    let removed = 24 * (576 * 512 + 478 * 3 * 576);
    assert_eq!(removed, 26_901_504);
    assert!(stdout.contains(&format!("134515008 -> {} (20.00% of all removed", 134_515_008 - removed)), "{stdout}");
}

#[test]
fn width_rejects_bad_ratio_range_and_importance() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    for (flags, want) in [
        (vec!["--pruning-ratio", "1.0"], "pruning ratio must be in [0, 1), got 1"),
        (vec!["--pruning-ratio=-0.5"], "pruning ratio must be in [0, 1)"),
        (vec!["--pruning-ratio", "0.7"], "would remove all 3 KV heads"),
        (vec!["--pruning-ratio", "0.2", "--layers", "20..40"], "outside the model's 30 layers"),
        (vec!["--pruning-ratio", "0.2", "--importance", "magic"], "unknown importance `magic`"),
        (vec!["--target-ratio", "0.95"], "can remove at most"),
        (vec![], "give one of --pruning-ratio or --target-ratio"),
    ] {
        let e = run_err(slm().arg("width").arg(default_model_path()).arg("--out").arg(&out).args(&flags));
        assert!(e.contains(want), "{flags:?}: {e}");
    }
    assert!(!out.exists());
}

#[test]
fn bench_measures_each_model_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let m = default_model_path();
    let stdout = run_ok(
        slm()
            .arg("bench")
            .arg(&m)
            .arg("--compare")
            .arg(&m)
            .args(["--prompt-tokens", "8", "--new-tokens", "4", "--warmup", "0", "--runs", "1", "--json"])
            .arg(&json),
    );
    assert!(stdout.contains("prompt 8 tokens, 4 decode steps"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["slm_output"]["kind"], "bench");
    let v = v["results"].as_array().unwrap();
    assert_eq!(v.len(), 2);
    for r in v {
        assert_eq!(r["layers"], 30);
        assert_eq!(r["parameters"], 134_515_008u64);
        assert!(r["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["peak_rss_mib"].as_f64().unwrap() > 100.0);
    }
    let e = run_err(slm().arg("bench").arg(&m).arg("--compare").arg(dir.path().join("nope")));
    assert!(e.contains("nope: model path does not exist"), "{e}");
}

/// `--compute-dtype bf16` for depth: the search computes in bf16, the output model keeps the loaded final norm
/// bit for bit (the norm names the compute dtype inside slm, so a bf16 rounding of it must not be saved), and
/// the gradient commands refuse the flag.
#[test]
fn depth_computes_in_bf16_and_saves_the_loaded_norm_and_width_refuses_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("f32"), dir.path().join("bf16"));
    let flags = ["--method", "shortgpt", "--target-layers", "5"];
    run_ok(&mut depth_on_default(&a, &flags));
    run_ok(depth_on_default(&b, &flags).args(["--compute-dtype", "bf16"]));
    let plan = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("slm_plan.json")).unwrap()).unwrap()
    };
    let (pa, pb) = (plan(&a), plan(&b));
    eprintln!("removed: f32 {} bf16 {}", pa["plan"]["removed"], pb["plan"]["removed"]);
    assert_eq!(pa["plan"]["removed"], pb["plan"]["removed"], "ShortGPT's choice should survive bf16 compute here");
    let (sa, sb) = (pa["search"]["layer_scores"].as_array().unwrap(), pb["search"]["layer_scores"].as_array().unwrap());
    assert_eq!(sa.len(), sb.len());
    let score = |v: &serde_json::Value| v[1].as_f64().unwrap();
    let worst = sa.iter().zip(sb).map(|(x, y)| (score(x) - score(y)).abs()).fold(0f64, f64::max);
    eprintln!("worst ShortGPT score difference: {worst:.3e}");
    assert!(worst > 0.0, "bf16 compute gave the f32 scores exactly: the flag did nothing");
    assert!(worst < 0.05, "ShortGPT scores differ by {worst}");
    let norm = |d: &Path| {
        let m = slm_model::Model::load(d, &candle_core::Device::Cpu).unwrap();
        assert_eq!(m.compute_dtype(), candle_core::DType::F32);
        m.weights.norm.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(norm(&a), norm(&b), "the saved final norm must be the loaded one");
    let e = run_err(slm().arg("width").arg(default_model_path()).arg("--out").arg(dir.path().join("w")).args([
        "--pruning-ratio",
        "0.2",
        "--compute-dtype",
        "bf16",
    ]));
    assert!(e.contains("--compute-dtype"), "{e}");
}
