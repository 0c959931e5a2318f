//! Nothing harms the user's files: outputs that are, contain or lie inside an input are refused before any work
//! with the input byte-identical afterwards; a foreign existing output is replaced only with `--force`; an export
//! killed at any point leaves the old output (or none) and the next run leaves no temporaries. The data are
//! found from any working directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

mod common;

use common::{run_err, run_ok, slm};
use slm_model::testing::default_model_path;

/// Every file under `dir` with its bytes, sorted (for "byte-identical afterwards").
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A small HF model directory of the user's (no slm stamp): the default model's config with 2 layers is enough,
/// since every refusal happens before the model is read.
fn user_model(dir: &Path) -> PathBuf {
    let m = dir.join("user-model");
    std::fs::create_dir(&m).unwrap();
    std::fs::write(m.join("config.json"), br#"{"model_type": "llama"}"#).unwrap();
    std::fs::write(m.join("model.safetensors"), b"not read").unwrap();
    std::fs::write(m.join("README.md"), b"my notes").unwrap();
    m
}

#[test]
fn outputs_over_into_or_around_an_input_are_refused_and_the_input_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let m = user_model(dir.path());
    let before = snapshot(&m);
    let mp = m.display().to_string();
    let calib = slm_model::testing::data_dir().join("lambada_openai.test.jsonl");
    let sched = dir.path().join("s.toml");
    std::fs::write(&sched, format!("model = \"{mp}\"\nout = \"{mp}\"\n[[pipeline]]\nname = \"d\"\nsteps = [{{ step = \"eval\", tasks = \"openbookqa\" }}]\n"))
        .unwrap();
    let inside = m.join("out");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["export".into(), mp.clone(), "--out".into(), mp.clone()], "is the input"),
        (vec!["export".into(), mp.clone(), "--out".into(), inside.display().to_string()], "lies inside the input"),
        (vec!["export".into(), mp.clone(), "--out".into(), dir.path().display().to_string()], "contains the input"),
        (
            vec!["depth".into(), mp.clone(), "--out".into(), mp.clone(), "--target-layers".into(), "1".into()],
            "is the input",
        ),
        (
            vec!["width".into(), mp.clone(), "--out".into(), mp.clone(), "--pruning-ratio".into(), "0.2".into()],
            "is the input",
        ),
        (vec!["similarity".into(), mp.clone(), "--out".into(), inside.display().to_string()], "lies inside"),
        (vec!["lora".into(), mp.clone(), "--out".into(), mp.clone(), "--max-steps".into(), "1".into()], "is the input"),
        (
            vec![
                "eval".into(),
                mp.clone(),
                "--tasks".into(),
                "openbookqa".into(),
                "--output-path".into(),
                m.join("config.json").display().to_string(),
            ],
            "lies inside the input",
        ),
        (
            vec!["bench".into(), mp.clone(), "--json".into(), m.join("config.json").display().to_string()],
            "lies inside the input",
        ),
        (vec!["run".into(), sched.display().to_string()], "is the input"),
        (vec!["run".into(), sched.display().to_string(), "--check".into()], "is the input"),
        // A calibration corpus is an input too.
        (
            vec![
                "depth".into(),
                default_model_path().display().to_string(),
                "--out".into(),
                calib.display().to_string(),
                "--target-layers".into(),
                "1".into(),
            ],
            "is the input",
        ),
    ];
    let calib_before = std::fs::read(&calib).unwrap();
    for (argv, want) in cases {
        // --force never lets an output overwrite an input.
        for force in [false, true] {
            let mut cmd = slm();
            cmd.args(&argv);
            if force {
                cmd.arg("--force");
            }
            let e = run_err(&mut cmd);
            assert!(e.contains(want), "{argv:?}: {e}");
        }
        assert_eq!(snapshot(&m), before, "{argv:?} changed the input");
        assert!(!inside.exists());
    }
    assert_eq!(std::fs::read(&calib).unwrap(), calib_before);
}

