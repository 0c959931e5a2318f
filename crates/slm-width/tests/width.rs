//! Width pruning: invariants (zero units, ratio 0, hand-counted shapes), gradients against finite differences,
//! GQA grouping, hand-computed importance scores, and bad input.

use candle_core::{Device, Tensor};
use slm_model::forward::Mode;
use slm_model::testing::{max_abs_diff, tiny_model};
use slm_model::{LayerSpec, Model};
use slm_width::importance::{lm_loss, score_layer};
use slm_width::{
    apply, default_layer_range, gradients, parameters_after, parse_layer_range, plan_width, Aggregation, Importance,
    LayerPrune, WidthPlan, WidthSettings,
};

fn windows() -> Vec<Vec<u32>> {
    (0..3u32).map(|s| (0..12u32).map(|i| (i * 7 + s * 13 + 3) % 64).collect()).collect()
}

fn logits(m: &Model) -> Tensor {
    let w = windows();
    let pos: Vec<Vec<usize>> = w.iter().map(|x| (0..x.len()).collect()).collect();
    m.forward(&w, &pos, false, Mode::Inference).unwrap().logits.unwrap()
}

fn plan_of(m: &Model, layers: Vec<LayerPrune>) -> WidthPlan {
    WidthPlan {
        num_layers: m.spec.num_layers(),
        importance: "manual".into(),
        aggregation: "sum".into(),
        ratios: slm_width::Ratios::uniform(0.0),
        layer_range: [0, m.spec.num_layers()],
        layers,
    }
}

fn zero_cols(t: &Tensor, cols: &[usize]) -> Tensor {
    let (r, c) = t.dims2().unwrap();
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    for row in 0..r {
        for &j in cols {
            v[row * c + j] = 0.0;
        }
    }
    Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
}

#[test]
fn removing_units_whose_output_weights_are_zero_leaves_the_logits_unchanged() {
    let mut m = tiny_model(3, 7);
    // Layer 1: KV head 1 owns query heads 2 and 3 (o_proj columns 16..32); MLP channels 5 and 40.
    let w = m.weights.layer_mut(1).unwrap();
    w.o_proj = zero_cols(&w.o_proj, &(16..32).collect::<Vec<_>>());
    w.down_proj = zero_cols(&w.down_proj, &[5, 40]);
    let before = logits(&m);
    let plan = plan_of(
        &m,
        vec![LayerPrune {
            layer: 1,
            units_removed: vec![1],
            query_heads_removed: vec![2, 3],
            channels_removed: vec![5, 40],
            unit_scores: vec![],
            channel_scores: vec![],
        }],
    );
    let pruned = apply(&m, &plan).unwrap();
    // One KV head left in layer 1: it still runs.
    assert_eq!(
        pruned.spec.layers[1],
        LayerSpec {
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 8,
            intermediate_size: 46,
            sliding: false
        }
    );
    let d = max_abs_diff(&before, &logits(&pruned));
    assert!(d <= 1e-5, "logits moved by {d}");
    // Removing a unit that does contribute changes them (the check above can fail).
    let other = plan_of(
        &m,
        vec![LayerPrune { units_removed: vec![0], query_heads_removed: vec![0, 1], ..plan.layers[0].clone() }],
    );
    assert!(max_abs_diff(&before, &logits(&apply(&m, &other).unwrap())) > 1e-3);
}

#[test]
fn ratio_zero_is_the_identity() {
    let m = tiny_model(3, 1);
    let settings = WidthSettings {
        ratio: slm_width::Ratios::uniform(0.0),
        importance: Importance::L2,
        aggregation: Aggregation::Sum,
        layers: 0..3,
        seed: 0,
    };
    let plan = plan_width(&m, &settings, None).unwrap();
    assert!(plan.layers.iter().all(|p| p.units_removed.is_empty() && p.channels_removed.is_empty()));
    let pruned = apply(&m, &plan).unwrap();
    assert_eq!(pruned.spec, m.spec);
    assert_eq!(max_abs_diff(&logits(&m), &logits(&pruned)), 0.0);
}

