//! GFLOP/s of `cblas_sgemm` (row-major `C = A * B`, beta = 0) on the shapes of
//! `shared/notes/cpu-gemm.md`: the median and the best of timed repetitions after a
//! warm-up (on a busy machine the best is the better estimate of the quiet figure).
//!
//! ```text
//! RAYON_NUM_THREADS=1 cargo run --release --example sgemm_bench -p peft-gemm
//! RAYON_NUM_THREADS=2 cargo run --release --example sgemm_bench -p peft-gemm
//! cargo run --release --example sgemm_bench -p peft-gemm -- threshold
//! RAYON_NUM_THREADS=2 cargo run --release --example sgemm_bench -p peft-gemm -- layouts
//! RAYON_NUM_THREADS=2 cargo run --release --example sgemm_bench -p peft-gemm -- decode
//! RAYON_NUM_THREADS=2 cargo run --release --example sgemm_bench -p peft-gemm -- 1024 512 384
//! ```
//!
//! With numbers, times each `m k n` triple given.
//!
//! `decode` times the products of one greedy decoding step (8 rows by every weight of the
//! bench's mT5-small, 154 MB) against the memory bandwidth, and each decoder shape alone;
//! `PEFT_GEMM_SMALL_M=off` times `gemm` in place of the decoding kernel.
//!
//! `layouts` times `sgemm_strided` on the products of an mT5-small LoRA step with `B` stored
//! row-major (a forward product) and column-major (the backward's `dY · Wᵀ`, read in place).
//!
//! `split` compares `gemm`'s own threads with `sgemm_strided`, which cuts a product of few
//! rows into one single-threaded column block per thread (`peft_gemm::column_split`), from
//! inside the pool, on the 128-row products of the bench's decoder (and one it leaves whole).
//!
//! `threshold` compares one thread against all of rayon's on square products around
//! `peft_gemm::PARALLEL_THRESHOLD`, calling `gemm` directly.

use std::hint::black_box;
use std::time::{Duration, Instant};

use peft_gemm::{CBLAS_NO_TRANS, CBLAS_ROW_MAJOR, cblas_sgemm};

/// GFLOP/s (median, best) of `f`, which performs `flops` floating-point operations,
/// repeated for about `budget` after a warm-up call.
fn gflops(flops: f64, budget: Duration, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let start = Instant::now();
    f();
    let once = start.elapsed().as_secs_f64().max(1e-7);
    let reps = ((budget.as_secs_f64() / once) as usize).clamp(5, 5000);
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (flops / times[times.len() / 2] / 1e9, flops / times[0] / 1e9)
}

fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                / (1 << 24) as f32
                - 0.5
        })
        .collect()
}

fn sgemm(m: usize, k: usize, n: usize) -> (f64, f64) {
    let a = data(m * k, 1);
    let b = data(k * n, 2);
    let mut c = vec![0.0f32; m * n];
    let flops = 2.0 * (m * n * k) as f64;
    gflops(flops, Duration::from_millis(800), || {
        // SAFETY: a is m x k, b is k x n, c is m x n, all row-major and tight.
        unsafe {
            cblas_sgemm(
                CBLAS_ROW_MAJOR,
                CBLAS_NO_TRANS,
                CBLAS_NO_TRANS,
                m as i32,
                n as i32,
                k as i32,
                1.0,
                a.as_ptr(),
                k as i32,
                b.as_ptr(),
                n as i32,
                0.0,
                c.as_mut_ptr(),
                n as i32,
            );
        }
        black_box(&mut c);
    })
}

fn threshold() {
    let threads = rayon::current_num_threads();
    println!("s x s x s: GFLOP/s median/best, Parallelism::None vs Rayon({threads})");
    for s in [48, 64, 80, 96, 112, 128, 160, 192, 256, 384] {
        let a = data(s * s, 1);
        let b = data(s * s, 2);
        let mut c = vec![0.0f32; s * s];
        let flops = 2.0 * (s * s * s) as f64;
        let mut run = |par: gemm::Parallelism| {
            gflops(flops, Duration::from_millis(400), || {
                // SAFETY: three tight row-major s x s matrices.
                unsafe {
                    gemm_cols(
                        s,
                        s,
                        a.as_ptr(),
                        b.as_ptr(),
                        s,
                        c.as_mut_ptr(),
                        s,
                        0..s,
                        par,
                    )
                };
                black_box(&mut c);
            })
        };
        let (one_med, one_best) = run(gemm::Parallelism::None);
        let (all_med, all_best) = run(gemm::Parallelism::Rayon(threads));
        println!(
            "{s:>4}^3  1 thread {one_med:6.1} / {one_best:6.1}   rayon {all_med:6.1} / {all_best:6.1}"
        );
    }
}

