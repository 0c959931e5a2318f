//! Layer similarity: linear CKA, cosine and angular distance, on hand-checkable inputs and on a tiny
//! random model.

use candle_core::{Device, Tensor};
use slm_depth::similarity::{angular_distance, cka_matrix, cosine_matrix, layer_outputs, linear_cka};

fn matrix(rows: &[&[f64]]) -> Tensor {
    let n = rows.len();
    let p = rows[0].len();
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().map(|&v| v as f32)).collect();
    Tensor::from_vec(flat, (n, p), &Device::Cpu).unwrap()
}

/// Deterministic pseudo-random `[n, p]` values in [-1, 1) (a 64-bit LCG; no rand dependency needed).
fn pseudo_random(n: usize, p: usize, seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n * p)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, (n, p), &Device::Cpu).unwrap()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn cka_of_a_representation_with_itself_is_one() {
    let x = pseudo_random(6, 5, 1);
    let v = linear_cka(&x, &x).unwrap();
    assert!(close(v, 1.0, 1e-12), "{v}");
}

#[test]
fn cka_of_one_feature_is_the_squared_correlation() {
    // x = [1,2,3,4] centres to a = [-1.5,-0.5,0.5,1.5]; y = [1,3,2,4] centres to [-1.5,0.5,-0.5,1.5].
    // With one feature K̃ = aaᵀ, so tr(K̃L̃) = (a·b)² = (2.25-0.25-0.25+2.25)² = 16 and tr(K̃K̃) = |a|⁴ = 5² = 25,
    // tr(L̃L̃) = 25: CKA = 16/25 = 0.64 (Pearson r = 4/5, squared).
    let x = matrix(&[&[1.0], &[2.0], &[3.0], &[4.0]]);
    let y = matrix(&[&[1.0], &[3.0], &[2.0], &[4.0]]);
    let v = linear_cka(&x, &y).unwrap();
    assert!(close(v, 0.64, 1e-12), "{v}");
}

#[test]
fn cka_of_a_hand_worked_two_feature_example() {
    // X = [x | z] with x = [1,2,3,4], z = [1,-1,-1,1]; Y = [x].
    // Centred: a = [-1.5,-0.5,0.5,1.5] (|a|² = 5), b = z (mean 0, |b|² = 4), a·b = -1.5+0.5-0.5+1.5 = 0.
    // K̃ = aaᵀ + bbᵀ, L̃ = aaᵀ.
    // tr(K̃L̃) = (a·a)² + (a·b)² = 25; tr(K̃K̃) = |a|⁴ + 2(a·b)² + |b|⁴ = 25 + 16 = 41; tr(L̃L̃) = 25.
    // CKA = 25 / sqrt(41·25) = 5/sqrt(41) ≈ 0.780869.
    let x = matrix(&[&[1.0, 1.0], &[2.0, -1.0], &[3.0, -1.0], &[4.0, 1.0]]);
    let y = matrix(&[&[1.0], &[2.0], &[3.0], &[4.0]]);
    let expected = 5.0 / 41f64.sqrt();
    let v = linear_cka(&x, &y).unwrap();
    assert!(close(v, expected, 1e-12), "{v} vs {expected}");
    // Symmetric in its arguments.
    assert!(close(linear_cka(&y, &x).unwrap(), expected, 1e-12));
}

#[test]
fn cka_is_invariant_to_isotropic_scaling_and_orthogonal_transforms() {
    let x = pseudo_random(8, 5, 2);
    let y = pseudo_random(8, 7, 3);
    let base = linear_cka(&x, &y).unwrap();
    assert!(base > 0.0 && base < 1.0, "{base}");

    // 3 · X · P for a column permutation P.
    let perm = Tensor::from_vec(vec![4u32, 0, 3, 1, 2], 5, &Device::Cpu).unwrap();
    let scaled_permuted = (x.index_select(&perm, 1).unwrap() * 3.0).unwrap();
    let v = linear_cka(&scaled_permuted, &y).unwrap();
    // Not bit-exact: 3·x is rounded to f32 before the f64 sums.
    assert!(close(v, base, 1e-7), "{v} vs {base}");

    // A rotation by 0.7 rad in the plane of features 0 and 1 (a genuine orthogonal transform, not a permutation),
    // and 0.25 · Y.
    let (c, s) = (0.7f64.cos(), 0.7f64.sin());
    let mut q = vec![vec![0.0; 5]; 5];
    for (i, row) in q.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    q[0][0] = c;
    q[0][1] = -s;
    q[1][0] = s;
    q[1][1] = c;
    let q = matrix(&q.iter().map(|r| r.as_slice()).collect::<Vec<_>>());
    let rotated = x.matmul(&q).unwrap();
    let v = linear_cka(&rotated, &(y * 0.25).unwrap()).unwrap();
    assert!(close(v, base, 1e-6), "{v} vs {base}");
}