#[test]
fn shapes_and_parameter_counts_after_apply_match_a_hand_count() {
    let m = tiny_model(2, 3);
    // Ratio 0.5 on layer 1: KV heads 2 - floor(2*0.5) = 1 removed, MLP 48 - floor(24) = 24 removed.
    let settings = WidthSettings {
        ratio: slm_width::Ratios::uniform(0.5),
        importance: Importance::L2,
        aggregation: Aggregation::Sum,
        layers: 1..2,
        seed: 0,
    };
    let pruned = apply(&m, &plan_width(&m, &settings, None).unwrap()).unwrap();
    let w = &pruned.weights.layer(1).unwrap().into_owned();
    assert_eq!(w.q_proj.dims(), &[16, 32]);
    assert_eq!(w.k_proj.dims(), &[8, 32]);
    assert_eq!(w.v_proj.dims(), &[8, 32]);
    assert_eq!(w.o_proj.dims(), &[32, 16]);
    assert_eq!(w.gate_proj.dims(), &[24, 32]);
    assert_eq!(w.up_proj.dims(), &[24, 32]);
    assert_eq!(w.down_proj.dims(), &[32, 24]);
    assert_eq!(pruned.weights.layer(0).unwrap().q_proj.dims(), &[32, 32], "layer 0 is outside the range");
    // Layer 1 before: 2*32 norms + 32*(32+16+16+32) attention + 3*32*48 MLP = 7744; after: 64 + 32*48 + 3*32*24 = 3904.
    assert_eq!(m.spec.num_parameters() - pruned.spec.num_parameters(), 7744 - 3904);
    assert_eq!(
        parameters_after(&m.spec, slm_width::Ratios::uniform(0.5), &(1..2)).unwrap(),
        pruned.spec.num_parameters()
    );
    // The pruned model saves, reloads with its per-layer widths and gives the same logits.
    let dir = tempfile::tempdir().unwrap();
    pruned.save(&dir.path().join("m"), slm_model::StorageDType::F32, &[]).unwrap();
    let back = Model::load(&dir.path().join("m"), &Device::Cpu).unwrap();
    assert_eq!(back.spec, pruned.spec);
    assert_eq!(max_abs_diff(&logits(&back), &logits(&pruned)), 0.0);
}

#[test]
fn gqa_grouping_removes_a_kv_head_with_exactly_its_query_heads() {
    let m = tiny_model(1, 5);
    let plan = plan_of(
        &m,
        vec![LayerPrune {
            layer: 0,
            units_removed: vec![0],
            query_heads_removed: vec![0, 1],
            channels_removed: vec![],
            unit_scores: vec![],
            channel_scores: vec![],
        }],
    );
    let p = apply(&m, &plan).unwrap();
    let (a, b) = (&m.weights.layer(0).unwrap().into_owned(), &p.weights.layer(0).unwrap().into_owned());
    // KV head 1 = k/v rows 8..16; its query heads 2, 3 = q rows and o columns 16..32.
    assert_eq!(max_abs_diff(&b.k_proj, &a.k_proj.narrow(0, 8, 8).unwrap()), 0.0);
    assert_eq!(max_abs_diff(&b.v_proj, &a.v_proj.narrow(0, 8, 8).unwrap()), 0.0);
    assert_eq!(max_abs_diff(&b.q_proj, &a.q_proj.narrow(0, 16, 16).unwrap()), 0.0);
    assert_eq!(max_abs_diff(&b.o_proj, &a.o_proj.narrow(1, 16, 16).unwrap()), 0.0);
    assert_eq!(p.spec.layers[0].num_attention_heads, 2);
    assert_eq!(p.spec.layers[0].num_key_value_heads, 1);
}

/// Loss at W + eps·d for projection `p` of layer `layer`.
fn loss_at(m: &Model, layer: usize, p: usize, d: &Tensor, eps: f64) -> f64 {
    let mut m = m.clone();
    let w = m.weights.layer_mut(layer).unwrap();
    let t = [
        &mut w.q_proj,
        &mut w.k_proj,
        &mut w.v_proj,
        &mut w.o_proj,
        &mut w.gate_proj,
        &mut w.up_proj,
        &mut w.down_proj,
    ];
    let target = t.into_iter().nth(p).unwrap();
    *target = (&*target + (d * eps).unwrap()).unwrap();
    lm_loss(&m, &windows()).unwrap().to_scalar::<f32>().unwrap() as f64
}

