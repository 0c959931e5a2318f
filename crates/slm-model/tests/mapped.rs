//! Layers read when used ([`Residency::Mapped`]) against layers read at load: the same tensors bit for bit, the
//! same logits, the same bytes written; nothing of a layer is held until it is used; a bad layer is an error
//! naming its tensor when it is read.

use candle_core::{DType, Device, Tensor};
use slm_model::{Mode, Model, Residency, StorageDType};

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn sequences(m: &Model) -> Vec<Vec<u32>> {
    let tok = m.tokenizer().unwrap();
    ["The capital of France is", "Layers are read when they are used, one at a time, and dropped."]
        .iter()
        .map(|s| tok.encode(s).unwrap())
        .collect()
}

fn logits(m: &Model, seqs: &[Vec<u32>]) -> Vec<u32> {
    let pos: Vec<Vec<usize>> = seqs.iter().map(|s| (0..s.len()).collect()).collect();
    bits(&m.forward(seqs, &pos, false, Mode::Inference).unwrap().logits.unwrap())
}

/// Every file of an HF directory that holds weights or the config, with its bytes.
fn weight_files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.ends_with(".safetensors") || n.ends_with(".index.json") || n == "config.json"
        })
        .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn mapped_gguf_layers_equal_resident_ones_bit_for_bit() {
    let path = slm_model::testing::default_model_path();
    let resident = Model::load(&path, &Device::Cpu).unwrap();
    let mapped = Model::load_mapped(&path, &Device::Cpu).unwrap();
    assert!(resident.weights.all_resident());
    assert!(mapped.weights.layers.iter().all(|s| !s.is_resident()), "no layer is read at load");
    for i in 0..resident.spec.num_layers() {
        let (a, b) = (resident.weights.layer(i).unwrap(), mapped.weights.layer(i).unwrap());
        for ((pa, ta), (pb, tb)) in a.parts().into_iter().zip(b.parts()) {
            assert_eq!(pa, pb);
            assert_eq!(bits(ta), bits(tb), "layer {i} {pa:?}");
        }
    }
    let seqs = sequences(&resident);
    assert_eq!(logits(&resident, &seqs), logits(&mapped, &seqs));
    // Using a layer does not make it resident: the next use reads it again.
    assert!(mapped.weights.layers.iter().all(|s| !s.is_resident()));
    assert_eq!(mapped.storage_dtype(), StorageDType::F32);
}

#[test]
fn mapped_sharded_bf16_directory_gives_the_same_logits_and_writes_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("bf16");
    let dense = Model::load(&slm_model::testing::default_model_path(), &Device::Cpu).unwrap();
    // Shards of 40 MB: several files and an index, so that tensors are found across mapped files.
    dense
        .save_sharded(&src, StorageDType::BF16, 40_000_000, &[], slm_model::output::Replace::SlmOutputOfSameKind)
        .unwrap();
    assert!(src.join("model.safetensors.index.json").exists());
    let resident = Model::load_as(&src, &Device::Cpu, Residency::Resident).unwrap();
    let mapped = Model::load_as(&src, &Device::Cpu, Residency::Mapped).unwrap();
    assert!(!mapped.weights.all_resident());
    assert_eq!(mapped.storage_dtype(), StorageDType::BF16, "the stored dtype is known without reading a layer");
    assert_eq!(mapped.weights.layer(3).unwrap().down_proj.dtype(), DType::BF16);
    let seqs = sequences(&resident);
    assert_eq!(logits(&resident, &seqs), logits(&mapped, &seqs));
    // Written layer by layer from the mapped files: the same bytes as from memory.
    let (a, b) = (dir.path().join("from-resident"), dir.path().join("from-mapped"));
    for (m, out) in [(&resident, &a), (&mapped, &b)] {
        m.save_sharded(out, StorageDType::BF16, 40_000_000, &[], slm_model::output::Replace::SlmOutputOfSameKind)
            .unwrap();
    }
    let (fa, fb) = (weight_files(&a), weight_files(&b));
    assert!(fa.len() >= 3, "{:?}", fa.iter().map(|f| &f.0).collect::<Vec<_>>());
    assert_eq!(fa, fb);
    // And the same bytes as the directory they were read from (bf16 in, bf16 out: nothing is converted).
    assert_eq!(weight_files(&src), fa);
}