#[test]
fn cka_rejects_too_few_examples_and_mismatched_counts() {
    let one = pseudo_random(1, 3, 4);
    assert!(linear_cka(&one, &one).is_err());
    assert!(linear_cka(&pseudo_random(4, 3, 5), &pseudo_random(5, 3, 6)).is_err());
    // A representation whose examples are all equal has no variance.
    let constant = matrix(&[&[1.0, 2.0], &[1.0, 2.0], &[1.0, 2.0]]);
    assert!(linear_cka(&constant, &pseudo_random(3, 2, 7)).is_err());
}

#[test]
fn cka_matrix_flattens_each_example() {
    // [n, T, d] representations give the same CKA as their [n, T·d] flattening.
    let a = pseudo_random(5, 12, 8);
    let b = pseudo_random(5, 12, 9);
    let m = cka_matrix(&[a.reshape((5, 3, 4)).unwrap(), b.reshape((5, 3, 4)).unwrap()]).unwrap();
    let direct = linear_cka(&a, &b).unwrap();
    assert!(close(m[0][1], direct, 1e-12) && close(m[1][0], direct, 1e-12));
    assert_eq!((m[0][0], m[1][1]), (1.0, 1.0));
}

#[test]
fn cosine_matrix_by_hand() {
    // Example 0: (1,0) vs (0,1): cos 0. Example 1: (1,1) vs (1,1): cos 1. Mean 0.5.
    let h0 = matrix(&[&[1.0, 0.0], &[1.0, 1.0]]);
    let h1 = matrix(&[&[0.0, 1.0], &[1.0, 1.0]]);
    // Example 0: (1,0) vs (-2,0): cos -1. Example 1: (1,1) vs (-1,-1)·3: cos -1.
    let h2 = matrix(&[&[-2.0, 0.0], &[-3.0, -3.0]]);
    let m = cosine_matrix(&[h0, h1, h2]).unwrap();
    assert!(close(m[0][1], 0.5, 1e-12), "{m:?}");
    assert!(close(m[0][2], -1.0, 1e-12), "{m:?}");
    // h1 vs h2: example 0 (0,1)·(-2,0) = 0; example 1: -1. Mean -0.5.
    assert!(close(m[1][2], -0.5, 1e-12), "{m:?}");
    for i in 0..3 {
        assert_eq!(m[i][i], 1.0);
        for j in 0..3 {
            assert_eq!(m[i][j], m[j][i]);
        }
    }
}

#[test]
fn angular_distance_endpoints() {
    assert_eq!(angular_distance(1.0), 0.0);
    assert!(close(angular_distance(0.0), 0.5, 1e-15));
    assert!(close(angular_distance(-1.0), 1.0, 1e-15));
    // Rounding just outside [-1, 1] is clamped, not NaN.
    assert_eq!(angular_distance(1.0 + 1e-12), 0.0);
    assert!(close(angular_distance(-1.0 - 1e-12), 1.0, 1e-15));
    assert!(close(angular_distance(0.5), 1.0 / 3.0, 1e-15));
}

#[test]
fn tiny_model_layer_outputs_and_cka_matrix() {
    let model = slm_model::testing::tiny_model(3, 7);
    // 10 windows: one batch of 8 and one of 2, concatenated.
    let windows: Vec<Vec<u32>> =
        (0..10u32).map(|s| (0..12u32).map(|t| (s * 7 + t * 5 + s * t) % 64).collect()).collect();
    let hidden = layer_outputs(&model, &windows).unwrap();
    assert_eq!(hidden.len(), 4);
    for h in &hidden {
        assert_eq!(h.dims(), &[10, 12, 32]);
    }
    // Batching does not change the result: compare with one pass over all windows.
    let all = model.forward(&windows, &vec![Vec::new(); 10], true, slm_model::Mode::Inference).unwrap();
    for (a, b) in hidden.iter().zip(&all.hidden) {
        assert!(slm_model::testing::max_abs_diff(a, b) < 1e-4);
    }
    assert!(layer_outputs(&model, &[]).is_err());
    assert!(layer_outputs(&model, &[vec![1, 2, 3], vec![1, 2]]).is_err());

    let cka = cka_matrix(&hidden).unwrap();
    let cos = cosine_matrix(&hidden).unwrap();
    assert_eq!(cka.len(), 4);
    for i in 0..4 {
        assert_eq!(cka[i].len(), 4);
        assert_eq!(cka[i][i], 1.0);
        assert_eq!(cos[i][i], 1.0);
        for j in 0..4 {
            assert_eq!(cka[i][j], cka[j][i]);
            assert_eq!(cos[i][j], cos[j][i]);
            assert!((0.0..=1.0).contains(&cka[i][j]), "cka[{i}][{j}] = {}", cka[i][j]);
            assert!((-1.0..=1.0).contains(&cos[i][j]), "cos[{i}][{j}] = {}", cos[i][j]);
        }
    }
    // Consecutive residual-stream states share most of their content.
    assert!(cos[2][3] > 0.5, "{cos:?}");
}