#[test]
fn gradients_match_finite_differences_for_every_projection() {
    let m = tiny_model(2, 11);
    let g = gradients(&m, &windows(), &[0, 1], false, &mut || {}).unwrap();
    assert_eq!(g.backward_passes, 1);
    for (k, &layer) in g.layers.iter().enumerate() {
        for (p, name) in slm_model::PROJECTIONS.iter().enumerate() {
            let grad = &g.grad[k][p];
            let norm = grad.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
            assert!(norm > 0.0, "layer {layer} {name}: zero gradient");
            // Two directions: the gradient itself, and the gradient mixed with a fixed pseudo-random direction.
            let n = grad.elem_count();
            let r: Vec<f32> = (0..n).map(|i| ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0).collect();
            let r = Tensor::from_vec(r, grad.dims(), &Device::Cpu).unwrap();
            let rn = r.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
            let dirs = [(grad / norm).unwrap(), ((grad / norm).unwrap() + (r / rn).unwrap()).unwrap()];
            for d in dirs {
                let analytic = (grad * &d).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
                let eps = 1e-2;
                let numeric = (loss_at(&m, layer, p, &d, eps) - loss_at(&m, layer, p, &d, -eps)) / (2.0 * eps);
                let rel = (numeric - analytic).abs() / analytic.abs();
                assert!(rel <= 1e-2, "layer {layer} {name}: analytic {analytic}, numeric {numeric}, rel {rel}");
            }
        }
    }
}

#[test]
fn fisher_of_one_window_is_the_squared_gradient() {
    let m = tiny_model(2, 4);
    let w = vec![windows()[0].clone()];
    let g = gradients(&m, &w, &[1], true, &mut || {}).unwrap();
    assert_eq!(g.backward_passes, 1, "one chain per window, which also gives the gradient");
    let f = g.fisher.as_ref().unwrap();
    for p in 0..7 {
        assert!(max_abs_diff(&f[0][p], &g.grad[0][p].sqr().unwrap()) <= 1e-9);
    }
}

fn constant(shape: &[usize], v: f32) -> Tensor {
    Tensor::full(v, shape, &Device::Cpu).unwrap()
}

/// The nine Llama part shapes of a layer of hidden size 32, in `Part::ALL` order.
fn shapes(l: &LayerSpec) -> Vec<Vec<usize>> {
    slm_model::Part::ALL[..9].iter().map(|p| p.shape(l, 32)).collect()
}

/// One layer of the tiny shape (4 query heads over 2 KV heads of dim 8, hidden 32, MLP 48) with every weight 2,
/// every gradient `g` and Fisher 0.5.
fn hand_layer(g: f32) -> (LayerSpec, slm_model::LayerWeights, Vec<Tensor>, Vec<Tensor>) {
    let l = LayerSpec {
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        intermediate_size: 48,
        sliding: false,
    };
    let s = shapes(&l);
    let w = slm_model::LayerWeights::llama([
        constant(&s[0], 1.0),
        constant(&s[1], 2.0),
        constant(&s[2], 2.0),
        constant(&s[3], 2.0),
        constant(&s[4], 2.0),
        constant(&s[5], 1.0),
        constant(&s[6], 2.0),
        constant(&s[7], 2.0),
        constant(&s[8], 2.0),
    ]);
    let proj = [1, 2, 3, 4, 6, 7, 8];
    let grads = proj.iter().map(|&k| constant(&s[k], g)).collect();
    let fisher = proj.iter().map(|&k| constant(&s[k], 0.5)).collect();
    (l, w, grads, fisher)
}

