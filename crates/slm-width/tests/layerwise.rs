//! The layer-by-layer gradient pass (recomputation, LM-head loss in chunks) against the whole-graph one on the
//! default model: the same loss, the same gradients and Fisher diagonals up to float summation order, the same
//! unit scores within 1e-4 relative and the same units chosen, for every gradient importance, both from the
//! gradients held whole and from the scores folded layer by layer (the CLI's path).

use candle_core::Device;
use slm_model::Model;
use slm_width::{
    default_layer_range, gradient_scores, gradients, gradients_whole_graph, plan_width, plan_width_scored, Aggregation,
    Importance, WidthSettings,
};

#[test]
fn layerwise_gradients_equal_the_whole_graph_on_the_default_model() {
    let model = Model::load(&slm_model::testing::default_model_path(), &Device::Cpu).unwrap();
    let corpus = slm_model::testing::data_dir().join("lambada_openai.test.jsonl");
    let mut windows = slm_model::calib::calibration_windows(&corpus, model.tokenizer().unwrap(), 3, 64, 7).unwrap();
    // Unequal lengths (padding) and more positions than one LM-head chunk (63 + 40 + 63 = 166 > 128).
    windows[1].truncate(41);
    assert!(windows.iter().map(|w| w.len() - 1).sum::<usize>() > slm_width::importance::LOSS_CHUNK);
    let range = default_layer_range(model.spec.num_layers());
    let layers: Vec<usize> = range.clone().collect();
    let a = gradients(&model, &windows, &layers, true, &mut || {}).unwrap();
    let b = gradients_whole_graph(&model, &windows, &layers, true, &mut || {}).unwrap();
    assert_eq!((a.backward_passes, b.backward_passes), (windows.len(), windows.len() + 1));
    assert!((a.loss - b.loss).abs() <= 1e-5 * b.loss, "loss {} vs {}", a.loss, b.loss);
    let rel = |x: &candle_core::Tensor, y: &candle_core::Tensor| -> f64 {
        let d = slm_model::testing::max_abs_diff(x, y) as f64;
        let m = y.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        d / m
    };
    let mut worst: f64 = 0.0;
    for k in 0..layers.len() {
        for p in 0..7 {
            worst = worst.max(rel(&a.grad[k][p], &b.grad[k][p]));
            worst = worst.max(rel(&a.fisher.as_ref().unwrap()[k][p], &b.fisher.as_ref().unwrap()[k][p]));
        }
    }
    assert!(worst <= 1e-4, "gradients differ by {worst} of their largest entry");
    for importance in [Importance::Element1, Importance::Element2, Importance::Vector] {
        let s = WidthSettings {
            ratio: slm_width::Ratios::uniform(0.25),
            importance,
            aggregation: Aggregation::Sum,
            layers: range.clone(),
            seed: 0,
        };
        // The CLI's path: every layer's gradients folded into its scores as the pass goes, then dropped.
        let scored = gradient_scores(&model, &windows, importance, Aggregation::Sum, &layers, &mut || {}).unwrap();
        assert!((scored.loss - b.loss).abs() <= 1e-5 * b.loss);
        let pa = plan_width_scored(&model, &s, &scored).unwrap();
        let pb = plan_width(&model, &s, Some(&b)).unwrap();
        assert_eq!(plan_width(&model, &s, Some(&a)).unwrap().layers.len(), pa.layers.len());
        for (la, lb) in pa.layers.iter().zip(&pb.layers) {
            for (xs, ys) in [(&la.unit_scores, &lb.unit_scores), (&la.channel_scores, &lb.channel_scores)] {
                // Element scores are sums of magnitudes: relative to themselves. A vector score |Σ W·g| can
                // cancel to almost nothing: relative to the largest score of its kind in the layer.
                let top = ys.iter().fold(0.0f64, |m, y| m.max(y.abs()));
                for (x, y) in xs.iter().zip(ys.iter()) {
                    let scale = if importance == Importance::Vector { top } else { y.abs() };
                    assert!((x - y).abs() <= 1e-4 * scale, "{importance:?} layer {}: score {x} vs {y}", la.layer);
                }
            }
            assert_eq!(la.units_removed, lb.units_removed, "{importance:?} layer {}", la.layer);
            assert_eq!(la.channels_removed, lb.channels_removed, "{importance:?} layer {}", la.layer);
        }
    }
}

#[test]
fn a_mapped_model_gives_the_same_scores_units_and_output_as_a_resident_one() {
    let path = slm_model::testing::default_model_path();
    let resident = Model::load(&path, &Device::Cpu).unwrap();
    let mapped = Model::load_mapped(&path, &Device::Cpu).unwrap();
    assert!(!mapped.weights.all_resident());
    let corpus = slm_model::testing::data_dir().join("lambada_openai.test.jsonl");
    let windows = slm_model::calib::calibration_windows(&corpus, resident.tokenizer().unwrap(), 2, 32, 7).unwrap();
    let range = default_layer_range(resident.spec.num_layers());
    let layers: Vec<usize> = range.clone().collect();
    let s = WidthSettings {
        ratio: slm_width::Ratios::uniform(0.2),
        importance: Importance::Element1,
        aggregation: Aggregation::Sum,
        layers: range,
        seed: 0,
    };
    let score = |m: &Model| gradient_scores(m, &windows, s.importance, s.aggregation, &layers, &mut || {}).unwrap();
    let (ga, gb) = (score(&resident), score(&mapped));
    assert_eq!(ga.loss.to_bits(), gb.loss.to_bits());
    let (pa, pb) = (plan_width_scored(&resident, &s, &ga).unwrap(), plan_width_scored(&mapped, &s, &gb).unwrap());
    assert_eq!(serde_json::to_string(&pa).unwrap(), serde_json::to_string(&pb).unwrap());
    // The pruned layers of the mapped input are pruned when used or written, and equal the resident ones.
    let (oa, ob) = (slm_width::apply(&resident, &pa).unwrap(), slm_width::apply(&mapped, &pb).unwrap());
    assert!(ob.weights.layers.iter().all(|l| !l.is_resident()));
    assert_eq!(oa.spec.layers, ob.spec.layers);
    for i in 0..oa.spec.num_layers() {
        let (a, b) = (oa.weights.layer(i).unwrap(), ob.weights.layer(i).unwrap());
        for ((_, x), (_, y)) in a.parts().into_iter().zip(b.parts()) {
            assert_eq!(x.dims(), y.dims());
            assert_eq!(slm_model::testing::max_abs_diff(x, y), 0.0, "layer {i}");
        }
    }
}
