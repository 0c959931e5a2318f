//! KV-cached greedy generation gives the logits of the full forward pass at every step.

use slm_model::forward::Mode;
use slm_model::testing::{max_abs_diff, tiny_model};
use slm_model::Model;

/// The logits the full (uncached) forward pass gives at the positions that chose each generated token.
fn check_against_full_forward(m: &Model, prompt: &[u32], steps: usize, tol: f32) {
    let g = m.generate_greedy(prompt, steps, true).unwrap();
    assert_eq!(g.tokens.len(), steps + 1);
    let mut seq = prompt.to_vec();
    seq.extend_from_slice(&g.tokens[..steps]);
    let positions: Vec<usize> = (prompt.len() - 1..seq.len()).collect();
    let full = m.forward(&[seq], &[positions], false, Mode::Inference).unwrap().logits.unwrap();
    for (k, l) in g.logits.iter().enumerate() {
        let d = max_abs_diff(l, &full.get(k).unwrap());
        assert!(d <= tol, "step {k}: cached and full logits differ by {d}");
        let argmax = full.get(k).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(g.tokens[k], argmax, "step {k}: greedy token");
    }
}

#[test]
fn cached_generation_equals_the_full_forward_pass_on_a_tiny_model() {
    let m = tiny_model(3, 21);
    check_against_full_forward(&m, &[3, 9, 27, 17, 51, 25], 10, 1e-5);
    // One-token prompt: no mask at all.
    check_against_full_forward(&m, &[5], 4, 1e-5);
}

#[test]
fn cached_generation_equals_the_full_forward_pass_on_the_default_model() {
    let m = Model::load(&slm_model::testing::default_model_path(), &candle_core::Device::Cpu).unwrap();
    let prompt = m.tokenizer().unwrap().encode("The capital of France is").unwrap();
    check_against_full_forward(&m, &prompt, 6, 1e-3);
}

#[test]
fn generation_rejects_an_empty_prompt_and_too_many_tokens() {
    let m = tiny_model(1, 2);
    assert!(m.generate_greedy(&[], 3, false).unwrap_err().to_string().contains("non-empty prompt"));
    assert!(m.generate_greedy(&[1, 2], 255, false).unwrap_err().to_string().contains("exceed max_position_embeddings"));
}

/// The argmax of a logits row (the first of equal maxima).
fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn batched_generation_gives_each_rows_full_forward_logits() {
    let m = tiny_model(3, 23);
    let prompts = vec![vec![3u32, 9, 27, 17], vec![5, 5, 60, 1], vec![40, 2, 8, 33]];
    let mut seen: Vec<Vec<Vec<f32>>> = vec![vec![]; 3];
    let out = m
        .generate_batch(&prompts, 7, &mut |r, l| {
            seen[r].push(l.to_vec());
            argmax(l)
        })
        .unwrap();
    for (r, p) in prompts.iter().enumerate() {
        assert_eq!(out[r].len(), 7);
        // Each row is what the uncached forward pass of that row alone gives, step by step.
        let mut seq = p.clone();
        seq.extend_from_slice(&out[r][..6]);
        let positions: Vec<usize> = (p.len() - 1..seq.len()).collect();
        let full = m.forward(&[seq], &[positions], false, Mode::Inference).unwrap().logits.unwrap();
        for (k, l) in seen[r].iter().enumerate() {
            let f = full.get(k).unwrap().to_vec1::<f32>().unwrap();
            let d = f.iter().zip(l).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-5, "row {r} step {k}: batched and full logits differ by {d}");
        }
        // And batch-1 greedy generation agrees.
        assert_eq!(m.generate_greedy(p, 6, false).unwrap().tokens, out[r]);
    }
    let e = m.generate_batch(&[vec![1, 2], vec![3]], 2, &mut |_, l| argmax(l)).unwrap_err().to_string();
    assert!(e.contains("prompts of one length"), "{e}");
}