#[test]
fn importance_scores_match_a_hand_computation() {
    let (l, w, g, f) = hand_layer(1.0);
    let score = |imp, agg| score_layer(imp, agg, 0, &l, &w, Some(&g), Some(&f), 0).unwrap();
    // element1: |W·g| = 2 per element. Channel t of a KV head: k row 32·2 + v row 64 + 2 q rows 128 + 2 o columns
    // 128 = 384; 8 channels: 3072. MLP channel: gate 64 + up 64 + down column 64 = 192.
    let e1 = score(Importance::Element1, Aggregation::Sum);
    assert_eq!(e1.attention, vec![3072.0, 3072.0]);
    assert!(e1.mlp.iter().all(|&s| s == 192.0));
    // element2: |2·1 − ½·2·0.5·2| = 1 per element: half of element1.
    let e2 = score(Importance::Element2, Aggregation::Sum);
    assert_eq!(e2.attention, vec![1536.0, 1536.0]);
    assert!(e2.mlp.iter().all(|&s| s == 96.0));
    // mean and max over the members of a channel: KV channel members (64, 64, 128, 128).
    assert_eq!(score(Importance::Element1, Aggregation::Mean).attention, vec![8.0 * 96.0; 2]);
    assert_eq!(score(Importance::Element1, Aggregation::Max).attention, vec![8.0 * 128.0; 2]);
    assert!(score(Importance::Element1, Aggregation::Max).mlp.iter().all(|&s| s == 64.0));
    // l2: Σ W² = 4 per element, no gradient needed.
    let l2 = score_layer(Importance::L2, Aggregation::Sum, 0, &l, &w, None, None, 0).unwrap();
    assert_eq!(l2.attention, vec![6144.0, 6144.0]);
}

#[test]
fn vector_importance_takes_the_absolute_value_of_the_sum() {
    // Gradients alternating in sign along each row: element1 sees |±2| = 2 each, vector sees |Σ ±2| = 0 per row.
    let (l, w, _, f) = hand_layer(1.0);
    let s = shapes(&l);
    let alternating = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let c = shape[1];
        Tensor::from_vec(
            (0..n).map(|i| if (i % c).is_multiple_of(2) { 1.0f32 } else { -1.0 }).collect::<Vec<_>>(),
            shape,
            &Device::Cpu,
        )
        .unwrap()
    };
    let g: Vec<Tensor> = [1, 2, 3, 4, 6, 7, 8].iter().map(|&k| alternating(&s[k])).collect();
    let v = score_layer(Importance::Vector, Aggregation::Sum, 0, &l, &w, Some(&g), Some(&f), 0).unwrap();
    let e1 = score_layer(Importance::Element1, Aggregation::Sum, 0, &l, &w, Some(&g), Some(&f), 0).unwrap();
    // Row members sum to 0; column members (o, down) see a constant sign per column: |Σ_rows ±2| = 64.
    assert_eq!(v.mlp[0], 64.0);
    assert_eq!(e1.mlp[0], 192.0);
}

#[test]
fn query_heads_are_credited_to_the_kv_head_that_reads_them() {
    // Only query head 1's q rows carry salience. Head 1 reads KV head 0 (heads 0, 1 share KV head 0). The
    // reference's alignment would credit it to KV head 1 mod 2 = 1.
    let (l, w, mut g, f) = hand_layer(0.0);
    let mut q = vec![0f32; 32 * 32];
    q[8 * 32..16 * 32].iter_mut().for_each(|x| *x = 1.0);
    g[0] = Tensor::from_vec(q, (32, 32), &Device::Cpu).unwrap();
    let s = score_layer(Importance::Element1, Aggregation::Sum, 0, &l, &w, Some(&g), Some(&f), 0).unwrap();
    assert_eq!(s.attention, vec![8.0 * 64.0, 0.0]);
}

#[test]
fn plans_are_deterministic_and_prune_the_lowest_scores() {
    let m = tiny_model(3, 9);
    let settings = WidthSettings {
        ratio: slm_width::Ratios::uniform(0.25),
        importance: Importance::Random,
        aggregation: Aggregation::Sum,
        layers: 1..3,
        seed: 42,
    };
    let a = plan_width(&m, &settings, None).unwrap();
    assert_eq!(a, plan_width(&m, &settings, None).unwrap());
    let b = plan_width(&m, &WidthSettings { seed: 43, ..settings.clone() }, None).unwrap();
    assert_ne!(a.layers[0].channels_removed, b.layers[0].channels_removed);
    for p in &a.layers {
        // 48 - floor(36) = 12 channels, 2 - floor(1.5) = 1 KV head.
        assert_eq!(p.channels_removed.len(), 12);
        assert_eq!(p.units_removed.len(), 1);
        let worst_kept = (0..48)
            .filter(|i| !p.channels_removed.contains(i))
            .map(|i| p.channel_scores[i])
            .fold(f64::INFINITY, f64::min);
        assert!(p.channels_removed.iter().all(|&i| p.channel_scores[i] <= worst_kept));
    }
    // Element1 from real gradients also picks its lowest scores and the plan serialises losslessly.
    let g = gradients(&m, &windows(), &[1, 2], false, &mut || {}).unwrap();
    let e = plan_width(&m, &WidthSettings { importance: Importance::Element1, ..settings }, Some(&g)).unwrap();
    let back: WidthPlan = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
    assert_eq!(back, e);
}

