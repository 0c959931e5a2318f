//! Models as GGUF files from the commands that make them (`slm depth/width --out FILE.gguf`, `slm export`),
//! `slm width --round-to`, `slm logits`, and the flags' errors.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::Device;
use common::{run_err, run_ok, slm};
use slm_model::testing::{data_dir, default_model_path};
use slm_model::Model;

fn calib_flags(cmd: &mut std::process::Command) -> &mut std::process::Command {
    cmd.args(["--samples", "2", "--seq-len", "32", "--calib"]).arg(data_dir().join("lambada_openai.test.jsonl"))
}

fn bits(m: &Model) -> Vec<(String, Vec<u32>)> {
    m.weights
        .named_tensors(&m.spec.arch)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()))
        .collect()
}

fn plan_in(gguf: &Path) -> serde_json::Value {
    let (c, _) = slm_model::gguf::read_content(gguf).unwrap();
    match &c.metadata["slm.plan"] {
        Value::String(s) => serde_json::from_str(s).unwrap(),
        other => panic!("{other:?}"),
    }
}

/// `--out FILE.gguf` gives the same model as the HF output, bit for bit, with the plan in the metadata; a width
/// output with `--round-to 256` keeps 1280 of 1536 channels at ratio 0.25 (1152 rounded to the nearest multiple)
/// and is a `deci` GGUF.
#[test]
fn depth_and_width_write_gguf_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (hf, gg) = (dir.path().join("depth"), dir.path().join("depth.gguf"));
    for out in [&hf, &gg] {
        run_ok(calib_flags(slm().arg("depth").arg(default_model_path()).arg("--out").arg(out).args([
            "--method",
            "shortgpt",
            "--target-layers",
            "13",
            "--dtype",
            "f32",
        ])));
    }
    let (a, b) = (Model::load(&hf, &Device::Cpu).unwrap(), Model::load(&gg, &Device::Cpu).unwrap());
    assert_eq!(a.spec.num_layers(), 17);
    assert!(bits(&a) == bits(&b), "the GGUF output differs from the HF output");
    assert_eq!(plan_in(&gg)["method"], "shortgpt");

    let (whf, wgg) = (dir.path().join("width"), dir.path().join("width.gguf"));
    for out in [&whf, &wgg] {
        let stdout = run_ok(calib_flags(slm().arg("width").arg(&hf).arg("--out").arg(out).args([
            "--pruning-ratio",
            "0.25",
            "--round-to",
            "256",
            "--dtype",
            "f32",
        ])));
        assert!(stdout.contains("MLP 1536 -> 1280"), "{stdout}");
    }
    let (a, b) = (Model::load(&whf, &Device::Cpu).unwrap(), Model::load(&wgg, &Device::Cpu).unwrap());
    assert!(bits(&a) == bits(&b), "the GGUF width output differs from the HF output");
    assert_eq!(b.spec.layers[5].intermediate_size, 1280);
    let (c, _) = slm_model::gguf::read_content(&wgg).unwrap();
    assert_eq!(c.metadata["general.architecture"].to_string().unwrap(), "deci");
    let plan = plan_in(&wgg);
    assert_eq!(plan["pruning_ratio"]["mlp_multiple"], 256);
    assert_eq!(plan["previous_plan"]["method"], "shortgpt");

    // slm export of the HF width output: the same tensors again, q8_0 on request.
    let q8 = dir.path().join("w-q8.gguf");
    let stdout = run_ok(slm().arg("export").arg(&whf).arg("--out").arg(&q8).args(["--outtype", "q8_0"]));
    assert!(stdout.contains("architecture `deci`"), "{stdout}");
    assert!(std::fs::metadata(&q8).unwrap().len() < std::fs::metadata(&wgg).unwrap().len() / 3);
}

#[test]
fn export_flags_and_outputs_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let export_err = |out: &str, flags: [&str; 2]| {
        run_err(slm().arg("export").arg(default_model_path()).arg("--out").arg(dir.path().join(out)).args(flags))
    };
    let e = export_err("m.gguf", ["--dtype", "f16"]);
    assert!(e.contains("--outtype"), "{e}");
    let e = export_err("m", ["--outtype", "q8_0"]);
    assert!(e.contains("--outtype q8_0 is for a .gguf output"), "{e}");
    let e = export_err("m.gguf", ["--outtype", "q3_k"]);
    assert!(e.contains("q3_k") && e.contains("q4_k"), "{e}");
    let hf = dir.path().join("hf");
    run_ok(slm().arg("export").arg(default_model_path()).arg("--out").arg(&hf));
    let inside = hf.join("x.gguf");
    let e = run_err(slm().arg("export").arg(&hf).arg("--out").arg(&inside));
    assert!(e.contains("inside the input"), "{e}");
    assert!(!inside.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "nothing else was written");
}

/// `slm logits` writes every position's logits as a float32 .npy; the last position's argmax on the golden
/// prompt is transformers' (golden/smollm2_logits.json).
#[test]
fn logits_match_the_golden_argmax() {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(slm_model::testing::golden_dir().join("smollm2_logits.json")).unwrap(),
    )
    .unwrap();
    let p = &golden["prompts"][0];
    let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.npy");
    run_ok(
        slm()
            .arg("logits")
            .arg(default_model_path())
            .arg("--ids")
            .arg(serde_json::to_string(&ids).unwrap())
            .arg("--out")
            .arg(&out),
    );
    let b = std::fs::read(&out).unwrap();
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hl]).unwrap();
    assert!(header.contains(&format!("'shape': ({}, 49152)", ids.len())), "{header}");
    let data: Vec<f32> = b[10 + hl..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(data.len(), ids.len() * 49152);
    let last = &data[(ids.len() - 1) * 49152..];
    let argmax = last.iter().enumerate().fold(0, |b, (i, x)| if *x > last[b] { i } else { b });
    assert_eq!(argmax as u64, p["argmax_last"].as_u64().unwrap());
    let e = run_err(slm().arg("logits").arg(default_model_path()).args(["--ids", "[1, 99999]", "--out"]).arg(&out));
    assert!(e.contains("99999"), "{e}");
}
