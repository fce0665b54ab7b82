//! Every exported function against a naive `f64` reference.

use super::*;

/// SplitMix64: a tiny deterministic generator, enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The real element types, with their CBLAS entry points.
trait Real: Copy + PartialEq + core::fmt::Debug {
    const EPS: f64;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        layout: c_int,
        ta: c_int,
        tb: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: Self,
        a: *const Self,
        lda: c_int,
        b: *const Self,
        ldb: c_int,
        beta: Self,
        c: *mut Self,
        ldc: c_int,
    );
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemv(
        layout: c_int,
        ta: c_int,
        m: c_int,
        n: c_int,
        alpha: Self,
        a: *const Self,
        lda: c_int,
        x: *const Self,
        incx: c_int,
        beta: Self,
        y: *mut Self,
        incy: c_int,
    );
    unsafe fn dot(n: c_int, x: *const Self, incx: c_int, y: *const Self, incy: c_int) -> Self;
}

impl Real for f32 {
    const EPS: f64 = f32::EPSILON as f64;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    unsafe fn gemm(
        layout: c_int,
        ta: c_int,
        tb: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: Self,
        a: *const Self,
        lda: c_int,
        b: *const Self,
        ldb: c_int,
        beta: Self,
        c: *mut Self,
        ldc: c_int,
    ) {
        unsafe { cblas_sgemm(layout, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) }
    }
    unsafe fn gemv(
        layout: c_int,
        ta: c_int,
        m: c_int,
        n: c_int,
        alpha: Self,
        a: *const Self,
        lda: c_int,
        x: *const Self,
        incx: c_int,
        beta: Self,
        y: *mut Self,
        incy: c_int,
    ) {
        unsafe { cblas_sgemv(layout, ta, m, n, alpha, a, lda, x, incx, beta, y, incy) }
    }
    unsafe fn dot(n: c_int, x: *const Self, incx: c_int, y: *const Self, incy: c_int) -> Self {
        unsafe { cblas_sdot(n, x, incx, y, incy) }
    }
}

impl Real for f64 {
    const EPS: f64 = f64::EPSILON;
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    unsafe fn gemm(
        layout: c_int,
        ta: c_int,
        tb: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: Self,
        a: *const Self,
        lda: c_int,
        b: *const Self,
        ldb: c_int,
        beta: Self,
        c: *mut Self,
        ldc: c_int,
    ) {
        unsafe { cblas_dgemm(layout, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) }
    }
    unsafe fn gemv(
        layout: c_int,
        ta: c_int,
        m: c_int,
        n: c_int,
        alpha: Self,
        a: *const Self,
        lda: c_int,
        x: *const Self,
        incx: c_int,
        beta: Self,
        y: *mut Self,
        incy: c_int,
    ) {
        unsafe { cblas_dgemv(layout, ta, m, n, alpha, a, lda, x, incx, beta, y, incy) }
    }
    unsafe fn dot(n: c_int, x: *const Self, incx: c_int, y: *const Self, incy: c_int) -> Self {
        unsafe { cblas_ddot(n, x, incx, y, incy) }
    }
}

/// Passes only for a finite `got` within `tol` of `want`; NaN and infinity always fail
/// (every comparison with NaN is false, so `ok` is false for a NaN `err`).
fn assert_close(got: f64, want: f64, tol: f64, what: &dyn Fn() -> String) {
    let err = (got - want).abs();
    let ok = got.is_finite() && err <= tol;
    if !ok {
        panic!(
            "{}: got {got}, want {want}, |err| {err:e} > tol {tol:e}",
            what()
        );
    }
}

/// The sentinel stored in padding that no call may touch.
const PAD: f64 = 12345.0;

/// Storage of a `rows x cols` matrix in the given layout with leading dimension `ld`;
/// returns the buffer length and the index function.
fn storage(
    row_major: bool,
    rows: usize,
    cols: usize,
    ld: usize,
) -> (usize, impl Fn(usize, usize) -> usize) {
    let len = if row_major { rows * ld } else { cols * ld };
    (
        len,
        move |r: usize, c: usize| if row_major { r * ld + c } else { r + c * ld },
    )
}

struct GemmCase {
    row_major: bool,
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    /// Extra leading-dimension padding for A, B, C.
    pad: [usize; 3],
    alpha: f64,
    beta: f64,
}

