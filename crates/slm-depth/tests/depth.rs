//! Depth pruning: merge operators, plans, the sliding-window search against an oracle, incremental scoring,
//! target search and bad input.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use slm_depth::{
    apply, layers_for_ratio, merge_window, plan_depth, sliding_merge, Calibration, Candidate, Criterion, DepthPlan,
    MergeOp, Method, Settings, Stop,
};
use slm_model::testing::{default_model_path, max_abs_diff, tiny_model};
use slm_model::{LayerWeights, Mode, Model};

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

fn same_layer(a: &LayerWeights, b: &LayerWeights) -> bool {
    a.parts().iter().zip(b.parts().iter()).all(|((_, x), (_, y))| bits(x) == bits(y))
}

fn logits(m: &Model, ids: &[u32]) -> Tensor {
    m.logits_all(ids).unwrap()
}

const IDS: [u32; 9] = [3, 14, 15, 9, 26, 5, 35, 8, 9];

#[test]
fn a_one_layer_window_is_the_identity_for_every_operator() {
    let m = tiny_model(4, 1);
    for op in MergeOp::ALL {
        let (spec, w) = merge_window(&m.weights.load_layers(2..3).unwrap(), &m.spec.layers[2..3], 2, op).unwrap();
        assert_eq!(spec, m.spec.layers[2]);
        assert!(same_layer(&w, &m.weights.layer(2).unwrap()), "{op}");
    }
    let plan = DepthPlan::new(4, vec![], vec![], MergeOp::Paper).unwrap();
    assert_eq!(max_abs_diff(&logits(&apply(&m, &plan).unwrap(), &IDS), &logits(&m, &IDS)), 0.0);
}

#[test]
fn delete_equals_dropping_the_upper_layers_of_the_window() {
    let m = tiny_model(5, 2);
    let merged = apply(&m, &DepthPlan::new(5, vec![[1, 3]], vec![], MergeOp::Delete).unwrap()).unwrap();
    let dropped = apply(&m, &DepthPlan::new(5, vec![], vec![2, 3], MergeOp::Delete).unwrap()).unwrap();
    assert_eq!(merged.spec.num_layers(), 3);
    assert_eq!(max_abs_diff(&logits(&merged, &IDS), &logits(&dropped, &IDS)), 0.0);
    // `top` keeps the top layer whole: the same as dropping the lower ones.
    let top = apply(&m, &DepthPlan::new(5, vec![[1, 3]], vec![], MergeOp::Top).unwrap()).unwrap();
    let dropped = apply(&m, &DepthPlan::new(5, vec![], vec![1, 2], MergeOp::Delete).unwrap()).unwrap();
    assert_eq!(max_abs_diff(&logits(&top, &IDS), &logits(&dropped, &IDS)), 0.0);
}

#[test]
fn paper_merge_of_equal_layers_returns_that_layer_and_reference_is_top_projections_with_lowest_norms() {
    let mut m = tiny_model(4, 3);
    let l1 = m.weights.layer(1).unwrap().into_owned();
    *m.weights.layer_mut(2).unwrap() = l1.clone();
    *m.weights.layer_mut(3).unwrap() = l1.clone();
    let (_, w) = merge_window(&m.weights.load_layers(1..4).unwrap(), &m.spec.layers[1..4], 1, MergeOp::Paper).unwrap();
    assert!(same_layer(&w, &l1));

    let m = tiny_model(4, 4);
    let (_, r) =
        merge_window(&m.weights.load_layers(0..3).unwrap(), &m.spec.layers[0..3], 0, MergeOp::Reference).unwrap();
    assert_eq!(bits(&r.q_proj), bits(&m.weights.layer(2).unwrap().into_owned().q_proj));
    assert_eq!(bits(&r.down_proj), bits(&m.weights.layer(2).unwrap().into_owned().down_proj));
    assert_eq!(bits(&r.input_layernorm), bits(&m.weights.layer(0).unwrap().into_owned().input_layernorm));
    assert_eq!(
        bits(&r.post_attention_layernorm),
        bits(&m.weights.layer(0).unwrap().into_owned().post_attention_layernorm)
    );
    // paper = θ0 + (θ1 − θ0) + (θ2 − θ0), checked element by element by hand-written arithmetic.
    let (_, p) = merge_window(&m.weights.load_layers(0..3).unwrap(), &m.spec.layers[0..3], 0, MergeOp::Paper).unwrap();
    let get = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (a, b, c) = (
        get(&m.weights.layer(0).unwrap().into_owned().up_proj),
        get(&m.weights.layer(1).unwrap().into_owned().up_proj),
        get(&m.weights.layer(2).unwrap().into_owned().up_proj),
    );
    let want: Vec<f32> = (0..a.len()).map(|i| (a[i] + (b[i] - a[i])) + (c[i] - a[i])).collect();
    assert_eq!(get(&p.up_proj), want);
    // average = mean of the window, norms too.
    let (_, v) =
        merge_window(&m.weights.load_layers(0..3).unwrap(), &m.spec.layers[0..3], 0, MergeOp::Average).unwrap();
    let (na, nb, nc) = (
        get(&m.weights.layer(0).unwrap().into_owned().input_layernorm),
        get(&m.weights.layer(1).unwrap().into_owned().input_layernorm),
        get(&m.weights.layer(2).unwrap().into_owned().input_layernorm),
    );
    for (i, x) in get(&v.input_layernorm).iter().enumerate() {
        assert!((x - (na[i] + nb[i] + nc[i]) / 3.0).abs() < 1e-6);
    }
}