#[test]
fn a_foreign_existing_output_needs_force_and_an_earlier_output_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let other = user_model(dir.path());
    let before = snapshot(&other);
    let model = default_model_path();
    let e = run_err(slm().arg("export").arg(&model).arg("--out").arg(&other));
    assert!(e.contains("not an earlier slm output") && e.contains("--force"), "{e}");
    assert_eq!(snapshot(&other), before);
    // Results JSON: a user's file is not replaced; an earlier results file is.
    let notes = dir.path().join("notes.json");
    std::fs::write(&notes, b"{\"mine\": 1}").unwrap();
    let e = run_err(
        slm().arg("eval").arg(&model).args(["--tasks", "openbookqa", "--limit", "2", "--output-path"]).arg(&notes),
    );
    assert!(e.contains("--output-path") && e.contains("not an earlier slm output"), "{e}");
    assert_eq!(std::fs::read(&notes).unwrap(), b"{\"mine\": 1}");
    let results = dir.path().join("r.json");
    for _ in 0..2 {
        run_ok(
            slm()
                .arg("eval")
                .arg(&model)
                .args(["--tasks", "openbookqa", "--limit", "2", "--output-path"])
                .arg(&results),
        );
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    assert_eq!(v["slm_output"]["kind"], "eval-results");
    // One kind never replaces another: an eval results file is not a bench output.
    let e = run_err(slm().arg("bench").arg(&model).args(["--runs", "1", "--json"]).arg(&results));
    assert!(e.contains("slm eval-results output, not a bench output"), "{e}");
    // With --force the user's directory is replaced, and stamped as an slm model.
    run_ok(slm().arg("export").arg(&model).arg("--out").arg(&other).arg("--force"));
    assert!(other.join("slm_output.json").is_file() && !other.join("README.md").exists());
    run_ok(slm().arg("export").arg(&model).arg("--out").arg(&other));
}

/// Names of the temporaries slm leaves beside `out` (`.NAME.tmp-PID`, `.NAME.old-PID`).
fn temporaries(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn an_export_killed_at_any_point_leaves_the_old_output_or_none_and_no_temporaries_after_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exported");
    let model = default_model_path();
    let start = Instant::now();
    run_ok(slm().arg("export").arg(&model).arg("--out").arg(&out).args(["--dtype", "bf16"]));
    let full = start.elapsed();
    let old = std::fs::read(out.join("model.safetensors")).unwrap();
    // Kill -9 at points spread over a whole export (loading, converting, writing, renaming).
    for k in 1..=6u32 {
        let mut child =
            slm().arg("export").arg(&model).arg("--out").arg(&out).args(["--dtype", "bf16"]).spawn().unwrap();
        std::thread::sleep(full * k / 6);
        let _ = child.kill(); // SIGKILL on Unix
        child.wait().unwrap();
        match std::fs::read(out.join("model.safetensors")) {
            // The old output (a finished new one is the same bytes: same inputs, same output).
            Ok(bytes) => assert!(bytes == old, "kill at {k}/6: a partial model.safetensors ({} bytes)", bytes.len()),
            Err(_) => assert!(!out.exists(), "kill at {k}/6: the output directory is there without its weights"),
        }
    }
    // The next run finishes and cleans up what the killed ones left.
    run_ok(slm().arg("export").arg(&model).arg("--out").arg(&out).args(["--dtype", "bf16"]));
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), old, "same inputs, same output");
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn the_data_are_found_from_any_working_directory_and_a_bad_place_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = default_model_path();
    // No --data-dir, run from an unrelated directory: the source checkout's data/ is found.
    let out =
        run_ok(slm().current_dir(dir.path()).arg("eval").arg(&model).args(["--tasks", "openbookqa", "--limit", "2"]));
    assert!(out.contains("openbookqa"), "{out}");
    let e = run_err(
        slm()
            .current_dir(dir.path())
            .env("SLM_DATA_DIR", "/no/such/data")
            .arg("eval")
            .arg(&model)
            .args(["--tasks", "openbookqa"]),
    );
    assert!(e.contains("$SLM_DATA_DIR = /no/such/data: not a directory"), "{e}");
    let e = run_err(slm().arg("eval").arg(&model).args(["--tasks", "openbookqa", "--data-dir", "/no/such/data"]));
    assert!(e.contains("--data-dir /no/such/data: not a directory"), "{e}");
    // The default calibration corpus of depth/width/similarity/lora comes from the same place.
    let e = run_err(
        slm().env("SLM_DATA_DIR", "/no/such/data").arg("similarity").arg(&model).arg("--out").arg(dir.path().join("s")),
    );
    assert!(e.contains("$SLM_DATA_DIR"), "{e}");
}

#[test]
fn non_finite_and_out_of_range_numbers_are_refused_by_the_flag() {
    let model = default_model_path();
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["similarity", "--patch-threshold", "nan"], "--patch-threshold"),
        (&["depth", "--method", "slm", "--threshold", "inf"], "--threshold"),
        (&["width", "--pruning-ratio", "NaN"], "--pruning-ratio"),
        (&["eval", "--tasks", "openbookqa", "--limit", "0"], "--limit"),
        (&["depth", "--target-layers", "2", "--samples", "100000000000"], "100000000000 windows asked for"),
    ];
    for (argv, want) in cases {
        let mut cmd = slm();
        cmd.arg(argv[0]).arg(&model).args(&argv[1..]);
        if argv[0] != "eval" {
            cmd.arg("--out").arg(dir.path().join("o"));
        }
        let e = run_err(&mut cmd);
        assert!(e.contains(want), "{argv:?}: {e}");
    }
    assert!(!dir.path().join("o").exists());
}