/// Runs one real gemm case against the `f64` reference; returns the number of checked
/// elements.
fn check_gemm<T: Real>(case: &GemmCase, rng: &mut Rng) -> usize {
    let GemmCase {
        row_major,
        ta,
        tb,
        m,
        n,
        k,
        pad,
        alpha,
        beta,
    } = *case;
    // Stored shapes.
    let (ar, ac) = if ta { (k, m) } else { (m, k) };
    let (br, bc) = if tb { (n, k) } else { (k, n) };
    let contiguous = |rows: usize, cols: usize| if row_major { cols } else { rows };
    let lda = contiguous(ar, ac).max(1) + pad[0];
    let ldb = contiguous(br, bc).max(1) + pad[1];
    let ldc = contiguous(m, n).max(1) + pad[2];
    let (alen, aidx) = storage(row_major, ar, ac, lda);
    let (blen, bidx) = storage(row_major, br, bc, ldb);
    let (clen, cidx) = storage(row_major, m, n, ldc);

    let a: Vec<T> = (0..alen).map(|_| T::from_f64(rng.uniform())).collect();
    let b: Vec<T> = (0..blen).map(|_| T::from_f64(rng.uniform())).collect();
    // C: padding holds a sentinel; the block holds NaN when beta is zero (it must be
    // overwritten, not scaled) and random values otherwise.
    let mut c: Vec<T> = vec![T::from_f64(PAD); clen];
    for i in 0..m {
        for j in 0..n {
            c[cidx(i, j)] = T::from_f64(if beta == 0.0 { f64::NAN } else { rng.uniform() });
        }
    }
    let c0 = c.clone();
    let op_a = |i: usize, p: usize| a[if ta { aidx(p, i) } else { aidx(i, p) }].to_f64();
    let op_b = |p: usize, j: usize| b[if tb { bidx(j, p) } else { bidx(p, j) }].to_f64();

    let layout = if row_major {
        CBLAS_ROW_MAJOR
    } else {
        CBLAS_COL_MAJOR
    };
    let tr = |t: bool| if t { CBLAS_TRANS } else { CBLAS_NO_TRANS };
    unsafe {
        T::gemm(
            layout,
            tr(ta),
            tr(tb),
            m as c_int,
            n as c_int,
            k as c_int,
            T::from_f64(alpha),
            a.as_ptr(),
            lda as c_int,
            b.as_ptr(),
            ldb as c_int,
            T::from_f64(beta),
            c.as_mut_ptr(),
            ldc as c_int,
        );
    }

    let describe = |i: usize, j: usize| {
        move || {
            format!(
                "{} row_major={row_major} ta={ta} tb={tb} m={m} n={n} k={k} lda={lda} ldb={ldb} \
                 ldc={ldc} alpha={alpha} beta={beta} at ({i}, {j})",
                core::any::type_name::<T>()
            )
        }
    };
    let mut in_block = vec![false; clen];
    for i in 0..m {
        for j in 0..n {
            let mut want = 0.0;
            let mut magnitude = 0.0;
            for p in 0..k {
                want += op_a(i, p) * op_b(p, j);
                magnitude += (op_a(i, p) * op_b(p, j)).abs();
            }
            want *= alpha;
            magnitude *= alpha.abs();
            if beta != 0.0 {
                want += beta * c0[cidx(i, j)].to_f64();
                magnitude += (beta * c0[cidx(i, j)].to_f64()).abs();
            }
            let tol = 4.0 * T::EPS * (k as f64 + 2.0) * magnitude + 1e-30;
            assert_close(c[cidx(i, j)].to_f64(), want, tol, &describe(i, j));
            in_block[cidx(i, j)] = true;
        }
    }
    for (idx, &inside) in in_block.iter().enumerate() {
        if !inside {
            assert_eq!(
                c[idx],
                c0[idx],
                "padding of C changed at {idx}: {}",
                describe(0, 0)()
            );
        }
    }
    m * n
}

const DIMS: [usize; 9] = [0, 1, 2, 7, 8, 9, 16, 33, 100];
const ALPHA_BETA: [(f64, f64); 8] = [
    (1.0, 0.0),
    (1.0, 1.0),
    (0.5, -2.0),
    (-1.5, 0.0),
    (0.0, 0.5),
    (0.0, 0.0),
    (2.0, 1.0),
    (0.0, 1.0),
];