#[test]
fn parameter_counts_after_apply_are_as_computed() {
    let m = tiny_model(6, 5);
    // Hand count per tiny layer: 2·32 norms + 32·(32+16+16+32) attention + 3·32·48 MLP = 64 + 3072 + 4608.
    let per_layer = 64 + 3072 + 4608;
    let plan = DepthPlan::new(6, vec![[1, 3]], vec![5], MergeOp::Paper).unwrap();
    assert_eq!(plan.layers_removed(), 3);
    assert_eq!(plan.output_layers(), vec![(0, 0), (1, 3), (4, 4)]);
    let p = apply(&m, &plan).unwrap();
    assert_eq!(p.spec.num_layers(), 3);
    assert_eq!(m.spec.num_parameters() - p.spec.num_parameters(), 3 * per_layer);
}

#[test]
fn merging_layers_of_different_widths_is_a_clear_error() {
    let mut m = tiny_model(3, 6);
    m.spec.layers[1].intermediate_size = 40;
    let l = m.weights.layer_mut(1).unwrap();
    l.gate_proj = l.gate_proj.narrow(0, 0, 40).unwrap();
    l.up_proj = l.up_proj.narrow(0, 0, 40).unwrap();
    l.down_proj = l.down_proj.narrow(1, 0, 40).unwrap();
    let e = merge_window(&m.weights.load_layers(0..2).unwrap(), &m.spec.layers[0..2], 0, MergeOp::Paper)
        .unwrap_err()
        .to_string();
    assert!(e.contains("0..=1") && e.contains("equal shapes"), "{e}");
    assert!(merge_window(&m.weights.load_layers(0..2).unwrap(), &m.spec.layers[0..2], 0, MergeOp::Delete).is_ok());
}

/// A similarity oracle from a table keyed by (committed windows, candidate window); unknown keys fail the test.
type Entry<'a> = (&'a [[usize; 2]], [usize; 2], f64);

fn table(entries: &[Entry]) -> impl FnMut(&[[usize; 2]]) -> slm_depth::error::Result<f64> {
    let map: HashMap<(Vec<[usize; 2]>, [usize; 2]), f64> =
        entries.iter().map(|(c, w, s)| ((c.to_vec(), *w), *s)).collect();
    move |merges: &[[usize; 2]]| {
        let (w, committed) = merges.split_last().unwrap();
        Ok(*map.get(&(committed.to_vec(), *w)).unwrap_or_else(|| panic!("unexpected candidate {merges:?}")))
    }
}

#[test]
fn sliding_search_follows_the_reference_loop() {
    // 7 layers: the first window is [4, 5] (layer 6 is never merged).
    let mut oracle = table(&[
        (&[], [4, 5], 0.9),
        (&[], [3, 5], 0.8),
        (&[], [2, 5], 0.5), // fails: commit [3, 5], restart at hi = 2 (the one-layer window passes unscored)
        (&[[3, 5]], [1, 2], 0.6), // equal to the threshold: strict '>' fails, a two-layer failure slides down
        (&[[3, 5]], [0, 1], 0.95), // passes and lo reaches -1: the open window is dropped
    ]);
    let r = sliding_merge(7, 0.6, &mut oracle).unwrap();
    assert_eq!(r.merges, vec![[3, 5]]);
    let scored: Vec<(usize, usize, bool)> = r.steps.iter().map(|s| (s.lo, s.hi, s.passed)).collect();
    assert_eq!(scored, vec![(4, 5, true), (3, 5, true), (2, 5, false), (1, 2, false), (0, 1, true)]);
    // The reference also "scores" the one-layer window [2, 2] after the commit.
    assert_eq!(r.reference_evaluations, 6);
}

#[test]
fn sliding_search_window_reaching_layer_zero_and_consecutive_commits() {
    // Everything passes: the window grows to layer 0 and is never committed.
    let mut all = |_: &[[usize; 2]]| -> slm_depth::error::Result<f64> { Ok(1.0) };
    assert!(sliding_merge(6, 0.5, &mut all).unwrap().merges.is_empty());
    // Nothing passes: slide down one layer at a time, no commit.
    let mut none = |_: &[[usize; 2]]| -> slm_depth::error::Result<f64> { Ok(0.0) };
    let r = sliding_merge(6, 0.5, &mut none).unwrap();
    assert!(r.merges.is_empty());
    assert_eq!(r.steps.iter().map(|s| (s.lo, s.hi)).collect::<Vec<_>>(), vec![(3, 4), (2, 3), (1, 2), (0, 1)]);
    // Two commits: [3, 4] then [1, 2] (the window [0, 2] fails).
    let mut two = table(&[(&[], [3, 4], 0.9), (&[], [2, 4], 0.1), (&[[3, 4]], [1, 2], 0.9), (&[[3, 4]], [0, 2], 0.1)]);
    assert_eq!(sliding_merge(6, 0.5, &mut two).unwrap().merges, vec![[3, 4], [1, 2]]);
}