/// `C[:, cols] := A B[:, cols]` with `gemm` on row-major tight matrices, `ldb`/`ldc` the
/// full widths.
///
/// # Safety
/// `a` is m x k (row stride k), `b` covers k rows of `ldb`, `c` covers m rows of `ldc`, and
/// `cols` lies within both widths.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_cols(
    m: usize,
    k: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    cols: std::ops::Range<usize>,
    par: gemm::Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            cols.len(),
            k,
            c.add(cols.start),
            1,
            ldc as isize,
            false,
            a,
            1,
            k as isize,
            b.add(cols.start),
            1,
            ldb as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

fn split() {
    let threads = rayon::current_num_threads();
    println!(
        "m x k x n: GFLOP/s median / best; gemm Rayon({threads}) | sgemm_strided (cut: column blocks)"
    );
    let pool = rayon::ThreadPoolBuilder::new().build().expect("a pool");
    for (m, k, n) in [
        (128, 512, 384),
        (128, 384, 512),
        (128, 512, 1024),
        (128, 1024, 512),
        (128, 512, 32128),
        (1024, 512, 384),
    ] {
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let mut c1 = vec![0.0f32; m * n];
        let mut c2 = vec![f32::NAN; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let whole = pool.install(|| {
            gflops(flops, Duration::from_millis(600), || {
                // SAFETY: tight row-major matrices of the shapes above.
                unsafe {
                    gemm_cols(
                        m,
                        k,
                        a.as_ptr(),
                        b.as_ptr(),
                        n,
                        c1.as_mut_ptr(),
                        n,
                        0..n,
                        gemm::Parallelism::Rayon(threads),
                    )
                };
                black_box(&mut c1);
            })
        });
        let cut = peft_gemm::column_split(m, n, k, threads).is_some();
        let strided = pool.install(|| {
            gflops(flops, Duration::from_millis(600), || {
                row_major(m, n, k, &a, &b, &mut c2);
                black_box(&mut c2);
            })
        });
        let same = c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits());
        println!(
            "{m:>5} x {k:>5} x {n:<6} {:6.1} / {:6.1} | {:6.1} / {:6.1}  cut {cut}, bit-equal {same}",
            whole.0, whole.1, strided.0, strided.1
        );
    }
}