/// All layouts, transpositions and dimensions in `DIMS`, cycling through the
/// alpha/beta pairs and random leading-dimension padding.
fn sweep_gemm<T: Real>(seed: u64) {
    let mut rng = Rng(seed);
    let mut cases = 0;
    let mut elements = 0;
    for row_major in [true, false] {
        for ta in [false, true] {
            for tb in [false, true] {
                for &m in &DIMS {
                    for &n in &DIMS {
                        for &k in &DIMS {
                            let (alpha, beta) = ALPHA_BETA[cases % ALPHA_BETA.len()];
                            let pad = [0, 1, 2].map(|_| [0, 0, 1, 3][rng.below(4)]);
                            let case = GemmCase {
                                row_major,
                                ta,
                                tb,
                                m,
                                n,
                                k,
                                pad,
                                alpha,
                                beta,
                            };
                            elements += check_gemm::<T>(&case, &mut rng);
                            cases += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(cases, 8 * DIMS.len().pow(3));
    assert!(elements > 0);
}

#[test]
fn sgemm_matches_reference_on_all_layouts_and_small_shapes() {
    sweep_gemm::<f32>(1);
}

#[test]
fn dgemm_matches_reference_on_all_layouts_and_small_shapes() {
    sweep_gemm::<f64>(2);
}

/// Large enough for the multi-threaded path (above `PARALLEL_THRESHOLD`), plus a
/// decode-like shape (M = 8, wide N).
#[test]
fn large_gemm_matches_reference() {
    let mut rng = Rng(3);
    let shapes = [
        (300, 257, 513),
        (8, 2000, 512),
        (1000, 8, 300),
        (130, 140, 150),
    ];
    for (idx, &(m, n, k)) in shapes.iter().enumerate() {
        for (variant, (row_major, ta, tb)) in [
            (true, false, false),
            (true, true, true),
            (false, false, true),
            (false, true, false),
        ]
        .into_iter()
        .enumerate()
        {
            let (alpha, beta) = ALPHA_BETA[(idx + variant) % ALPHA_BETA.len()];
            let pad = [variant, 2 * variant, 5 - variant];
            let case = GemmCase {
                row_major,
                ta,
                tb,
                m,
                n,
                k,
                pad,
                alpha,
                beta,
            };
            check_gemm::<f32>(&case, &mut rng);
        }
    }
    let case = GemmCase {
        row_major: true,
        ta: false,
        tb: true,
        m: 200,
        n: 150,
        k: 300,
        pad: [1, 0, 2],
        alpha: 0.75,
        beta: 0.0,
    };
    check_gemm::<f64>(&case, &mut rng);
}

#[test]
fn decode_shape_with_huge_n_matches_reference() {
    // The decode LM-head shape, narrowed in K to keep the f64 reference quick.
    let mut rng = Rng(4);
    let case = GemmCase {
        row_major: true,
        ta: false,
        tb: false,
        m: 8,
        n: 32128,
        k: 64,
        pad: [0; 3],
        alpha: 1.0,
        beta: 0.0,
    };
    check_gemm::<f32>(&case, &mut rng);
}

#[test]
fn invalid_arguments_leave_c_untouched() {
    let a = [1.0f32; 64];
    let b = [1.0f32; 64];
    let fresh = [7.0f32; 64];
    // layout, ta, tb, m, n, k, lda, ldb, ldc
    let calls: [[c_int; 9]; 8] = [
        [100, 111, 111, 4, 4, 4, 4, 4, 4],
        [101, 114, 111, 4, 4, 4, 4, 4, 4],
        [101, 111, 0, 4, 4, 4, 4, 4, 4],
        [101, 111, 111, -1, 4, 4, 4, 4, 4],
        [101, 111, 111, 4, 4, 4, 3, 4, 4],
        [101, 111, 111, 4, 4, 4, 4, 3, 4],
        [101, 111, 111, 4, 4, 4, 4, 4, 3],
        [102, 112, 111, 4, 4, 5, 4, 5, 4],
    ];
    for call in calls {
        let [layout, ta, tb, m, n, k, lda, ldb, ldc] = call;
        let mut c = fresh;
        unsafe {
            cblas_sgemm(
                layout,
                ta,
                tb,
                m,
                n,
                k,
                1.0,
                a.as_ptr(),
                lda,
                b.as_ptr(),
                ldb,
                0.0,
                c.as_mut_ptr(),
                ldc,
            );
        }
        assert_eq!(c, fresh, "call {call:?} wrote C");
    }
    let mut y = [7.0f32; 8];
    unsafe {
        cblas_sgemv(
            101,
            111,
            2,
            2,
            1.0,
            a.as_ptr(),
            2,
            b.as_ptr(),
            0,
            0.0,
            y.as_mut_ptr(),
            1,
        )
    };
    assert_eq!(y, [7.0; 8]);
    unsafe {
        cblas_sgemv(
            101,
            111,
            2,
            2,
            1.0,
            a.as_ptr(),
            1,
            b.as_ptr(),
            1,
            0.0,
            y.as_mut_ptr(),
            1,
        )
    };
    assert_eq!(y, [7.0; 8]);
}

/// Strided vector storage: `len` logical elements at increment `inc` (BLAS order, so a
/// negative increment stores element 0 last). Returns the buffer and the index function.
fn strided(len: usize, inc: c_int) -> (usize, impl Fn(usize) -> usize) {
    let step = inc.unsigned_abs() as usize;
    let buf = if len == 0 { 1 } else { (len - 1) * step + 1 };
    (buf, move |i: usize| {
        if inc > 0 {
            i * step
        } else {
            (len - 1 - i) * step
        }
    })
}

fn sweep_gemv<T: Real>(seed: u64) {
    let mut rng = Rng(seed);
    let mut case = 0;
    for row_major in [true, false] {
        for trans in [false, true] {
            for m in [0, 1, 7, 9, 33, 100] {
                for n in [0, 1, 8, 33, 100] {
                    for (incx, incy) in [(1, 1), (2, 1), (1, 3), (-1, 1), (1, -2), (-3, -1)] {
                        let (alpha, beta) = ALPHA_BETA[case % ALPHA_BETA.len()];
                        case += 1;
                        let lda = (if row_major { n } else { m }).max(1) + rng.below(3);
                        let (alen, aidx) = storage(row_major, m, n, lda);
                        let a: Vec<T> = (0..alen).map(|_| T::from_f64(rng.uniform())).collect();
                        let (rows, cols) = if trans { (n, m) } else { (m, n) };
                        let (xlen, xidx) = strided(cols, incx);
                        let (ylen, yidx) = strided(rows, incy);
                        let x: Vec<T> = (0..xlen).map(|_| T::from_f64(rng.uniform())).collect();
                        let mut y = vec![T::from_f64(PAD); ylen];
                        for i in 0..rows {
                            y[yidx(i)] =
                                T::from_f64(if beta == 0.0 { f64::NAN } else { rng.uniform() });
                        }
                        let y0 = y.clone();
                        unsafe {
                            T::gemv(
                                if row_major {
                                    CBLAS_ROW_MAJOR
                                } else {
                                    CBLAS_COL_MAJOR
                                },
                                if trans { CBLAS_TRANS } else { CBLAS_NO_TRANS },
                                m as c_int,
                                n as c_int,
                                T::from_f64(alpha),
                                a.as_ptr(),
                                lda as c_int,
                                x.as_ptr(),
                                incx,
                                T::from_f64(beta),
                                y.as_mut_ptr(),
                                incy,
                            );
                        }
                        let mut touched = vec![false; ylen];
                        for i in 0..rows {
                            let (mut want, mut magnitude) = (0.0, 0.0);
                            for p in 0..cols {
                                let av = if trans { a[aidx(p, i)] } else { a[aidx(i, p)] };
                                let term = av.to_f64() * x[xidx(p)].to_f64();
                                want += term;
                                magnitude += term.abs();
                            }
                            want *= alpha;
                            magnitude *= alpha.abs();
                            if beta != 0.0 {
                                want += beta * y0[yidx(i)].to_f64();
                                magnitude += (beta * y0[yidx(i)].to_f64()).abs();
                            }
                            let tol = 4.0 * T::EPS * (cols as f64 + 2.0) * magnitude + 1e-30;
                            assert_close(y[yidx(i)].to_f64(), want, tol, &|| {
                                format!(
                                    "gemv row_major={row_major} trans={trans} m={m} n={n} \
                                     incx={incx} incy={incy} alpha={alpha} beta={beta} i={i}"
                                )
                            });
                            touched[yidx(i)] = true;
                        }
                        for idx in 0..ylen {
                            if !touched[idx] {
                                assert_eq!(y[idx], y0[idx], "gemv wrote between elements of y");
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn sgemv_matches_reference() {
    sweep_gemv::<f32>(5);
}

#[test]
fn dgemv_matches_reference() {
    sweep_gemv::<f64>(6);
}

fn sweep_dot<T: Real>(seed: u64) {
    let mut rng = Rng(seed);
    for n in [0, 1, 7, 8, 9, 33, 100, 1000] {
        for (incx, incy) in [(1, 1), (2, 1), (1, -1), (-2, 3), (-1, -1)] {
            let (xlen, xidx) = strided(n, incx);
            let (ylen, yidx) = strided(n, incy);
            let x: Vec<T> = (0..xlen).map(|_| T::from_f64(rng.uniform())).collect();
            let y: Vec<T> = (0..ylen).map(|_| T::from_f64(rng.uniform())).collect();
            let (mut want, mut magnitude) = (0.0, 0.0);
            for i in 0..n {
                let term = x[xidx(i)].to_f64() * y[yidx(i)].to_f64();
                want += term;
                magnitude += term.abs();
            }
            let got = unsafe { T::dot(n as c_int, x.as_ptr(), incx, y.as_ptr(), incy) };
            let tol = 4.0 * T::EPS * (n as f64 + 2.0) * magnitude + 1e-30;
            assert_close(got.to_f64(), want, tol, &|| {
                format!("dot n={n} incx={incx} incy={incy}")
            });
        }
    }
}

#[test]
fn sdot_and_ddot_match_reference() {
    sweep_dot::<f32>(7);
    sweep_dot::<f64>(8);
}

#[test]
fn dot_propagates_nan() {
    let x = [1.0f32, f32::NAN, 2.0];
    let y = [1.0f32; 3];
    assert!(unsafe { cblas_sdot(3, x.as_ptr(), 1, y.as_ptr(), 1) }.is_nan());
}

/// Complex gemm against a reference in `f64` pairs, with conjugate transposition.
fn check_complex<T: Real>(
    cgemm: unsafe extern "C" fn(
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        *const c_void,
        *const c_void,
        c_int,
        *const c_void,
        c_int,
        *const c_void,
        *mut c_void,
        c_int,
    ),
    seed: u64,
) {
    let mut rng = Rng(seed);
    let mut case = 0;
    let trans_codes = [CBLAS_NO_TRANS, CBLAS_TRANS, CBLAS_CONJ_TRANS];
    for row_major in [true, false] {
        for ta in trans_codes {
            for tb in trans_codes {
                for (m, n, k) in [
                    (0, 3, 4),
                    (3, 0, 2),
                    (4, 5, 0),
                    (1, 1, 1),
                    (9, 8, 7),
                    (33, 17, 40),
                ] {
                    let alphas = [(1.0, 0.0), (0.5, -1.0), (0.0, 0.0), (-1.0, 2.0)];
                    let betas = [(0.0, 0.0), (1.0, 0.0), (0.25, 0.5), (-2.0, 0.0)];
                    let alpha = alphas[case % alphas.len()];
                    let beta = betas[(case / 2) % betas.len()];
                    case += 1;
                    let (ar, ac) = if ta == CBLAS_NO_TRANS { (m, k) } else { (k, m) };
                    let (br, bc) = if tb == CBLAS_NO_TRANS { (k, n) } else { (n, k) };
                    let contiguous = |rows: usize, cols: usize| if row_major { cols } else { rows };
                    let lda = contiguous(ar, ac).max(1) + rng.below(2);
                    let ldb = contiguous(br, bc).max(1) + rng.below(2);
                    let ldc = contiguous(m, n).max(1) + rng.below(2);
                    let (alen, aidx) = storage(row_major, ar, ac, lda);
                    let (blen, bidx) = storage(row_major, br, bc, ldb);
                    let (clen, cidx) = storage(row_major, m, n, ldc);
                    let fill = |len: usize, rng: &mut Rng| -> Vec<[T; 2]> {
                        (0..len)
                            .map(|_| [T::from_f64(rng.uniform()), T::from_f64(rng.uniform())])
                            .collect()
                    };
                    let a = fill(alen, &mut rng);
                    let b = fill(blen, &mut rng);
                    let mut c = fill(clen, &mut rng);
                    if beta == (0.0, 0.0) {
                        for i in 0..m {
                            for j in 0..n {
                                c[cidx(i, j)] = [T::from_f64(f64::NAN); 2];
                            }
                        }
                    }
                    let c0 = c.clone();
                    let get = |v: [T; 2], conj: bool| {
                        (
                            v[0].to_f64(),
                            if conj { -v[1].to_f64() } else { v[1].to_f64() },
                        )
                    };
                    let op_a = |i: usize, p: usize| match ta {
                        CBLAS_NO_TRANS => get(a[aidx(i, p)], false),
                        _ => get(a[aidx(p, i)], ta == CBLAS_CONJ_TRANS),
                    };
                    let op_b = |p: usize, j: usize| match tb {
                        CBLAS_NO_TRANS => get(b[bidx(p, j)], false),
                        _ => get(b[bidx(j, p)], tb == CBLAS_CONJ_TRANS),
                    };
                    let mul = |x: (f64, f64), y: (f64, f64)| {
                        (x.0 * y.0 - x.1 * y.1, x.0 * y.1 + x.1 * y.0)
                    };
                    let alpha_t = [T::from_f64(alpha.0), T::from_f64(alpha.1)];
                    let beta_t = [T::from_f64(beta.0), T::from_f64(beta.1)];
                    unsafe {
                        cgemm(
                            if row_major {
                                CBLAS_ROW_MAJOR
                            } else {
                                CBLAS_COL_MAJOR
                            },
                            ta,
                            tb,
                            m as c_int,
                            n as c_int,
                            k as c_int,
                            alpha_t.as_ptr().cast(),
                            a.as_ptr().cast(),
                            lda as c_int,
                            b.as_ptr().cast(),
                            ldb as c_int,
                            beta_t.as_ptr().cast(),
                            c.as_mut_ptr().cast(),
                            ldc as c_int,
                        );
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let (mut acc, mut magnitude) = ((0.0, 0.0), 0.0);
                            for p in 0..k {
                                let t = mul(op_a(i, p), op_b(p, j));
                                acc = (acc.0 + t.0, acc.1 + t.1);
                                magnitude += t.0.abs() + t.1.abs();
                            }
                            let mut want = mul(alpha, acc);
                            magnitude *= alpha.0.abs() + alpha.1.abs();
                            if beta != (0.0, 0.0) {
                                let t = mul(beta, get(c0[cidx(i, j)], false));
                                want = (want.0 + t.0, want.1 + t.1);
                                magnitude += t.0.abs() + t.1.abs();
                            }
                            let tol = 8.0 * T::EPS * (k as f64 + 2.0) * magnitude + 1e-30;
                            let got = get(c[cidx(i, j)], false);
                            let what = || {
                                format!(
                                    "{} row_major={row_major} ta={ta} tb={tb} m={m} n={n} \
                                     k={k} alpha={alpha:?} beta={beta:?} at ({i}, {j})",
                                    core::any::type_name::<T>()
                                )
                            };
                            assert_close(got.0, want.0, tol, &what);
                            assert_close(got.1, want.1, tol, &what);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn cgemm_matches_reference() {
    check_complex::<f32>(cblas_cgemm, 9);
}

#[test]
fn zgemm_matches_reference() {
    check_complex::<f64>(cblas_zgemm, 10);
}

/// `sgemm_strided` on random shapes (empty, tiny, at ndarray's cutoff, above the threading
/// threshold) with every operand in row-major, column-major or padded-row layout, `C` written
/// through a padded or transposed layout pre-filled with NaN (never read), and the padding
/// around `C` left untouched; against the naive `f64` product.
#[test]
fn sgemm_strided_matches_reference_on_all_layouts() {
    let mut rng = Rng(0x5eed_0017);
    let mut shapes = vec![
        (0, 3, 4),
        (3, 0, 4),
        (3, 4, 0),
        (1, 1, 1),
        (7, 7, 7),
        (8, 7, 7),
        (5, 9, 3),
    ];
    shapes.extend([(1, 300, 64), (33, 17, 65), (130, 140, 150)]);
    // The small-M path (decoding; B of at least 32K elements): every row count it takes,
    // with and without a column tail, with one block of B's rows and several (k > 128).
    for m in 1..=16 {
        shapes.extend([
            (m, 16, 2048),
            (m, 300 + 37 * m, 129 + 60 * m),
            (m, 256 + m, 129),
        ]);
    }
    shapes.push((8, 1000, 300));
    // Products cut into column blocks, one per thread (`column_split`), with a short last
    // block.
    shapes.extend([(128, 300, 200), (129, 517, 77), (256, 1000, 40)]);
    for _ in 0..40 {
        shapes.push((1 + rng.below(40), 1 + rng.below(40), 1 + rng.below(40)));
    }
    // (row stride, column stride) of an r x c matrix in a buffer: row-major, column-major, and
    // row-major with padded rows (a head-split view).
    let layouts = |r: usize, c: usize| [(c as isize, 1), (1, r as isize), (c as isize + 3, 1)];
    for (m, n, k) in shapes {
        for (la, lb, lc) in [
            (0, 0, 0),
            (1, 0, 0),
            (0, 1, 0),
            (1, 1, 1),
            (2, 2, 2),
            (2, 1, 0),
            (1, 2, 1),
        ] {
            let (a_rs, a_cs) = layouts(m, k)[la];
            let (b_rs, b_cs) = layouts(k, n)[lb];
            let (c_rs, c_cs) = layouts(m, n)[lc];
            let extent = |r: usize, c: usize, rs: isize, cs: isize| {
                if r == 0 || c == 0 {
                    0
                } else {
                    ((r - 1) as isize * rs + (c - 1) as isize * cs) as usize + 1
                }
            };
            let a: Vec<f32> = (0..extent(m, k, a_rs, a_cs))
                .map(|_| rng.uniform() as f32)
                .collect();
            let b: Vec<f32> = (0..extent(k, n, b_rs, b_cs))
                .map(|_| rng.uniform() as f32)
                .collect();
            let mut c = vec![f32::NAN; extent(m, n, c_rs, c_cs) + 2];
            for threaded in [false, true] {
                c.iter_mut().for_each(|v| *v = f32::NAN);
                // SAFETY: the buffers cover the extents the strides describe.
                unsafe {
                    sgemm_strided(
                        m,
                        n,
                        k,
                        a.as_ptr(),
                        a_rs,
                        a_cs,
                        b.as_ptr(),
                        b_rs,
                        b_cs,
                        c.as_mut_ptr(),
                        c_rs,
                        c_cs,
                        threaded,
                    );
                }
                let mut written = vec![false; c.len()];
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|l| {
                                a[(i as isize * a_rs + l as isize * a_cs) as usize] as f64
                                    * b[(l as isize * b_rs + j as isize * b_cs) as usize] as f64
                            })
                            .sum();
                        let at = (i as isize * c_rs + j as isize * c_cs) as usize;
                        written[at] = true;
                        assert_close(
                            c[at] as f64,
                            want,
                            f32::EPSILON as f64 * (k as f64 + 1.0) * 4.0,
                            &|| {
                                format!(
                                    "{m}x{n}x{k} layouts {la}{lb}{lc} threaded {threaded} at ({i}, {j})"
                                )
                            },
                        );
                    }
                }
                for (at, v) in c.iter().enumerate() {
                    assert!(
                        written[at] || v.is_nan(),
                        "{m}x{n}x{k}: element {at} outside C was written"
                    );
                }
            }
        }
    }
}

/// Decoding products (at most 16 rows) sum each element in one chain over `k` whatever the
/// number of rows: a row computed alone equals the same row computed in a batch of 8 or 16,
/// bit for bit, threaded or not (a request joining a running batch gets the tokens it would
/// get alone).
#[test]
fn small_m_rows_do_not_depend_on_the_batch() {
    let mut rng = Rng(0x5eed_0018);
    for (m, n, k) in [
        (8usize, 300usize, 300usize),
        (8, 32128, 64),
        (8, 1024, 512),
        (16, 300, 300),
        (13, 1024, 512),
    ] {
        let a: Vec<f32> = (0..m * k).map(|_| rng.uniform() as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.uniform() as f32).collect();
        let product = |rows: usize, a: &[f32], threaded: bool| {
            let mut c = vec![f32::NAN; rows * n];
            // SAFETY: a holds rows x k, b holds k x n, c holds rows x n, all row-major.
            unsafe {
                sgemm_strided(
                    rows,
                    n,
                    k,
                    a.as_ptr(),
                    k as isize,
                    1,
                    b.as_ptr(),
                    n as isize,
                    1,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                    threaded,
                );
            }
            c
        };
        for threaded in [false, true] {
            let batch = product(m, &a, threaded);
            for i in 0..m {
                let alone = product(1, &a[i * k..(i + 1) * k], !threaded);
                assert!(
                    alone
                        .iter()
                        .zip(&batch[i * n..(i + 1) * n])
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{n}x{k}: row {i} alone differs from the same row in a batch of {m}"
                );
            }
        }
    }
}

/// The decoding kernel on row-major `a` (`m x k`), `b` (`k x n`) and `c` (`m x n`, its first
/// `m * n` values), threaded, with the wide strips or not: whether it took the product.
#[cfg(target_arch = "x86_64")]
fn small_m_row_major(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    wide: bool,
) -> bool {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: a, b and c hold the row-major matrices (checked above); the callers pass `wide`
    // only where the CPU has AVX-512F.
    unsafe {
        crate::small_m::sgemm(
            m,
            n,
            k,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            c.as_mut_ptr(),
            n as isize,
            1,
            true,
            wide,
        )
    }
}

/// The wide strips (AVX-512) run the same chains as the AVX2 strips: the same bits, on
/// shapes with a tail of 8 columns and of single columns, with 1, 5 and 8 rows of `A`, and
/// with 11 and 16 (which the AVX2 strips take 8 rows at a time).
#[test]
#[cfg(target_arch = "x86_64")]
fn small_m_wide_strips_equal_the_narrow_ones() {
    let wide = std::is_x86_feature_detected!("avx512f");
    let narrow = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    if !(wide && narrow) {
        return;
    }
    let mut rng = Rng(0x5eed_0019);
    for (m, n, k) in [
        (8usize, 300usize, 300usize),
        (1, 1048, 200),
        (5, 384, 512),
        (16, 300, 300),
        (11, 1048, 200),
    ] {
        let a: Vec<f32> = (0..m * k).map(|_| rng.uniform() as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.uniform() as f32).collect();
        let product = |wide: bool| {
            let mut c = vec![f32::NAN; m * n];
            let took = small_m_row_major((m, n, k), &a, &b, &mut c, wide);
            assert!(took, "{m}x{n}x{k} takes the small-M path");
            c
        };
        let (narrow, wide) = (product(false), product(true));
        assert!(
            narrow.iter().all(|v| v.is_finite()),
            "{m}x{n}x{k}: every element written"
        );
        assert!(
            narrow
                .iter()
                .zip(&wide)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{m}x{n}x{k}: the wide strips differ from the narrow ones"
        );
    }
}

/// The decoding shapes above do take the small-M path on a CPU that has AVX2 and FMA (so the
/// tests above check it, not `gemm`), and a small `B` does not.
#[test]
#[cfg(target_arch = "x86_64")]
fn small_m_path_takes_decoding_shapes() {
    if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
        || std::env::var("PEFT_GEMM_SMALL_M").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
    {
        return;
    }
    let (m, n, k) = (16, 384, 512);
    // Room for 17 rows, for the call that must decline.
    let a = vec![1.0f32; (m + 1) * k];
    let b = vec![1.0f32; k * n];
    let mut c = vec![f32::NAN; (m + 1) * n];
    let wide = crate::small_m::wide();
    assert!(
        small_m_row_major((m, n, k), &a, &b, &mut c, wide),
        "16 x 512 x 384 takes the small-M path"
    );
    assert!(c[..m * n].iter().all(|&v| v == k as f32));
    assert!(
        !small_m_row_major((m + 1, n, k), &a, &b, &mut c, wide),
        "17 rows stay with gemm"
    );
    assert!(
        !small_m_row_major((m, 32, 32), &a, &b, &mut c, wide),
        "a 32 x 32 B stays with gemm"
    );
}

/// A product through a packed `B` equals the in-place decoding kernel's bit for bit (the same
/// chain per element), with the AVX-512 panels (one or two at a time) and the AVX2 ones: 1 to
/// 16 rows, a last panel of 1, 5 and 8 columns (alone and as the second of a pair), `k` past the in-place kernel's 128-row blocks, a transposed `B`,
/// and a `C` wider than `n` whose other columns stay untouched.
#[test]
#[cfg(target_arch = "x86_64")]
fn packed_products_equal_the_in_place_kernel() {
    use crate::packed::{PackedB, sgemm_packed_with};
    if !crate::packed::packed_supported() {
        return;
    }
    let avx512 = std::is_x86_feature_detected!("avx512f");
    let mut rng = Rng(0x5eed_0020);
    for (m, n, k) in [
        (1usize, 384usize, 512usize),
        (8, 1024, 512),
        (8, 37, 300),
        (3, 21, 130),
        (16, 392, 200),
        (11, 24, 1),
        (13, 1, 64),
        (5, 2100, 40),
    ] {
        let a: Vec<f32> = (0..m * k).map(|_| rng.uniform() as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.uniform() as f32).collect();
        // The same B stored column-major, read through transposed strides.
        let mut bt = vec![0.0f32; k * n];
        for l in 0..k {
            for j in 0..n {
                bt[j * k + l] = b[l * n + j];
            }
        }
        // One chain of fused multiply-adds over k per element, as the in-place kernel sums.
        let mut want = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).fold(0.0f32, |s, l| a[i * k + l].mul_add(b[l * n + j], s));
            }
        }
        if crate::packed_matches_in_place(m, n, k, 1) {
            let in_place = row_major_product(m, n, k, &a, &b);
            assert!(
                in_place
                    .iter()
                    .zip(&want)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{m}x{n}x{k}: the in-place kernel sums one chain per element"
            );
        }
        // SAFETY: b is k x n row-major, bt the same column-major.
        let packs = unsafe {
            [
                PackedB::pack(k, n, b.as_ptr(), n as isize, 1).expect("memory"),
                PackedB::pack(k, n, bt.as_ptr(), 1, k as isize).expect("memory"),
            ]
        };
        for (which, p) in packs.iter().enumerate() {
            assert_eq!((p.k(), p.n()), (k, n));
            assert_eq!(p.bytes(), n.div_ceil(16) * 16 * k * 4);
            for wide in [false, true] {
                if wide && !avx512 {
                    continue;
                }
                for threaded in [false, true] {
                    // C is m x (n + 3): the 3 columns past n must stay NaN.
                    let ld = n + 3;
                    let mut c = vec![f32::NAN; m * ld];
                    // SAFETY: a is m x k row-major; c has m rows of ld >= n columns.
                    let took = unsafe {
                        sgemm_packed_with(
                            m,
                            a.as_ptr(),
                            k as isize,
                            1,
                            p,
                            c.as_mut_ptr(),
                            ld as isize,
                            1,
                            threaded,
                            wide,
                        )
                    };
                    assert!(took, "{m}x{n}x{k} takes the packed path");
                    for i in 0..m {
                        for j in 0..ld {
                            let got = c[i * ld + j];
                            if j < n {
                                assert_eq!(
                                    got.to_bits(),
                                    want[i * n + j].to_bits(),
                                    "{m}x{n}x{k} B{which} wide {wide} threaded {threaded} at ({i}, {j})"
                                );
                            } else {
                                assert!(got.is_nan(), "{m}x{n}x{k}: column {j} past n written");
                            }
                        }
                    }
                }
            }
        }
    }
    // More than 16 rows, or C's columns apart, decline without writing.
    let p = unsafe { PackedB::pack(2, 16, [1.0f32; 32].as_ptr(), 16, 1) }.expect("memory");
    let a = [1.0f32; 34];
    let mut c = [f32::NAN; 17 * 16];
    assert!(!unsafe { sgemm_packed(17, a.as_ptr(), 2, 1, &p, c.as_mut_ptr(), 16, 1, true) });
    assert!(!unsafe { sgemm_packed(1, a.as_ptr(), 2, 1, &p, c.as_mut_ptr(), 1, 16, true) });
    assert!(c.iter().all(|v| v.is_nan()));
    assert_eq!(PackedB::bytes_for(usize::MAX, 16), None);
    // The shapes the in-place kernel takes, and so the ones worth packing.
    if std::env::var_os("PEFT_GEMM_SMALL_M").is_none()
        && std::env::var_os("PEFT_GEMM_KERNEL").is_none()
    {
        assert!(crate::packed_matches_in_place(8, 384, 512, 1));
        assert!(crate::packed_matches_in_place(16, 32128, 512, 1));
        assert!(!crate::packed_matches_in_place(17, 384, 512, 1), "17 rows");
        assert!(!crate::packed_matches_in_place(8, 8, 4096, 1), "8 columns");
        assert!(
            !crate::packed_matches_in_place(8, 64, 64, 1),
            "a B in cache"
        );
        assert!(
            !crate::packed_matches_in_place(8, 384, 512, 384),
            "a transposed B"
        );
    }
}

/// [`depth_block`] says how `sgemm_strided` sums: where it answers, chains of fused
/// multiply-adds over its blocks, added in order, give the product bit for bit; decoding
/// shapes (the decoding kernel), `gemm`'s small and large blocking, depths past one block.
#[test]
fn depth_block_predicts_the_sums_bit_for_bit() {
    let mut rng = Rng(23);
    let mut answered = 0;
    for &m in &[1usize, 2, 5, 8, 16, 17, 40, 100, 128] {
        for &n in &[1usize, 3, 8, 16, 65, 384, 1000] {
            for &k in &[3usize, 100, 512, 513, 700, 1024, 2048] {
                let Some(kc) = depth_block(m, n, k) else {
                    continue;
                };
                answered += 1;
                assert!(kc >= 1, "{m}x{k}x{n}");
                let a: Vec<f32> = (0..m * k).map(|_| rng.uniform() as f32).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.uniform() as f32).collect();
                let c = row_major_product(m, n, k, &a, &b);
                for i in 0..m {
                    for j in 0..n {
                        let mut sum = 0.0f32;
                        for (block, l0) in (0..k).step_by(kc).enumerate() {
                            let mut chain = 0.0f32;
                            for l in l0..(l0 + kc).min(k) {
                                chain = a[i * k + l].mul_add(b[l * n + j], chain);
                            }
                            sum = if block == 0 { chain } else { sum + chain };
                        }
                        assert_eq!(
                            c[i * n + j].to_bits(),
                            sum.to_bits(),
                            "{m}x{k}x{n} (block {kc}): ({i}, {j})"
                        );
                    }
                }
            }
        }
    }
    if std::env::var_os("PEFT_GEMM_KERNEL").is_none() && cfg!(target_arch = "x86_64") {
        assert!(answered > 100, "only {answered} shapes answered");
    }
    // Paths that sum otherwise.
    assert_eq!(depth_block(1, 8, 512), None, "a matrix-vector product");
    assert_eq!(depth_block(5, 7, 6), None, "matrixmultiply");
    assert_eq!(depth_block(40, 384, 2), None, "depth 2");
}

/// A product cut into column blocks, one per thread ([`column_split`]), equals `gemm`'s own
/// threaded product bit for bit, on every layout of `B` and `C` and with a short last block;
/// and the cut applies to the decoder's shapes on two threads.
#[test]
fn column_split_products_equal_gemms_threaded_product() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a pool");
    // Where `gemm`'s blocking is known (an FMA CPU) and nothing turned the cut off.
    let applies =
        std::env::var_os("PEFT_GEMM_SPLIT").is_none() && depth_block(128, 384, 512).is_some();
    if applies {
        for (m, n, k) in [(128, 384, 512), (128, 1024, 512), (128, 32128, 512)] {
            assert!(column_split(m, n, k, 2).is_some(), "{m}x{k}x{n}");
        }
    }
    assert_eq!(column_split(8, 1024, 512, 2), None, "decoding rows");
    assert_eq!(column_split(1024, 1024, 512, 2), None, "many rows");
    assert_eq!(column_split(128, 200, 512, 2), None, "narrow");
    let mut rng = Rng(0x5eed_0031);
    let mut cut = 0;
    for (m, n, k) in [
        (128, 384, 512),
        (100, 530, 300),
        (256, 700, 1100),
        (40, 999, 64),
    ] {
        let a: Vec<f32> = (0..m * k).map(|_| rng.uniform() as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.uniform() as f32).collect();
        for ((b_rs, b_cs), (c_rs, c_cs)) in [
            ((n as isize, 1), (n as isize, 1)),
            ((1, k as isize), (1, m as isize)),
        ] {
            let run = |split: bool| {
                let mut c = vec![f32::NAN; m * n];
                pool.install(|| {
                    // SAFETY: the buffers hold the matrices the strides describe.
                    unsafe {
                        if split {
                            sgemm_strided(
                                m,
                                n,
                                k,
                                a.as_ptr(),
                                k as isize,
                                1,
                                b.as_ptr(),
                                b_rs,
                                b_cs,
                                c.as_mut_ptr(),
                                c_rs,
                                c_cs,
                                true,
                            )
                        } else {
                            in_gemm(
                                m,
                                n,
                                k,
                                a.as_ptr(),
                                k as isize,
                                1,
                                b.as_ptr(),
                                b_rs,
                                b_cs,
                                c.as_mut_ptr(),
                                c_rs,
                                c_cs,
                                Parallelism::Rayon(2),
                            )
                        }
                    }
                });
                c
            };
            let (whole, parts) = (run(false), run(true));
            if pool.install(|| column_split(m, n, k, 2)).is_some() {
                cut += 1;
            }
            for (i, (x, y)) in whole.iter().zip(&parts).enumerate() {
                assert_eq!(
                    x.to_bits(),
                    y.to_bits(),
                    "{m}x{k}x{n} B ({b_rs}, {b_cs}): element {i}"
                );
            }
        }
    }
    if applies {
        assert!(cut >= 4, "only {cut} products were cut");
    }
}

/// `A B` through [`sgemm_strided`] (threaded), `A` (`m x k`), `B` (`k x n`) and the result
/// row-major; the result starts as NaN, so an element left unwritten shows.
fn row_major_product(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    assert!(a.len() == m * k && b.len() == k * n);
    let mut c = vec![f32::NAN; m * n];
    // SAFETY: row-major m x k, k x n and m x n (checked above).
    unsafe {
        sgemm_strided(
            m,
            n,
            k,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            c.as_mut_ptr(),
            n as isize,
            1,
            true,
        )
    };
    c
}