#[test]
fn bad_thresholds_ratios_and_targets_are_clear_errors() {
    let mut any = |_: &[[usize; 2]]| -> slm_depth::error::Result<f64> { Ok(1.0) };
    for t in [0.0, -0.1, 1.5, f64::NAN] {
        let e = sliding_merge(10, t, &mut any).unwrap_err().to_string();
        assert!(e.contains("threshold must be in (0, 1]"), "{e}");
    }
    assert!(sliding_merge(10, 1.0, &mut any).is_ok());
    let m = tiny_model(6, 7);
    for r in [0.0, 1.0, -0.2, 1.3] {
        let e = layers_for_ratio(&m.spec, r).unwrap_err().to_string();
        assert!(e.contains("target ratio must be in (0, 1)"), "{e}");
    }
    // 0.9 of the parameters would leave fewer than two layers.
    assert!(layers_for_ratio(&m.spec, 0.9).unwrap_err().to_string().contains("at least two must remain"));
    let windows = vec![vec![1u32, 2, 3, 4, 5, 6], vec![7, 8, 9, 10, 11, 12]];
    let mut cal = Calibration::new(&m, windows, MergeOp::Reference).unwrap();
    let e = plan_depth(&mut cal, &Settings::new(Method::ShortGpt, Stop::TargetLayers(5))).unwrap_err().to_string();
    assert!(e.contains("at least two must remain"), "{e}");
    let e = plan_depth(&mut cal, &Settings::new(Method::ShortGpt, Stop::Threshold(0.5))).unwrap_err().to_string();
    assert!(e.contains("--target-layers"), "{e}");
    assert!(DepthPlan::new(6, vec![[2, 4], [4, 5]], vec![], MergeOp::Paper).is_err());
    assert!(DepthPlan::new(6, vec![[3, 3]], vec![], MergeOp::Paper).is_err());
    assert!(DepthPlan::new(6, vec![], vec![6], MergeOp::Paper).is_err());
    assert!("median".parse::<MergeOp>().is_err() && "magic".parse::<Method>().is_err());
}

fn default_calibration(model: &Model, n: usize, len: usize) -> Vec<Vec<u32>> {
    let corpus = slm_model::testing::data_dir().join("lambada_openai.test.jsonl");
    slm_model::calib::calibration_windows(&corpus, model.tokenizer().unwrap(), n, len, 1234).unwrap()
}

#[test]
fn incremental_scores_equal_full_recomputation_on_the_default_model() {
    let model = Model::load(&default_model_path(), &Device::Cpu).unwrap();
    // 10 × 63 = 630 predicting positions: more than one LM-head chunk for KL and NLL.
    let windows = default_calibration(&model, 10, 64);
    assert!(windows.len() * 63 > slm_depth::score::LM_CHUNK);
    let mut inc = Calibration::new(&model, windows.clone(), MergeOp::Reference).unwrap();
    let mut full = Calibration::new(&model, windows.clone(), MergeOp::Reference).unwrap();
    full.incremental = false;
    let cands = [
        Candidate::merges(vec![[20, 24]]),
        Candidate::merges(vec![[3, 5], [20, 24]]),
        Candidate::removed(vec![7, 12]),
        Candidate { merges: vec![[25, 27]], removed: vec![10] },
    ];
    for c in &cands {
        for crit in Criterion::ALL {
            let (a, b) = (inc.similarity(crit, c).unwrap(), full.similarity(crit, c).unwrap());
            assert!((a - b).abs() <= 1e-5, "{c:?} {crit:?}: {a} vs {b}");
        }
        let (a, b) = (inc.nll(c).unwrap(), full.nll(c).unwrap());
        assert!((a - b).abs() / b <= 1e-5, "{c:?} nll: {a} vs {b}");
    }
    assert!(inc.layer_forwards < full.layer_forwards);
    assert_eq!(inc.full_layer_forwards, full.full_layer_forwards);
    // The candidate's output is the applied model's output.
    let plan = DepthPlan::new(30, vec![[20, 24]], vec![], MergeOp::Reference).unwrap();
    let pruned = apply(&model, &plan).unwrap();
    let out = pruned.forward(&windows, &vec![vec![]; windows.len()], true, Mode::Inference).unwrap();
    let fin = inc.candidate_final(&Candidate::merges(vec![[20, 24]])).unwrap();
    assert!(max_abs_diff(&fin, &out.final_hidden.unwrap()) <= 1e-4);
    // KL and NLL (computed in chunks of positions) equal the same sums over the whole models' log-softmax.
    let pos: Vec<Vec<usize>> = windows.iter().map(|w| (0..w.len() - 1).collect()).collect();
    let logp = |m: &Model| {
        let l = m.forward(&windows, &pos, false, Mode::Inference).unwrap().logits.unwrap();
        candle_nn::ops::log_softmax(&l, candle_core::D::Minus1).unwrap().to_dtype(candle_core::DType::F64).unwrap()
    };
    let (p, q) = (logp(&model), logp(&pruned));
    let kl = (p.exp().unwrap() * (&p - &q).unwrap())
        .unwrap()
        .sum(1)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let got = inc.similarity(Criterion::Kl, &Candidate::merges(vec![[20, 24]])).unwrap();
    assert!((got - (-kl).exp()).abs() <= 1e-5, "kl similarity {got} vs {}", (-kl).exp());
    let targets: Vec<u32> = windows.iter().flat_map(|w| w[1..].iter().copied()).collect();
    let n = targets.len();
    let idx = Tensor::from_vec(targets, (n, 1), &Device::Cpu).unwrap();
    let nll = -q.gather(&idx, 1).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let got = inc.nll(&Candidate::merges(vec![[20, 24]])).unwrap();
    assert!((got - nll).abs() / nll <= 1e-5, "nll {got} vs {nll}");
    // The dense model is its own perfect match.
    assert!((inc.similarity(Criterion::Cosine, &Candidate::default()).unwrap() - 1.0).abs() < 1e-9);
}

