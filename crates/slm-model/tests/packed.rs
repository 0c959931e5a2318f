//! A packed sequence (one prefix, several branches) gives each branch the logits it gets after the prefix alone.

use candle_core::{IndexOp, Tensor};
use slm_model::testing::{default_model_path, max_abs_diff, tiny_model};
use slm_model::{Batch, Mode, Model, PackedSequence};

/// Logits at every position of `prefix ++ branch`, computed alone.
fn alone(m: &Model, prefix: &[u32], branch: &[u32], mode: Mode) -> Tensor {
    let seq: Vec<u32> = prefix.iter().chain(branch).copied().collect();
    let pos: Vec<usize> = (0..seq.len()).collect();
    m.forward(&[seq], &[pos], false, mode).unwrap().logits.unwrap()
}

fn check_packed(m: &Model, packs: &[PackedSequence], mode: Mode, tol: f32) {
    let batch = Batch::packed(&m.spec, packs, &m.device).unwrap();
    // Ask for every position of every `prefix ++ branch`, in the packed layout.
    let positions: Vec<Vec<usize>> = packs
        .iter()
        .map(|p| {
            (0..p.branches.len())
                .flat_map(|b| (0..p.prefix.len() + p.branches[b].len()).map(move |k| p.index_of(b, k)))
                .collect()
        })
        .collect();
    let logits = m.forward_batch(&batch, &positions, false, mode).unwrap().logits.unwrap();
    let mut row = 0;
    for p in packs {
        for br in &p.branches {
            let want = alone(m, &p.prefix, br, mode);
            let n = want.dim(0).unwrap();
            let got = logits.i(row..row + n).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d <= tol, "packed vs alone: max |diff| {d} > {tol}");
            row += n;
        }
    }
    assert_eq!(row, logits.dim(0).unwrap());
}

#[test]
fn packed_branches_equal_running_each_branch_alone_tiny_model() {
    let m = tiny_model(3, 11);
    let packs = vec![
        PackedSequence { prefix: vec![1, 2, 3, 4, 5], branches: vec![vec![6, 7], vec![8], vec![9, 10, 11, 12]] },
        PackedSequence { prefix: vec![13], branches: vec![vec![14, 15, 16]] },
    ];
    for mode in [Mode::Inference, Mode::Differentiable] {
        check_packed(&m, &packs, mode, 1e-5);
    }
}

#[test]
fn packed_branches_equal_running_each_branch_alone_default_model() {
    let m = Model::load(&default_model_path(), &candle_core::Device::Cpu).unwrap();
    let tok = m.tokenizer().unwrap();
    let enc = |s: &str| tok.encode(s).unwrap();
    let packs = vec![
        PackedSequence {
            prefix: enc("Question: Which gas do plants take in from the air?\nAnswer:"),
            branches: vec![enc(" carbon dioxide"), enc(" oxygen"), enc(" nitrogen and a little argon")],
        },
        PackedSequence { prefix: enc("The capital of France is"), branches: vec![enc(" Paris.")] },
    ];
    check_packed(&m, &packs, Mode::Inference, 1e-4);
}

#[test]
fn one_branch_packed_is_the_plain_sequence() {
    let m = tiny_model(2, 5);
    let plain = m.forward(&[vec![3, 1, 4, 1, 5]], &[vec![0, 1, 2, 3, 4]], false, Mode::Inference).unwrap();
    let packs = [PackedSequence { prefix: vec![3, 1, 4], branches: vec![vec![1, 5]] }];
    let batch = Batch::packed(&m.spec, &packs, &m.device).unwrap();
    let packed = m.forward_batch(&batch, &[vec![0, 1, 2, 3, 4]], false, Mode::Inference).unwrap();
    assert_eq!(max_abs_diff(&plain.logits.unwrap(), &packed.logits.unwrap()), 0.0);
}
