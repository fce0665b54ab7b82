//! End to end through ndarray's `blas` feature: ndarray calls the `cblas_*` symbols that
//! this crate exports, found by the linker, and the results are right.
//!
//! This test binary is a downstream crate like any other: it names `peft_gemm` (here to
//! read the call counters; elsewhere `use peft_gemm as _;`), which is what links it.
//!
//! Needs `--features ndarray-blas,call-counter` (see the crate docs, "In a workspace",
//! for why `blas` is not turned on by a dev-dependency).

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ShapeBuilder};

/// SplitMix64 test data in [-1, 1).
fn random(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut state = seed;
    Array2::from_shape_fn((rows, cols), |_| {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    })
}

/// `alpha * a * b + beta * c0` in f64, element by element.
fn reference(
    alpha: f64,
    a: &Array2<f32>,
    b: &Array2<f32>,
    beta: f64,
    c0: &Array2<f32>,
) -> Array2<f64> {
    let (m, k) = a.dim();
    let n = b.ncols();
    Array2::from_shape_fn((m, n), |(i, j)| {
        let dot: f64 = (0..k).map(|p| a[(i, p)] as f64 * b[(p, j)] as f64).sum();
        let c = if beta == 0.0 {
            0.0
        } else {
            beta * c0[(i, j)] as f64
        };
        alpha * dot + c
    })
}

/// Fails on NaN or infinity as well as on a wrong value.
fn assert_matches(got: &Array2<f32>, want: &Array2<f64>, k: usize, what: &str) {
    assert_eq!(got.dim(), want.dim(), "{what}: shape");
    for ((i, j), &g) in got.indexed_iter() {
        let w = want[(i, j)];
        let tol = 1e-5 * (k as f64).sqrt() * (1.0 + w.abs());
        let err = (g as f64 - w).abs();
        assert!(
            g.is_finite() && err <= tol,
            "{what}: ({i}, {j}) got {g}, want {w}"
        );
    }
}

#[test]
fn general_mat_mul_goes_through_cblas_sgemm() {
    // (m, k, n): every product has a dimension > 7, so ndarray takes the BLAS path.
    for (m, k, n) in [
        (9, 8, 10),
        (33, 64, 17),
        (8, 512, 384),
        (128, 40, 8),
        (2, 3, 100),
    ] {
        let a = random(m, k, 1);
        let b = random(k, n, 2);
        let at = random(k, m, 3); // used as at.t(): an m x k column-major view
        let bt = random(n, k, 4); // used as bt.t(): a k x n column-major view
        let at_owned = at.t().to_owned();
        let bt_owned = bt.t().to_owned();
        let c_init = random(m, n, 5);
        let before = peft_gemm::call_counts().sgemm;
        let mut calls = 0;

        // Plain row-major product, beta = 0 over a C full of NaN.
        let mut c = Array2::from_elem((m, n), f32::NAN);
        general_mat_mul(1.0, &a, &b, 0.0, &mut c);
        calls += 1;
        assert_matches(&c, &reference(1.0, &a, &b, 0.0, &c_init), k, "a . b");

        // Transposed views of both operands, alpha and beta.
        let mut c = c_init.clone();
        general_mat_mul(0.5, &at.t(), &bt.t(), -1.5, &mut c);
        calls += 1;
        assert_matches(
            &c,
            &reference(0.5, &at_owned, &bt_owned, -1.5, &c_init),
            k,
            "at.t() . bt.t()",
        );

        // Mixed, into a column-major C.
        let mut c = Array2::from_elem((m, n).f(), f32::NAN);
        general_mat_mul(2.0, &a, &bt.t(), 0.0, &mut c);
        calls += 1;
        assert_matches(
            &c,
            &reference(2.0, &a, &bt_owned, 0.0, &c_init),
            k,
            "a . bt.t() into F-order",
        );

        // `dot` on matrices (C allocated by ndarray).
        let c = at.t().dot(&b);
        calls += 1;
        assert_matches(
            &c,
            &reference(1.0, &at_owned, &b, 0.0, &c_init),
            k,
            "at.t().dot(b)",
        );

        let after = peft_gemm::call_counts().sgemm;
        // Other tests of this binary may run concurrently: at least our calls happened.
        assert!(
            after - before >= calls,
            "ndarray did not call cblas_sgemm for {m}x{k}x{n}: {} calls counted, {calls} made",
            after - before
        );
    }
}

#[test]
fn f64_products_go_through_cblas_dgemm() {
    let a = random(20, 30, 6).mapv(f64::from);
    let b = random(30, 10, 7).mapv(f64::from);
    let before = peft_gemm::call_counts().dgemm;
    let c = a.t().t().dot(&b.t().t());
    assert!(
        peft_gemm::call_counts().dgemm > before,
        "ndarray did not call cblas_dgemm"
    );
    for ((i, j), &g) in c.indexed_iter() {
        let want: f64 = (0..30).map(|p| a[(i, p)] * b[(p, j)]).sum();
        assert!(
            (g - want).abs() <= 1e-12 * 30.0,
            "({i}, {j}): got {g}, want {want}"
        );
    }
}

#[test]
fn matrix_vector_and_vector_dot_go_through_cblas() {
    let a = random(40, 50, 8);
    let x: Array1<f32> = random(1, 50, 9).row(0).to_owned();
    let counts = peft_gemm::call_counts();

    let y = a.dot(&x);
    let yt = a.t().dot(&random(1, 40, 10).row(0));
    let d = x.dot(&x);

    let after = peft_gemm::call_counts();
    assert!(
        after.sgemv >= counts.sgemv + 2,
        "ndarray did not call cblas_sgemv"
    );
    assert!(after.sdot > counts.sdot, "ndarray did not call cblas_sdot");
    for i in 0..40 {
        let want: f64 = (0..50).map(|p| a[(i, p)] as f64 * x[p] as f64).sum();
        assert!(
            (y[i] as f64 - want).abs() <= 1e-4,
            "y[{i}] got {}, want {want}",
            y[i]
        );
    }
    let v = random(1, 40, 10);
    for j in 0..50 {
        let want: f64 = (0..40).map(|p| a[(p, j)] as f64 * v[(0, p)] as f64).sum();
        assert!(
            (yt[j] as f64 - want).abs() <= 1e-4,
            "yt[{j}] got {}, want {want}",
            yt[j]
        );
    }
    let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    assert!((d as f64 - want).abs() <= 1e-4, "x.x got {d}, want {want}");
}