fn layouts() {
    println!(
        "sgemm_strided, rayon threads: {}; GFLOP/s median / best, B row-major | B column-major",
        rayon::current_num_threads()
    );
    for (m, k, n) in [
        (1024, 512, 384),
        (1024, 384, 512),
        (1024, 512, 1024),
        (1024, 1024, 512),
        (128, 512, 32128),
        (128, 32128, 512),
    ] {
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let mut c = vec![0.0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let mut run = |(b_rs, b_cs): (isize, isize)| {
            gflops(flops, Duration::from_millis(600), || {
                // SAFETY: a is m x k row-major, b holds k x n in the given layout, c is m x n.
                unsafe {
                    peft_gemm::sgemm_strided(
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
                        n as isize,
                        1,
                        true,
                    );
                }
                black_box(&mut c);
            })
        };
        let (rm, rb) = run((n as isize, 1));
        let (cm, cb) = run((1, k as isize));
        println!("{m:>5} x {k:>5} x {n:<6} {rm:6.1} / {rb:6.1} | {cm:6.1} / {cb:6.1}");
    }
}

/// `C := A B`, all row-major and tight (`A` m x k, `B` k x n, `C` m x n), through
/// `sgemm_strided` with threads allowed.
fn row_major(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: the slices cover the matrices (checked above).
    unsafe {
        peft_gemm::sgemm_strided(
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
        );
    }
}

/// One greedy decoding step of the bench's mT5-small at batch 8, as products only: every
/// weight its own matrix (8 decoder blocks: self-attention q, k, v, o, cross-attention q, o,
/// feed-forward wi_0, wi_1, wo; then the 32,128-row LM head), 154 MB in all, so that each
/// sweep streams the weights from memory as decoding does. Milliseconds per sweep and the
/// weights' GB/s, in place and packed (`peft_gemm::PackedB`), against a threaded sum over
/// the same bytes. The calls come from outside rayon's pool, so each small product also
/// wakes a worker; `peft` calls from inside it, with the workers awake.
fn decode() {
    let m = 8;
    let mut shapes = Vec::new();
    for _ in 0..8 {
        shapes.extend([(512, 384); 4]);
        shapes.extend([(512, 384), (384, 512)]);
        shapes.extend([(512, 1024), (512, 1024), (1024, 512)]);
    }
    shapes.push((512, 32128));
    let weights: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(k, n))| data(k * n, i as u32))
        .collect();
    let bytes: usize = weights.iter().map(|w| w.len() * 4).sum();
    let a = data(m * 1024, 7);
    let mut c = vec![0.0f32; m * 32128];
    let time = |f: &mut dyn FnMut()| {
        f();
        let mut t: Vec<f64> = (0..15)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        (t[t.len() / 2], t[0])
    };
    let (med, best) = time(&mut || {
        for (w, &(k, n)) in weights.iter().zip(&shapes) {
            row_major(m, n, k, &a, w, &mut c);
        }
        black_box(&mut c);
    });
    let gb = bytes as f64 / 1e9;
    println!(
        "decode step products (m = 8, {:.0} MB of weights), rayon threads {}: {:.2} ms median, {:.2} ms best ({:.1} GB/s)",
        gb * 1e3,
        rayon::current_num_threads(),
        med * 1e3,
        best * 1e3,
        gb / best
    );
    let packed: Vec<peft_gemm::PackedB> = weights
        .iter()
        .zip(&shapes)
        .map(|(w, &(k, n))| {
            // SAFETY: w is a tight row-major k x n matrix.
            unsafe { peft_gemm::PackedB::pack(k, n, w.as_ptr(), n as isize, 1) }.expect("memory")
        })
        .collect();
    let (med, best) = time(&mut || {
        for p in &packed {
            // SAFETY: a holds m x k, c m x n, both tight row-major.
            let took = unsafe {
                peft_gemm::sgemm_packed(
                    m,
                    a.as_ptr(),
                    p.k() as isize,
                    1,
                    p,
                    c.as_mut_ptr(),
                    p.n() as isize,
                    1,
                    true,
                )
            };
            assert!(took, "the packed path applies");
        }
        black_box(&mut c);
    });
    println!(
        "the same products with the weights packed in panels: {:.2} ms median, {:.2} ms best ({:.1} GB/s)",
        med * 1e3,
        best * 1e3,
        gb / best
    );
    let head = packed.last().expect("the LM head");
    let (med, best) = time(&mut || {
        // SAFETY: as above.
        unsafe {
            peft_gemm::sgemm_packed(m, a.as_ptr(), 512, 1, head, c.as_mut_ptr(), 32128, 1, true)
        };
        black_box(&mut c);
    });
    println!(
        "  the LM head alone, packed: {:.2} ms median, {:.2} ms best ({:.1} GB/s)",
        med * 1e3,
        best * 1e3,
        head.bytes() as f64 / 1e9 / best
    );
    for (k, n) in [
        (128usize, 256usize),
        (512, 384),
        (512, 1024),
        (1024, 512),
        (512, 32128),
    ] {
        let w = data(k * n, 5);
        let (_, best) = time(&mut || {
            row_major(m, n, k, &a, &w, &mut c);
            black_box(&mut c);
        });
        println!(
            "  8 x {k} x {n}, the same weight again: {:.3} ms best, {:.1} GFLOP/s",
            best * 1e3,
            2.0 * (m * k * n) as f64 / best / 1e9
        );
    }
    // The same products reusing one 4 MB weight (from L3, not memory).
    let flops: f64 = shapes.iter().map(|&(k, n)| 2.0 * (m * k * n) as f64).sum();
    let small = data(1024 * 1024, 3);
    let (_, hot) = time(&mut || {
        for &(k, n) in &shapes {
            let (k, n) = if n > 1024 { (k, 1024) } else { (k, n) };
            row_major(m, n, k, &a, &small, &mut c);
        }
        black_box(&mut c);
    });
    let hot_flops = flops - 2.0 * (m * 512 * (32128 - 1024)) as f64;
    println!(
        "the same products reusing one 4 MB weight (LM head cut to 1024 columns): {:.2} ms best, {:.1} GFLOP/s",
        hot * 1e3,
        hot_flops / hot / 1e9
    );
    use rayon::prelude::*;
    let (med, best) = time(&mut || {
        let s: f32 = weights
            .par_iter()
            .map(|w| {
                // 16 independent sums, so that the compiler vectorises and memory is the limit.
                let mut acc = [0.0f32; 16];
                for chunk in w.chunks_exact(16) {
                    for (a, v) in acc.iter_mut().zip(chunk) {
                        *a += v;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        black_box(s);
    });
    println!(
        "threaded sum over the same weights: {:.2} ms median, {:.2} ms best ({:.1} GB/s)",
        med * 1e3,
        best * 1e3,
        gb / best
    );
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("threshold") {
        threshold();
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("split") {
        split();
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("decode") {
        decode();
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("layouts") {
        layouts();
        return;
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    if !args.is_empty() {
        // `m k n` triples given on the command line.
        for t in args.chunks_exact(3) {
            let (median, best) = sgemm(t[0], t[1], t[2]);
            println!(
                "{:>5} x {:>4} x {:<6} {median:6.1} / {best:6.1}",
                t[0], t[1], t[2]
            );
        }
        return;
    }
    println!(
        "cblas_sgemm (peft-gemm), rayon threads: {}; GFLOP/s median / best",
        rayon::current_num_threads()
    );
    let shapes = [
        (1024, 512, 384),
        (128, 512, 32128),
        (8, 512, 32128),
        (8, 512, 384),
        (1024, 512, 8),
        (1024, 8, 384),
    ];
    for (m, k, n) in shapes {
        let (median, best) = sgemm(m, k, n);
        println!("{m:>5} x {k:>3} x {n:<6} {median:6.1} / {best:6.1}");
    }
}