#[test]
fn target_modes_land_within_one_layer_of_the_request() {
    let model = Model::load(&default_model_path(), &Device::Cpu).unwrap();
    // 35% of 134.5M parameters at 3.54M per layer: 13.3 → 13 layers; 20%: 7.6 → 8.
    assert_eq!(layers_for_ratio(&model.spec, 0.35).unwrap(), 13);
    assert_eq!(layers_for_ratio(&model.spec, 0.20).unwrap(), 8);
    let windows = default_calibration(&model, 2, 48);
    let mut cal = Calibration::new(&model, windows, MergeOp::Reference).unwrap();
    let n = layers_for_ratio(&model.spec, 0.20).unwrap();
    let slm = plan_depth(&mut cal, &Settings::new(Method::Slm, Stop::TargetLayers(n))).unwrap();
    assert!(slm.plan.layers_removed().abs_diff(n) <= 1, "{:?}", slm.plan);
    let t = slm.threshold.unwrap();
    assert!(t > 0.0 && t <= 1.0);
    for method in [Method::ShortGpt, Method::Ppl, Method::Sleb] {
        let o = plan_depth(&mut cal, &Settings::new(method, Stop::TargetLayers(n))).unwrap();
        assert_eq!(o.plan.layers_removed(), n, "{method:?}");
        let pruned = apply(&model, &o.plan).unwrap();
        assert_eq!(pruned.spec.num_layers(), 30 - n);
    }
}

#[test]
fn block_cosine_of_one_layer_is_one_minus_block_influence() {
    let m = tiny_model(4, 8);
    let windows = vec![vec![1u32, 5, 9, 13, 17, 21], vec![2, 6, 10, 14, 18, 22]];
    let mut cal = Calibration::new(&m, windows, MergeOp::Top).unwrap();
    let bi = slm_depth::baselines::block_influence(&cal).unwrap();
    for (i, b) in bi.iter().enumerate() {
        assert!((cal.block_cosine(i, i).unwrap() - (1.0 - b)).abs() < 1e-12);
    }
    // A candidate's block-cosine score is its worst window's; no forward pass is run.
    let before = cal.layer_forwards;
    let s = cal.similarity(Criterion::BlockCosine, &Candidate::merges(vec![[0, 1], [2, 3]])).unwrap();
    let want = cal.block_cosine(0, 1).unwrap().min(cal.block_cosine(2, 3).unwrap());
    assert_eq!(s, want);
    assert_eq!(cal.layer_forwards, before);
}