#[test]
fn a_non_finite_layer_weight_is_an_error_naming_it_when_the_mapped_layer_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("tiny");
    let mut m = slm_model::testing::tiny_model(3, 5);
    let w = m.weights.layer_mut(1).unwrap();
    let mut q: Vec<f32> = w.q_proj.flatten_all().unwrap().to_vec1().unwrap();
    q[7] = f32::NAN;
    w.q_proj = Tensor::from_vec(q, w.q_proj.dims(), &Device::Cpu).unwrap();
    m.save(&src, StorageDType::F32, &[]).unwrap();
    let name = "model.layers.1.self_attn.q_proj.weight";
    let e = Model::load(&src, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("model.safetensors"), "{e}");
    // Mapped: the load succeeds (no layer is read); the first use of layer 1 fails, naming the tensor.
    let mapped = Model::load_mapped(&src, &Device::Cpu).unwrap();
    assert!(mapped.weights.layer(0).is_ok());
    let e = mapped.weights.layer(1).unwrap_err().to_string();
    assert!(e.contains(name), "{e}");
    let e = mapped.forward(&[vec![1, 2, 3]], &[vec![2]], false, Mode::Inference).unwrap_err().to_string();
    assert!(e.contains(name), "{e}");
}

#[test]
fn a_bf16_directory_keeps_its_embeddings_and_head_in_bf16_and_upcasts_them_in_chunks_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("bf16");
    let dense = Model::load(&slm_model::testing::default_model_path(), &Device::Cpu).unwrap();
    dense.save(&src, StorageDType::BF16, &[]).unwrap();
    let bf16 = Model::load_as(&src, &Device::Cpu, Residency::Mapped).unwrap();
    // Nothing of the model is held in f32 but the final norm (the compute dtype).
    assert_eq!(bf16.weights.embed_tokens.dtype(), DType::BF16);
    assert_eq!(bf16.weights.lm_head().dtype(), DType::BF16);
    assert_eq!(bf16.compute_dtype(), DType::F32);
    // The reference: the same values upcast to f32 whole (bf16 → f32 is exact), so the head takes the one-matmul
    // path and its gradient candle's autodiff.
    let mut f32m = Model::load_as(&src, &Device::Cpu, Residency::Resident).unwrap();
    f32m.weights = f32m.weights.to(&Device::Cpu, DType::F32).unwrap();
    assert_eq!(f32m.weights.lm_head().dtype(), DType::F32);
    let seqs = sequences(&bf16);
    let pos: Vec<Vec<usize>> = seqs.iter().map(|s| (0..s.len()).collect()).collect();
    let run = |m: &Model| m.forward(&seqs, &pos, true, Mode::Inference).unwrap();
    let (a, b) = (run(&bf16), run(&f32m));
    let scale = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let (la, lb) = (a.logits.unwrap(), b.logits.unwrap());
    assert!(la.dim(1).unwrap() > slm_model::forward::HEAD_CHUNK, "the head is upcast in more than one chunk");
    assert!(slm_model::testing::max_abs_diff(&la, &lb) <= 1e-5 * scale(&lb));
    // The head's loss gradient by hand (bf16, chunked, softmax in f64) against autodiff through the f32 head.
    let fin = b.final_hidden.unwrap();
    let rows = fin.get(1).unwrap().contiguous().unwrap();
    let targets: Vec<u32> = seqs[1][1..].iter().copied().chain([seqs[1][0]]).collect();
    let (loss_a, ga) = bf16.head_ce_gradient(&rows, &targets, 0.5).unwrap();
    let (loss_b, gb) = f32m.head_ce_gradient(&rows, &targets, 0.5).unwrap();
    assert!((loss_a - loss_b).abs() <= 1e-6 * loss_b, "loss {loss_a} vs {loss_b}");
    let d = slm_model::testing::max_abs_diff(&ga, &gb);
    assert!(d <= 2e-5 * scale(&gb), "gradient differs by {d} (largest entry {})", scale(&gb));
    // Bad targets are errors, not panics.
    assert!(bf16.head_ce_gradient(&rows, &targets[1..], 1.0).is_err());
    let mut bad = targets.clone();
    bad[0] = 49152;
    assert!(bf16.head_ce_gradient(&rows, &bad, 1.0).unwrap_err().to_string().contains("outside the vocabulary"));
}

#[test]
fn auto_residency_reads_a_model_that_fits_at_load_and_parses_from_the_flag() {
    let path = slm_model::testing::default_model_path();
    // 0.5 GB of f32 layers: far below half of any test machine's available memory.
    let auto = Model::load_as(&path, &Device::Cpu, Residency::Auto).unwrap();
    assert!(auto.weights.all_resident());
    assert_eq!("auto".parse::<Residency>().unwrap(), Residency::Auto);
    assert_eq!("Mapped".parse::<Residency>().unwrap(), Residency::Mapped);
    let err = "swap".parse::<Residency>().unwrap_err().to_string();
    assert!(err.contains("resident, mapped or auto"), "{err}");
}
