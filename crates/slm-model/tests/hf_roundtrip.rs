//! Saving and loading HF directories, heterogeneous layers, and clear errors on bad input.

use candle_core::{Device, IndexOp, Tensor};
use slm_model::output::{Replace, STAMP_FILE};
use slm_model::testing::{default_model_path, max_abs_diff, tiny_model};
use slm_model::{Mode, Model, ModelError, StorageDType};

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

fn logits(m: &Model, ids: &[u32]) -> Tensor {
    m.logits_all(ids).unwrap()
}

#[test]
fn export_reload_is_bit_exact_on_the_default_model() {
    let model = Model::load(&default_model_path(), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exported");
    model.save(&out, StorageDType::F32, &[]).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let back = Model::load(&out, &Device::Cpu).unwrap();
    assert_eq!(back.spec, model.spec);
    let a = model.weights.named_tensors(&model.spec.arch).unwrap();
    let b = back.weights.named_tensors(&back.spec.arch).unwrap();
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(b.iter()) {
        assert_eq!(na, nb);
        assert!(bits(ta) == bits(tb), "{na} is not bit-identical after the round trip");
    }
    let text = "The capital of Italy is Rome, and 1234 people live here.";
    let ids = model.tokenizer().unwrap().encode(text).unwrap();
    assert_eq!(back.tokenizer().unwrap().encode(text).unwrap(), ids);
    assert_eq!(bits(&logits(&model, &ids)), bits(&logits(&back, &ids)));
    // No stray temporary directories beside the output.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

/// Above the shard size an export is split like transformers' `save_pretrained`: numbered shards of at most
/// that many bytes of data (a larger tensor alone) and an index whose `weight_map` names every tensor and whose
/// `total_size` is their bytes; it reloads bit-exact, and saving twice gives the same bytes.
#[test]
fn sharded_export_reloads_bit_exact() {
    let model = Model::load(&default_model_path(), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shard = 60_000_000u64;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for out in [&a, &b] {
        model.save_sharded(out, StorageDType::F32, shard, &[], Replace::SlmOutputOfSameKind).unwrap();
    }
    assert!(!a.join("model.safetensors").exists());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("model.safetensors.index.json")).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let named = model.weights.named_tensors(&model.spec.arch).unwrap();
    assert_eq!(map.len(), named.len());
    let total: u64 = named.iter().map(|(_, t)| t.elem_count() as u64 * 4).sum();
    assert_eq!(index["metadata"]["total_size"].as_u64().unwrap(), total);
    let mut files: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    files.sort();
    files.dedup();
    let n = files.len();
    assert!(n >= 3, "{files:?}");
    for (k, f) in files.iter().enumerate() {
        assert_eq!(*f, format!("model-{:05}-of-{n:05}.safetensors", k + 1));
        let bytes = std::fs::read(a.join(f)).unwrap();
        assert_eq!(bytes, std::fs::read(b.join(f)).unwrap(), "{f}: same inputs, same bytes");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let data: u64 = st.tensors().iter().map(|(_, v)| v.data().len() as u64).sum();
        assert!(data <= shard || st.len() == 1, "{f}: {data} bytes in {} tensors", st.len());
    }
    let back = Model::load(&a, &Device::Cpu).unwrap();
    for ((na, ta), (nb, tb)) in named.iter().zip(back.weights.named_tensors(&back.spec.arch).unwrap().iter()) {
        assert_eq!(na, nb);
        assert!(bits(ta) == bits(tb), "{na} is not bit-identical after the sharded round trip");
    }
}

#[test]
fn half_precision_exports_reload_close() {
    let model = tiny_model(2, 7);
    let dir = tempfile::tempdir().unwrap();
    for (dtype, tol) in [(StorageDType::F16, 1e-2), (StorageDType::BF16, 5e-2)] {
        let out = dir.path().join(dtype.torch_name());
        model.save(&out, dtype, &[]).unwrap();
        let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["torch_dtype"], dtype.torch_name());
        let back = Model::load(&out, &Device::Cpu).unwrap();
        let ids = [3u32, 9, 27, 5, 60];
        let d = max_abs_diff(&logits(&model, &ids), &logits(&back, &ids));
        assert!(d < tol, "{dtype:?}: logits moved by {d}");
    }
}

/// Slices layer `i` of `m` to keep the first `kv` KV heads (and their query heads) and `mlp` channels.
fn slice_layer(m: &mut Model, i: usize, kv: usize, mlp: usize) {
    let l = m.spec.layers[i];
    let hd = l.head_dim;
    let q_rows = kv * l.group_size() * hd;
    let w = m.weights.layer_mut(i).unwrap();
    w.q_proj = w.q_proj.i(0..q_rows).unwrap().contiguous().unwrap();
    w.k_proj = w.k_proj.i(0..kv * hd).unwrap().contiguous().unwrap();
    w.v_proj = w.v_proj.i(0..kv * hd).unwrap().contiguous().unwrap();
    w.o_proj = w.o_proj.i((.., 0..q_rows)).unwrap().contiguous().unwrap();
    w.gate_proj = w.gate_proj.i(0..mlp).unwrap().contiguous().unwrap();
    w.up_proj = w.up_proj.i(0..mlp).unwrap().contiguous().unwrap();
    w.down_proj = w.down_proj.i((.., 0..mlp)).unwrap().contiguous().unwrap();
    let s = &mut m.spec.layers[i];
    s.num_key_value_heads = kv;
    s.num_attention_heads = kv * l.group_size();
    s.intermediate_size = mlp;
}

#[test]
fn layers_of_different_widths_save_reload_and_run() {
    let mut model = Model::load(&default_model_path(), &Device::Cpu).unwrap();
    slice_layer(&mut model, 3, 2, 1000);
    slice_layer(&mut model, 17, 1, 257);
    let model =
        Model::from_parts(model.spec.clone(), model.weights.clone(), model.tokenizer.clone(), &Device::Cpu).unwrap();
    assert!(!model.spec.is_uniform());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("het");
    model.save(&out, StorageDType::F32, &[("slm_plan.json", b"{}".to_vec())]).unwrap();
    assert!(out.join("slm_plan.json").is_file());
    let back = Model::load(&out, &Device::Cpu).unwrap();
    assert_eq!(back.spec, model.spec);
    assert_eq!(back.spec.layers[17].num_attention_heads, 3);
    assert_eq!(back.spec.layers[17].intermediate_size, 257);
    // Hand count: layer 17 keeps 3 query heads, 1 KV head (head_dim 64) and 257 channels of width 576.
    assert_eq!(back.spec.layer_parameters(&back.spec.layers[17]), 2 * 576 + 576 * (2 * 192 + 2 * 64) + 3 * 576 * 257);
    let ids = model.tokenizer().unwrap().encode("A model with uneven layers still runs.").unwrap();
    let a = logits(&model, &ids);
    assert_eq!(bits(&a), bits(&logits(&back, &ids)));
    assert!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
}

#[test]
fn tiny_model_forward_is_batch_invariant_and_deterministic() {
    let m = tiny_model(3, 1);
    let seqs = vec![vec![1u32, 5, 9, 13, 2, 7], vec![4u32, 8], vec![30u32, 31, 32, 33]];
    let pos: Vec<Vec<usize>> = seqs.iter().map(|s| (0..s.len()).collect()).collect();
    let batched = m.forward(&seqs, &pos, false, Mode::Inference).unwrap().logits.unwrap();
    let again = m.forward(&seqs, &pos, false, Mode::Inference).unwrap().logits.unwrap();
    assert_eq!(bits(&batched), bits(&again));
    let mut row = 0;
    for s in &seqs {
        let alone = logits(&m, s);
        assert!(max_abs_diff(&batched.i(row..row + s.len()).unwrap(), &alone) <= 1e-5);
        row += s.len();
    }
}

fn expect_err(r: Result<Model, ModelError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_and_truncated_safetensors_are_clear_errors() {
    let m = tiny_model(2, 3);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    m.save(&out, StorageDType::F32, &[]).unwrap();

    let st = out.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    let e = expect_err(Model::load(&out, &Device::Cpu));
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");

    std::fs::remove_file(&st).unwrap();
    let e = expect_err(Model::load(&out, &Device::Cpu));
    assert!(e.contains("model.safetensors") && e.contains("no model.safetensors"), "{e}");

    let e = expect_err(Model::load(&dir.path().join("nope"), &Device::Cpu));
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
}

#[test]
fn config_that_disagrees_with_the_weights_is_a_clear_error() {
    let m = tiny_model(2, 4);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    m.save(&out, StorageDType::F32, &[]).unwrap();
    let cfg_path = out.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = serde_json::json!(64);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let e = expect_err(Model::load(&out, &Device::Cpu));
    assert!(e.contains("config.json") && e.contains("gate_proj") && e.contains("disagrees"), "{e}");

    cfg["intermediate_size"] = serde_json::json!(48);
    cfg["num_hidden_layers"] = serde_json::json!(1);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let e = expect_err(Model::load(&out, &Device::Cpu));
    assert!(e.contains("model.layers.1") && e.contains("disagree"), "{e}");
}

#[test]
fn unknown_dtype_flag_is_rejected() {
    let e = "f8".parse::<StorageDType>().unwrap_err().to_string();
    assert!(e.contains("unknown dtype `f8`"), "{e}");
    assert_eq!("bf16".parse::<StorageDType>().unwrap(), StorageDType::BF16);
}

#[test]
fn saving_over_the_input_model_or_a_foreign_directory_is_refused() {
    let m = tiny_model(1, 5);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    m.save(&out, StorageDType::F32, &[]).unwrap();
    let loaded = Model::load(&out, &Device::Cpu).unwrap();
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    for (target, what) in [
        (out.clone(), "is the input"),
        (out.join("sub"), "lies inside"),
        (dir.path().to_path_buf(), "contains the input"),
    ] {
        let e = loaded.save_replacing(&target, StorageDType::F32, &[], Replace::Force).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), before, "the input is untouched");
    let foreign = dir.path().join("notes");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("a.txt"), "keep me").unwrap();
    let e = m.save(&foreign, StorageDType::F32, &[]).unwrap_err().to_string();
    assert!(e.contains("not an earlier slm output"), "{e}");
    assert!(foreign.join("a.txt").exists());
    // A user's own HF directory (no slm stamp) is not replaced either, unless forced.
    std::fs::remove_file(out.join(STAMP_FILE)).unwrap();
    let e = m.save(&out, StorageDType::F32, &[]).unwrap_err().to_string();
    assert!(e.contains("--force"), "{e}");
    m.save_replacing(&out, StorageDType::F32, &[], Replace::Force).unwrap();
    assert!(out.join(STAMP_FILE).is_file());
    // Replacing an earlier output is allowed, and leaves no temporaries.
    m.save(&out.with_file_name("m2"), StorageDType::F32, &[]).unwrap();
    m.save(&out.with_file_name("m2"), StorageDType::F32, &[]).unwrap();
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}