#[test]
fn refit_lowers_the_calibration_error_it_minimises() {
    // Drop layer 2 of 4: layer 1 then stands in for layers 1..=2 and its down_proj is re-fitted to reproduce the
    // dense stream after layer 2 on the calibration windows.
    let m = tiny_model(4, 9);
    let windows: Vec<Vec<u32>> = (0..6).map(|s| (0..24).map(|i| ((i * 7 + s * 13) % 64) as u32).collect()).collect();
    let cal = Calibration::new(&m, windows.clone(), MergeOp::Delete).unwrap();
    let plan = DepthPlan::new(4, vec![], vec![2], MergeOp::Delete).unwrap();
    let err = |model: &Model| {
        let out = model.forward(&windows, &vec![vec![]; windows.len()], true, Mode::Inference).unwrap();
        // hidden[2] is the pruned model's output of its layer 1; compare with the dense output of layer 2 as the
        // fit does: first position left out, each token's error relative to its dense target's norm.
        let target = cal.dense_hidden[3].narrow(1, 1, 23).unwrap();
        let d = (out.hidden[2].narrow(1, 1, 23).unwrap() - &target).unwrap();
        let norm = target.sqr().unwrap().sum_keepdim(2).unwrap();
        d.sqr().unwrap().sum_keepdim(2).unwrap().div(&norm).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
    };
    let plain = apply(&m, &plan).unwrap();
    let refit = slm_depth::refit::apply_with_refit(&cal, &plan, 1e-3).unwrap();
    let (e0, e1) = (err(&plain), err(&refit));
    eprintln!("weighted calibration error: plain {e0}, refit {e1}");
    assert!(e1 < 0.7 * e0, "refit error {e1} vs plain {e0}");
    // Only layer 1's down_proj changed.
    assert_ne!(
        bits(&refit.weights.layer(1).unwrap().into_owned().down_proj),
        bits(&plain.weights.layer(1).unwrap().into_owned().down_proj)
    );
    assert!(same_layer(&refit.weights.layer(0).unwrap(), &plain.weights.layer(0).unwrap()));
    assert!(same_layer(&refit.weights.layer(2).unwrap(), &plain.weights.layer(2).unwrap()));
    assert!(slm_depth::refit::apply_with_refit(&cal, &plan, 0.0).is_err());
}

#[test]
fn cholesky_solves_a_hand_worked_system() {
    // [[4, 2], [2, 3]] x = [[2, 1], [1, 2]]  →  x = [[0.5, -0.125], [0, 0.75]].
    let mut g = vec![4.0, 2.0, 2.0, 3.0];
    let mut b = vec![2.0, 1.0, 1.0, 2.0];
    slm_depth::refit::cholesky_solve(&mut g, &mut b, 2, 2).unwrap();
    let want = [0.5, -0.125, 0.0, 0.75];
    for (x, w) in b.iter().zip(want) {
        assert!((x - w).abs() < 1e-12, "{b:?}");
    }
}

/// Every set of disjoint windows of at most `max_window` layers inside `0..=top`, with what it removes and costs.
fn all_window_sets(
    lo: usize,
    top: usize,
    max_window: usize,
    cost: &dyn Fn(usize, usize) -> f64,
    out: &mut Vec<(usize, f64, Vec<[usize; 2]>)>,
    acc: (usize, f64, Vec<[usize; 2]>),
) {
    if lo >= top {
        out.push(acc);
        return;
    }
    all_window_sets(lo + 1, top, max_window, cost, out, acc.clone());
    for hi in lo + 1..=top.min(lo + max_window - 1) {
        let mut w = acc.2.clone();
        w.push([lo, hi]);
        all_window_sets(hi + 1, top, max_window, cost, out, (acc.0 + hi - lo, acc.1 + cost(lo, hi), w));
    }
}

