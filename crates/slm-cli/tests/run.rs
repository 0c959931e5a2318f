//! `slm run`: schedule errors name the line and key before any work starts; an end-to-end schedule on the
//! default model (shared prefixes computed once, budgets met, a failing pipeline isolated, report numbers equal
//! to the step outputs).

use std::path::Path;
mod common;

use common::slm;

use slm_model::testing::{data_dir, default_model_path};

fn header(out: &Path) -> String {
    format!(
        "model = \"{}\"\nout = \"{}\"\n\n[calibration]\ncalib = \"{}\"\nsamples = 2\nseq_len = 32\n\n[defaults.eval]\ntasks = \"wikitext2-128,openbookqa\"\nlimit = 3\ndata_dir = \"{}\"\n\n[report]\ndecode_tokens = 2\nprompt_tokens = 8\nsimilarity = true\n",
        default_model_path().display(),
        out.display(),
        data_dir().join("lambada_openai.test.jsonl").display(),
        data_dir().display()
    )
}

fn run_schedule(text: &str, dir: &Path) -> std::process::Output {
    let path = dir.join("s.toml");
    std::fs::write(&path, text).unwrap();
    slm().arg("run").arg(&path).output().unwrap()
}

#[test]
fn schedule_errors_name_the_line_and_key_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let h = header(&out);
    let base_lines = h.lines().count();
    let cases = [
        // (pipeline text, expected line offset after the header, expected fragments)
        ("[[pipeline]]\nname = \"a\"\nsteps = [\n  { step = \"eval\" },\n  { step = \"width\", pruning_ratio = 0.2, fooo = 1 },\n]\n", 5, vec!["key `fooo`", "unknown option '--fooo'", "pipeline `a` step 2 (width)"]),
        ("[[pipeline]]\nname = \"a\"\nsteps = [{ step = \"prune\" }]\n", 3, vec!["key `step`", "unknown step `prune`"]),
        ("[[pipeline]]\nname = \"a\"\nsteps = [{ step = \"eval\", limit = \"many\" }]\n", 3, vec!["key `limit`", "invalid value 'many'"]),
        ("[[pipeline]]\nname = \"a\"\nbudget = 0.8\nsteps = [{ step = \"depth\", target_layers = 3 }]\n", 4, vec!["key `target_layers`", "has a budget"]),
        ("[[pipeline]]\nname = \"a\"\nsteps = [{ step = \"depth\", method = \"shortgpt\" }]\n", 3, vec!["give the pipeline a budget or the step one of"]),
        ("[[pipeline]]\nname = \"a\"\nbudgett = 0.8\nsteps = []\n", 3, vec!["unknown field `budgett`"]),
        // Enum-like and numeric values are typed: a bad one is refused by the check, not hours later.
        ("[[pipeline]]\nname = \"a\"\nsteps = [{ step = \"depth\", method = \"slmm\", target_layers = 2 }]\n", 3, vec!["key `method`", "unknown depth method `slmm`"]),
        ("[[pipeline]]\nname = \"a\"\nsteps = [{ step = \"eval\", tasks = \"mmlu\" }]\n", 3, vec!["key `tasks`", "unknown task `mmlu`"]),
        ("[[pipeline]]\nname = \"a\"\nsteps = [{ step = \"width\", pruning_ratio = 0.2, importance = \"taylor\" }]\n", 3, vec!["key `importance`", "taylor"]),
        ("[[pipeline]]\nname = \"a\"\nsteps = [{ step = \"depth\", merge = \"sum\", target_layers = 2 }]\n", 3, vec!["key `merge`", "unknown merge operator `sum`"]),
        ("[[pipeline]]\nname = \"a\"\nsteps = [{ step = \"eval\", limit = 0 }]\n", 3, vec!["key `limit`", "at least 1"]),
        ("[[pipeline]]\nname = \"a\"\nsteps = [{ step = \"eval\" }\n", 3, vec![]),
    ];
    for (text, offset, wants) in cases {
        let o = run_schedule(&format!("{h}\n{text}"), dir.path());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{text}: expected failure");
        let line = base_lines + 1 + offset;
        assert!(e.contains(&format!("line {line}")), "{text}: wanted line {line}: {e}");
        for w in wants {
            assert!(e.contains(w), "{text}: wanted `{w}`: {e}");
        }
        assert!(!out.exists(), "nothing may run or be written before the schedule is valid");
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_schedule_runs_end_to_end_and_the_report_matches_the_step_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let text = format!(
        "{}\n{}",
        header(&out),
        r#"
[[pipeline]]
name = "dense"
steps = [{ step = "eval" }]

[[pipeline]]
name = "depth"
budget = 0.8
steps = [{ step = "depth", method = "shortgpt" }, { step = "eval" }]

[[pipeline]]
name = "width"
budget = 0.8
steps = [{ step = "width", importance = "l2" }, { step = "eval" }]

[[pipeline]]
name = "joint"
budget = 0.8
depth_share = 0.5
steps = [{ step = "depth", method = "shortgpt" }, { step = "width", importance = "l2" }, { step = "eval" }]

[[pipeline]]
name = "broken"
steps = [{ step = "width", pruning_ratio = 0.7 }, { step = "eval" }]

[[pipeline]]
name = "joint-again"
budget = 0.8
depth_share = 0.5
steps = [{ step = "depth", method = "shortgpt" }, { step = "width", importance = "l2" }, { step = "eval", limit = 2 }]

[[pipeline]]
name = "split"
budget = 0.8
steps = [{ step = "eval", tasks = "openbookqa" }, { step = "depth", method = "shortgpt" }, { step = "eval", tasks = "openbookqa" }, { step = "eval", tasks = "wikitext2-128" }]
"#
    );
    let o = run_schedule(&text, dir.path());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a failed pipeline makes the run fail");
    assert!(stderr.contains("1 of 7 pipelines failed"), "{stderr}");
    let report = json(&out.join("report.json"));
    assert_eq!(report["slm_output"]["kind"], "run-report");
    assert_eq!(json(&out.join("depth/1-depth/slm_step.json"))["slm_output"]["kind"], "step-marker");
    // 1 + 2 + 2 + 3 + 0 (broken fails) + 1 + 4 computed; joint-again reuses joint's depth and width steps.
    assert_eq!(report["steps_computed"], 13);
    assert_eq!(report["steps_reused"], 2);
    assert!(std::fs::symlink_metadata(out.join("joint-again/2-width")).unwrap().file_type().is_symlink());
    let rows = report["pipelines"].as_array().unwrap();
    assert_eq!(rows.len(), 7);
    let dense = report["dense_parameters"].as_f64().unwrap();
    assert_eq!(dense, 134_515_008.0);
    let layer = 3_540_096.0; // one dense layer
    let channel_group = (3 * 576 * 24) as f64; // one MLP channel in each of the 24 pruned layers
    for r in rows {
        let name = r["pipeline"].as_str().unwrap();
        if name == "broken" {
            let e = r["error"].as_str().unwrap();
            assert!(e.contains("step 1 (width") && e.contains("would remove all 3 KV heads"), "{e}");
            continue;
        }
        assert!(r["error"].is_null(), "{name}: {}", r["error"]);
        // The report's numbers are the step outputs'.
        let final_model = Path::new(r["final_model"].as_str().unwrap());
        let params = r["parameters"].as_f64().unwrap();
        if name != "dense" {
            let cfg = slm_model::ModelSpec::from_hf_config(&final_model.join("config.json")).unwrap();
            assert_eq!(cfg.num_parameters() as f64, params, "{name}");
            assert_eq!(r["layers"].as_u64().unwrap() as usize, cfg.num_layers());
        }
        let evals: Vec<&str> = r["eval_results"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
        if name == "split" {
            // The eval of the dense input (step 1) is not the final model's; steps 3 and 4 make one row.
            let dir = out.join("split");
            assert_eq!(
                evals,
                [dir.join("3-eval/results.json").to_str().unwrap(), dir.join("4-eval/results.json").to_str().unwrap()]
            );
            let (tasks, ppl) = (json(Path::new(evals[0])), json(Path::new(evals[1])));
            assert!(tasks["results"]["wikitext2-128"].is_null() && ppl["results"]["openbookqa"].is_null());
            assert_eq!(r["tasks"]["openbookqa"]["value"], tasks["results"]["openbookqa"]["acc_norm,none"]);
            assert_eq!(r["wikitext2_128_ppl"], ppl["results"]["wikitext2-128"]["perplexity,none"]);
            assert_eq!(r["tasks"].as_object().unwrap().len(), 1);
        } else {
            assert_eq!(evals.len(), 1, "{name}");
            let ev = json(Path::new(evals[0]));
            assert_eq!(r["wikitext2_128_ppl"], ev["results"]["wikitext2-128"]["perplexity,none"], "{name}");
            assert_eq!(r["tasks"]["openbookqa"]["value"], ev["results"]["openbookqa"]["acc_norm,none"], "{name}");
        }
        assert!(r["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        // Budgets: depth within one layer, width and joint within one channel group.
        let gap = (params - 0.8 * dense).abs();
        match name {
            "depth" | "split" => assert!(gap <= layer / 2.0 + 1.0, "{name}: {params}"),
            "width" | "joint" | "joint-again" => assert!(gap <= channel_group, "{name}: {params}"),
            _ => assert_eq!(params, dense),
        }
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| joint | 26 |"), "{md}");
    assert!(md.contains("| broken | failed:"), "{md}");
    assert!(out.join("similarity_dense.png").exists() && out.join("similarity_depth.png").exists());

    // A second run keeps every finished step (same key in its slm_step.json) and reports the same numbers.
    let again = run_schedule(&text, dir.path());
    assert!(!again.status.success());
    let second = json(&out.join("report.json"));
    assert_eq!(second["steps_computed"], 0);
    assert_eq!(second["steps_reused"], 15);
    for (a, b) in rows.iter().zip(second["pipelines"].as_array().unwrap()) {
        assert_eq!(a["wikitext2_128_ppl"], b["wikitext2_128_ppl"]);
        assert_eq!(a["parameters"], b["parameters"]);
    }

    // A marker without a stamp (an older slm's) is not trusted: that step is recomputed, the rest kept.
    std::fs::write(out.join("depth/1-depth/slm_step.json"), br#"{"key": "x", "argv": []}"#).unwrap();
    let third = run_schedule(&text, dir.path());
    let stderr = String::from_utf8_lossy(&third.stderr);
    assert!(stderr.contains("recomputing") && stderr.contains("no `slm_output` stamp"), "{stderr}");
    let third = json(&out.join("report.json"));
    assert_eq!((third["steps_computed"].as_u64(), third["steps_reused"].as_u64()), (Some(1), Some(14)));
}

#[test]
fn the_shipped_schedules_are_valid() {
    let root = slm_model::testing::workspace_root();
    for name in ["demo.toml", "paper.toml"] {
        let o =
            slm().current_dir(&root).arg("run").arg(root.join("schedules").join(name)).arg("--check").output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains("slm+width"), "{name}: {stdout}");
    }
}

/// An `export` step writes the pipeline's model so far as `<step>/model.gguf` (here a width-pruned one: `deci`,
/// q8_0), which slm loads back with the step's shapes; the model the later steps and the report use is unchanged.
#[test]
fn an_export_step_writes_the_pipelines_model_as_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let text = format!(
        "{}\n{}",
        header(&out),
        r#"
[[pipeline]]
name = "width"
steps = [{ step = "width", importance = "l2", pruning_ratio = 0.25 }, { step = "export", outtype = "q8_0" }, { step = "eval" }]
"#
    );
    let o = run_schedule(&text, dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gguf = out.join("width/2-export/model.gguf");
    let (c, _) = slm_model::gguf::read_content(&gguf).unwrap();
    assert_eq!(c.metadata["general.architecture"].to_string().unwrap(), "deci");
    assert_eq!(c.metadata["general.file_type"].to_u32().unwrap(), 7, "q8_0");
    let back = slm_model::Model::load_spec(&gguf).unwrap();
    let width = slm_model::Model::load_spec(&out.join("width/1-width")).unwrap();
    assert_eq!(back.layers, width.layers);
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["pipelines"][0]["parameters"].as_f64().unwrap(), width.num_parameters() as f64);
}