#[test]
fn default_layer_range_scales_llm_pruners_4_to_30_of_32() {
    assert_eq!(default_layer_range(32), 4..30);
    assert_eq!(default_layer_range(30), 4..28);
    assert_eq!(default_layer_range(17), 2..16);
    assert_eq!(default_layer_range(2), 0..2);
}

#[test]
fn bad_input_is_a_clear_error() {
    let m = tiny_model(3, 2);
    let s = |ratio, layers| WidthSettings {
        ratio: slm_width::Ratios::uniform(ratio),
        importance: Importance::L2,
        aggregation: Aggregation::Sum,
        layers,
        seed: 0,
    };
    let err = |r: slm_width::Result<WidthPlan>| r.unwrap_err().to_string();
    assert!(err(plan_width(&m, &s(1.0, 0..3), None)).contains("pruning ratio must be in [0, 1), got 1"));
    assert!(err(plan_width(&m, &s(-0.1, 0..3), None)).contains("pruning ratio must be in [0, 1)"));
    // 2 KV heads at ratio 0.6: floor(0.8) = 0 kept.
    assert!(err(plan_width(&m, &s(0.6, 0..3), None)).contains("would remove all 2 KV heads"));
    assert!(err(plan_width(&m, &s(0.2, 1..5), None)).contains("outside the model's 3 layers"));
    assert!(err(
        plan_width(&m, &s(0.2, 0..3), None).and_then(|_| Err(slm_width::WidthError::InvalidArgument("x".into())))
    )
    .contains('x'));
    assert!(parse_layer_range("2..1", 3).unwrap_err().to_string().contains("empty or outside"));
    assert!(parse_layer_range("0..=3", 3).unwrap_err().to_string().contains("outside the model's 3 layers"));
    assert!(parse_layer_range("abc", 3).unwrap_err().to_string().contains("expected A..B"));
    assert_eq!(parse_layer_range("1..=2", 3).unwrap(), 1..3);
    assert!("magic".parse::<Importance>().unwrap_err().to_string().contains("unknown importance `magic`"));
    let grad_needed = plan_width(&m, &WidthSettings { importance: Importance::Element1, ..s(0.2, 0..3) }, None);
    assert!(err(grad_needed).contains("needs a gradient pass"));
}

#[test]
fn target_ratio_lands_within_one_channel_group_of_the_budget() {
    let spec = slm_model::testing::smollm_spec();
    let dense = spec.num_parameters() as f64;
    let range = default_layer_range(30);
    let group = (3 * 576 * range.len()) as f64;
    for target in [0.05, 0.1, 0.2, 0.25, 0.35, 0.45] {
        let r = slm_width::ratio_for_target(&spec, &range, target).unwrap();
        let removed = dense - parameters_after(&spec, r, &range).unwrap() as f64;
        assert!((removed - target * dense).abs() <= group, "target {target}: removed {removed}, ratios {r:?}");
    }
    // 20%: LLM-Pruner's single ratio fits (1 of 3 KV heads, 478 of 1536 channels per layer).
    let r = slm_width::ratio_for_target(&spec, &range, 0.2).unwrap();
    assert_eq!(r.attention, r.mlp);
    assert!(slm_width::ratio_for_target(&spec, &range, 0.9).unwrap_err().to_string().contains("can remove at most"));
}