#[test]
fn dp_windows_finds_the_least_cost_set_that_brute_force_finds() {
    // Pseudo-random costs on 10 layers (windows inside 0..=8); every target and window cap against enumeration.
    let cost = |lo: usize, hi: usize| (((lo * 7919 + hi * 104_729) % 1000) as f64) / 1000.0 + 0.01 * (hi - lo) as f64;
    for max_window in [2, 3, 5, 9] {
        let mut sets = Vec::new();
        all_window_sets(0, 8, max_window, &cost, &mut sets, (0, 0.0, Vec::new()));
        for target in 1..=8 {
            let mut asked = 0;
            let mut f = |lo: usize, hi: usize| -> slm_depth::error::Result<f64> {
                asked += 1;
                assert!(hi - lo < max_window && hi <= 8, "asked for [{lo}, {hi}]");
                Ok(cost(lo, hi))
            };
            let best = sets.iter().filter(|s| s.0 == target).map(|s| s.1).fold(f64::INFINITY, f64::min);
            match slm_depth::dp_windows(10, target, max_window, &mut f).unwrap() {
                Some((windows, total)) => {
                    assert!((total - best).abs() < 1e-9, "cap {max_window} target {target}: {total} vs {best}");
                    let again: f64 = windows.iter().map(|&[lo, hi]| cost(lo, hi)).sum();
                    assert!((again - total).abs() < 1e-9);
                    assert_eq!(windows.iter().map(|[lo, hi]| hi - lo).sum::<usize>(), target);
                    assert!(windows.windows(2).all(|p| p[0][0] > p[1][1]), "disjoint, top first: {windows:?}");
                    assert!(asked > 0);
                }
                None => assert!(best.is_infinite(), "cap {max_window} target {target}"),
            }
        }
    }
    // Ties go to the lower layer left alone: with equal costs, the window sits as high as it can.
    let mut flat = |_: usize, _: usize| -> slm_depth::error::Result<f64> { Ok(1.0) };
    assert_eq!(slm_depth::dp_windows(6, 1, 2, &mut flat).unwrap().unwrap().0, vec![[3, 4]]);
    // Bad input.
    let mut ok = |_: usize, _: usize| -> slm_depth::error::Result<f64> { Ok(0.5) };
    for (l, n, w, want) in
        [(6, 0, 3, "at least one must go"), (6, 5, 3, "at least two must remain"), (6, 2, 1, "at least 2 layers")]
    {
        let e = slm_depth::dp_windows(l, n, w, &mut ok).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let mut negative = |_: usize, _: usize| -> slm_depth::error::Result<f64> { Ok(-0.5) };
    assert!(slm_depth::dp_windows(6, 1, 3, &mut negative).unwrap_err().to_string().contains("finite and ≥ 0"));
}

/// 1 − mean over rows of the cosine between rows of `a` and `b` (`[B, T, d]`), by plain arithmetic.
fn one_minus_token_cosine(a: &Tensor, b: &Tensor) -> f64 {
    let d = a.dim(2).unwrap();
    let (a, b) =
        (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let rows = a.len() / d;
    let mut sum = 0.0;
    for r in 0..rows {
        let (x, y) = (&a[r * d..(r + 1) * d], &b[r * d..(r + 1) * d]);
        let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
        let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        let ny: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum::<f64>().sqrt();
        sum += dot / (nx * ny);
    }
    1.0 - sum / rows as f64
}

#[test]
fn window_cost_is_the_applied_models_local_error_and_block_influence_for_delete() {
    let m = tiny_model(6, 21);
    let windows = vec![vec![1u32, 5, 9, 13, 17, 21, 4], vec![2, 6, 10, 14, 18, 22, 7]];
    let dense = m.forward(&windows, &vec![vec![]; 2], true, Mode::Inference).unwrap().hidden;
    // `delete` on [i − 1, i] is ShortGPT's block influence of layer i, with no forward pass.
    let mut del = Calibration::new(&m, windows.clone(), MergeOp::Delete).unwrap();
    let bi = slm_depth::baselines::block_influence(&del).unwrap();
    let before = del.layer_forwards;
    for i in 1..5 {
        assert!((del.window_cost(i - 1, i).unwrap() - bi[i]).abs() < 1e-9, "layer {i}");
    }
    assert_eq!(del.layer_forwards, before);
    // For every operator, the cost of [lo, hi] is what the applied model's fused layer does: run the pruned model,
    // and compare its stream after the fused layer (at index lo + 1) with the dense stream after hi.
    for op in [MergeOp::Top, MergeOp::Average, MergeOp::Delete] {
        let mut cal = Calibration::new(&m, windows.clone(), op).unwrap();
        for (lo, hi) in [(1, 3), (0, 1), (2, 4)] {
            let pruned = apply(&m, &DepthPlan::new(6, vec![[lo, hi]], vec![], op).unwrap()).unwrap();
            let h = pruned.forward(&windows, &vec![vec![]; 2], true, Mode::Inference).unwrap().hidden;
            let want = one_minus_token_cosine(&h[lo + 1], &dense[hi + 1]);
            let got = cal.window_cost(lo, hi).unwrap();
            assert!((got - want).abs() < 1e-5, "{op} [{lo}, {hi}]: {got} vs {want}");
        }
        assert!(cal.window_cost(3, 3).is_err() && cal.window_cost(4, 6).is_err());
    }
}

#[test]
fn slm_dp_removes_the_target_and_keeps_the_best_scoring_proposal() {
    let m = tiny_model(8, 5);
    let windows = vec![vec![1u32, 5, 9, 13, 17, 21, 4, 8], vec![2, 6, 10, 14, 18, 22, 7, 3]];
    for n in 1..=5 {
        let mut cal = Calibration::new(&m, windows.clone(), MergeOp::Top).unwrap();
        let s = Settings { criterion: Criterion::Kl, ..Settings::new(Method::SlmDp, Stop::TargetLayers(n)) };
        let o = plan_depth(&mut cal, &s).unwrap();
        assert_eq!(o.plan.layers_removed(), n);
        assert!(o.plan.merges.iter().all(|&[_, hi]| hi <= 6), "the last layer is never merged");
        assert!(!o.dp_candidates.is_empty());
        let best = o.dp_candidates.iter().map(|c| c.score).fold(f64::NEG_INFINITY, f64::max);
        let chosen = o.dp_candidates.iter().find(|c| c.merges == o.plan.merges).expect("the plan is a proposal");
        assert_eq!(chosen.score, best);
        // Each proposal respects its cap and is scored as the candidate it is.
        for c in &o.dp_candidates {
            assert!(c.merges.iter().all(|[lo, hi]| hi - lo < c.max_window));
            let again = cal.similarity(Criterion::Kl, &Candidate::merges(c.merges.clone())).unwrap();
            assert_eq!(again, c.score);
        }
        assert_eq!(apply(&m, &o.plan).unwrap().spec.num_layers(), 8 - n);
    }
    let mut cal = Calibration::new(&m, windows, MergeOp::Top).unwrap();
    let e = plan_depth(&mut cal, &Settings::new(Method::SlmDp, Stop::Threshold(0.5))).unwrap_err().to_string();
    assert!(e.contains("--target-layers"), "{e}");
    let e = plan_depth(&mut cal, &Settings::new(Method::SlmDp, Stop::TargetLayers(7))).unwrap_err().to_string();
    assert!(e.contains("at least two must remain"), "{e}");
}

/// The invariants on every family (tiny random models with each family's features: biases, q/k norms,
/// Gemma's norms, sandwich norms, GeGLU, sliding layers): a one-layer window is the identity for every operator,
/// merging treats biases and q/k norms like the other weights (average: their mean), a fused window with a global
/// layer is global, and every method's plan applies and runs.
#[test]
fn merge_invariants_hold_on_every_family() {
    use slm_model::{Family, Part, PartKind};
    for family in Family::ALL {
        let m = slm_model::testing::tiny_model_of(family, 4, 3);
        for op in MergeOp::ALL {
            let (spec, w) = merge_window(&m.weights.load_layers(1..2).unwrap(), &m.spec.layers[1..2], 1, op).unwrap();
            assert_eq!(spec, m.spec.layers[1], "{family:?} {op}");
            assert!(same_layer(&w, &m.weights.layer(1).unwrap()), "{family:?} {op}");
        }
        let plan = DepthPlan::new(4, vec![], vec![], MergeOp::Paper).unwrap();
        assert_eq!(max_abs_diff(&logits(&apply(&m, &plan).unwrap(), &IDS), &logits(&m, &IDS)), 0.0, "{family:?}");
        // Average over layers 1..=2: every part (optional ones included) is the mean of the two.
        let (spec, w) =
            merge_window(&m.weights.load_layers(1..3).unwrap(), &m.spec.layers[1..3], 1, MergeOp::Average).unwrap();
        for (part, t) in w.parts() {
            let (a, b) = (
                m.weights.layer(1).unwrap().get(part).unwrap().clone(),
                m.weights.layer(2).unwrap().get(part).unwrap().clone(),
            );
            let (a, b) = (&a, &b);
            let mean = ((a + b).unwrap() / 2.0).unwrap();
            assert_eq!(max_abs_diff(t, &mean), 0.0, "{family:?} {part:?}");
        }
        // Paper: norms (q/k norms included) from the window's first layer, biases merged like projections.
        let (_, p) =
            merge_window(&m.weights.load_layers(1..3).unwrap(), &m.spec.layers[1..3], 1, MergeOp::Paper).unwrap();
        for part in Part::ALL.into_iter().filter(|p| p.present(&m.spec.arch)) {
            let got = p.get(part).unwrap();
            let (a, b) = (
                m.weights.layer(1).unwrap().get(part).unwrap().clone(),
                m.weights.layer(2).unwrap().get(part).unwrap().clone(),
            );
            let (a, b) = (&a, &b);
            let want = if part.kind() == PartKind::Norm { a.clone() } else { (a + (b - a).unwrap()).unwrap() };
            assert_eq!(max_abs_diff(got, &want), 0.0, "{family:?} {part:?}");
        }
        if family == Family::Gemma3 {
            // tiny Gemma: layers 0 and 2 sliding, 1 and 3 global.
            assert!(m.spec.layers[2].sliding && !m.spec.layers[1].sliding);
            assert!(!spec.sliding, "a window with a global layer fuses into a global layer");
        }
        let merged = DepthPlan::new(4, vec![[1, 2]], vec![], MergeOp::Paper).unwrap();
        let out = apply(&m, &merged).unwrap();
        assert_eq!(out.spec.num_layers(), 3);
        assert!(out.logits_all(&IDS).is_ok(), "{family:?}");
    }
}

/// Every file of an HF directory that holds weights, with its bytes.
fn safetensors_files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors" || x == "json"))
        .filter(|p| !p.ends_with("slm_output.json"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn a_mapped_model_gives_the_same_scores_plan_and_output_as_a_resident_one() {
    let path = default_model_path();
    let resident = Model::load(&path, &Device::Cpu).unwrap();
    let mapped = Model::load_mapped(&path, &Device::Cpu).unwrap();
    assert!(!mapped.weights.all_resident());
    let windows = default_calibration(&resident, 4, 32);
    let (mut a, mut b) = (
        Calibration::new(&resident, windows.clone(), MergeOp::Paper).unwrap(),
        Calibration::new(&mapped, windows.clone(), MergeOp::Paper).unwrap(),
    );
    for c in [Candidate::merges(vec![[18, 22]]), Candidate { merges: vec![[25, 28]], removed: vec![4] }] {
        for crit in Criterion::ALL {
            assert_eq!(a.similarity(crit, &c).unwrap().to_bits(), b.similarity(crit, &c).unwrap().to_bits());
        }
        assert_eq!(a.nll(&c).unwrap().to_bits(), b.nll(&c).unwrap().to_bits());
    }
    let settings = Settings::new(Method::SlmDp, Stop::TargetLayers(24));
    let (pa, pb) = (plan_depth(&mut a, &settings).unwrap(), plan_depth(&mut b, &settings).unwrap());
    assert_eq!(pa.plan, pb.plan);
    assert!(!pa.plan.merges.is_empty(), "slm-dp merges windows: {:?}", pa.plan);
    // The pruned model of the mapped input keeps its layers lazy (merged windows too) until it is written.
    let (oa, ob) = (apply(&resident, &pa.plan).unwrap(), apply(&mapped, &pb.plan).unwrap());
    assert!(ob.weights.layers.iter().all(|s| !s.is_resident()));
    let pos: Vec<Vec<usize>> = windows.iter().map(|w| (0..w.len()).collect()).collect();
    let la = oa.forward(&windows, &pos, false, Mode::Inference).unwrap().logits.unwrap();
    let lb = ob.forward(&windows, &pos, false, Mode::Inference).unwrap().logits.unwrap();
    assert_eq!(bits(&la), bits(&lb));
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    oa.save(&da, slm_model::StorageDType::F32, &[]).unwrap();
    ob.save(&db, slm_model::StorageDType::F32, &[]).unwrap();
    assert_eq!(safetensors_files(&da), safetensors_files(&db));
}

/// On a head held in bf16 the KL and NLL stream the logits by vocabulary chunk (one head upcast per candidate,
/// the reductions in f64); they equal an f64 log-softmax of the applied models' logits, and the position-chunked
/// f32 path on the same weights upcast to f32 within its f32 rounding.
#[test]
fn streamed_kl_and_nll_on_a_bf16_head_equal_the_full_row_path() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bf16");
    Model::load(&default_model_path(), &Device::Cpu).unwrap().save(&out, slm_model::StorageDType::BF16, &[]).unwrap();
    let bf16 = Model::load_mapped(&out, &Device::Cpu).unwrap();
    assert_eq!(bf16.weights.lm_head().dtype(), candle_core::DType::BF16);
    let f32 = bf16.to_device(&Device::Cpu).unwrap();
    assert_eq!(f32.weights.lm_head().dtype(), candle_core::DType::F32);
    // 10 × 63 predicting positions: several position chunks on the full-row path.
    let windows = default_calibration(&f32, 10, 64);
    let mut a = Calibration::new(&bf16, windows.clone(), MergeOp::Top).unwrap();
    let mut b = Calibration::new(&f32, windows.clone(), MergeOp::Top).unwrap();
    let pos: Vec<Vec<usize>> = windows.iter().map(|w| (0..w.len() - 1).collect()).collect();
    let logp = |m: &Model| {
        let l = m.forward(&windows, &pos, false, Mode::Inference).unwrap().logits.unwrap();
        candle_nn::ops::log_softmax(&l.to_dtype(candle_core::DType::F64).unwrap(), candle_core::D::Minus1).unwrap()
    };
    let p = logp(&f32);
    let targets: Vec<u32> = windows.iter().flat_map(|w| w[1..].iter().copied()).collect();
    let idx = Tensor::from_vec(targets.clone(), (targets.len(), 1), &Device::Cpu).unwrap();
    for (merges, removed) in [(vec![[20, 24]], vec![]), (vec![[3, 6]], vec![12])] {
        let c = Candidate { merges: merges.clone(), removed: removed.clone() };
        let q = logp(&apply(&f32, &DepthPlan::new(30, merges, removed, MergeOp::Top).unwrap()).unwrap());
        let kl = (p.exp().unwrap() * (&p - &q).unwrap()).unwrap().sum(1).unwrap().mean_all().unwrap();
        let want = (-kl.to_scalar::<f64>().unwrap()).exp();
        let (x, y) = (a.similarity(Criterion::Kl, &c).unwrap(), b.similarity(Criterion::Kl, &c).unwrap());
        eprintln!("{c:?}: kl similarity streamed {x}, f32 rows {y}, f64 reference {want}");
        assert!((x - want).abs() <= 1e-6, "{c:?} kl similarity: streamed {x} vs f64 reference {want}");
        assert!((x - y).abs() <= 1e-5, "{c:?} kl similarity: streamed {x} vs f32 rows {y}");
        assert!(x < 0.999, "{c:?}: a pruned candidate should differ from the dense model ({x})");
        let nll = -q.gather(&idx, 1).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let (x, y) = (a.nll(&c).unwrap(), b.nll(&c).unwrap());
        assert!((x - nll).abs() / nll <= 1e-6, "{c:?} nll: streamed {x} vs f64 reference {nll}");
        assert!((x - y).abs() / y <= 1e-5, "{c:?} nll: streamed {x} vs f32 rows {y}");
    }
    let dense = Candidate::default();
    assert!((a.similarity(Criterion::Kl, &dense).unwrap() - 1.0).abs() <= 1e-9);
}