/// On every family: ratio 0 is the identity, removing units whose output columns are zero leaves the logits
/// unchanged (q/k/v bias entries go with their rows), and a pruned model saves and reloads bit-exact. The tiny
/// models have 2 KV heads of 2 query heads; a Gemma-3-shaped layer with one KV head prunes query heads.
#[test]
fn width_invariants_hold_on_every_family() {
    use slm_model::Family;
    for family in Family::ALL {
        let mut m = slm_model::testing::tiny_model_of(family, 3, 5);
        let settings = WidthSettings {
            ratio: slm_width::Ratios::uniform(0.0),
            importance: Importance::L2,
            aggregation: Aggregation::Sum,
            layers: 0..3,
            seed: 0,
        };
        let pruned = apply(&m, &plan_width(&m, &settings, None).unwrap()).unwrap();
        assert_eq!(pruned.spec, m.spec);
        assert_eq!(max_abs_diff(&logits(&m), &logits(&pruned)), 0.0, "{family:?}");
        let w = m.weights.layer_mut(1).unwrap();
        w.o_proj = zero_cols(&w.o_proj, &(16..32).collect::<Vec<_>>());
        w.down_proj = zero_cols(&w.down_proj, &[5, 40]);
        let before = logits(&m);
        let prune = LayerPrune {
            layer: 1,
            units_removed: vec![1],
            query_heads_removed: vec![2, 3],
            channels_removed: vec![5, 40],
            unit_scores: vec![],
            channel_scores: vec![],
        };
        let pruned = apply(&m, &plan_of(&m, vec![prune])).unwrap();
        assert_eq!((pruned.spec.layers[1].num_key_value_heads, pruned.spec.layers[1].intermediate_size), (1, 46));
        let d = max_abs_diff(&before, &logits(&pruned));
        assert!(d <= 1e-5, "{family:?}: logits moved by {d}");
        if let Some(b) = &pruned.weights.layer(1).unwrap().into_owned().q_bias {
            assert_eq!(b.dims(), [16], "q bias entries go with their rows");
        }
        let dir = tempfile::tempdir().unwrap();
        pruned.save(&dir.path().join("m"), slm_model::StorageDType::F32, &[]).unwrap();
        let back = Model::load(&dir.path().join("m"), &Device::Cpu).unwrap();
        assert_eq!(back.spec, pruned.spec);
        assert_eq!(max_abs_diff(&logits(&back), &logits(&pruned)), 0.0, "{family:?}: export reload");
    }
}

/// A layer with one KV head (Gemma-3-270M: 4 query heads over 1 KV head): its attention units are query heads,
/// the KV head stays; removing a head whose o_proj columns are zero leaves the logits unchanged.
#[test]
fn single_kv_head_layers_prune_query_heads() {
    let mut m = slm_model::testing::tiny_model_of(slm_model::Family::Gemma3, 2, 9);
    // Rebuild layer 0 as 4 query heads over 1 KV head: k/v keep their first 8 rows (one head).
    let l = LayerSpec { num_key_value_heads: 1, ..m.spec.layers[0] };
    let w = m.weights.layer_mut(0).unwrap();
    w.k_proj = w.k_proj.narrow(0, 0, 8).unwrap();
    w.v_proj = w.v_proj.narrow(0, 0, 8).unwrap();
    let mut spec = m.spec.clone();
    spec.layers[0] = l;
    let mut m = Model::from_parts(spec, m.weights.clone(), None, &Device::Cpu).unwrap();
    assert_eq!(slm_width::AttentionUnit::count(&m.spec.layers[0]), 4);
    let w = m.weights.layer_mut(0).unwrap();
    w.o_proj = zero_cols(&w.o_proj, &(8..16).collect::<Vec<_>>()); // query head 1
    let before = logits(&m);
    let prune = LayerPrune {
        layer: 0,
        units_removed: vec![1],
        query_heads_removed: vec![1],
        channels_removed: vec![],
        unit_scores: vec![],
        channel_scores: vec![],
    };
    let pruned = apply(&m, &plan_of(&m, vec![prune])).unwrap();
    assert_eq!((pruned.spec.layers[0].num_attention_heads, pruned.spec.layers[0].num_key_value_heads), (3, 1));
    let d = max_abs_diff(&before, &logits(&pruned));
    assert!(d <= 1e-5, "logits moved by {d}");
    // The planner scores 4 units there and a ratio of 0.5 removes 2 query heads.
    let settings = WidthSettings {
        ratio: slm_width::Ratios::uniform(0.5),
        importance: Importance::L2,
        aggregation: Aggregation::Sum,
        layers: 0..1,
        seed: 0,
    };
    let plan = plan_width(&m, &settings, None).unwrap();
    assert_eq!((plan.layers[0].unit_scores.len(), plan.layers[0].units_removed.len()), (4, 2));
    assert_eq!(apply(&m, &plan).unwrap().spec.layers[0].num_attention_heads, 2);
}
