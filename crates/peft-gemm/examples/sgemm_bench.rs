//! GFLOP/s of `cblas_sgemm` (row-major `C = A * B`, beta = 0) on the shapes of
//! `shared/notes/cpu-gemm.md`: the median and the best of timed repetitions after a
//! warm-up (on a busy machine the best is the better estimate of the quiet figure).
//!
//! ```text
//! RAYON_NUM_THREADS=1 cargo run --release --example sgemm_bench -p peft-gemm
//! RAYON_NUM_THREADS=2 cargo run --release --example sgemm_bench -p peft-gemm
//! cargo run --release --example sgemm_bench -p peft-gemm -- threshold
//! RAYON_NUM_THREADS=2 cargo run --release --example sgemm_bench -p peft-gemm -- layouts
//! ```
//!
//! `layouts` times `sgemm_strided` on the products of an mT5-small LoRA step with `B` stored
//! row-major (a forward product) and column-major (the backward's `dY · Wᵀ`, read in place).
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
                let ld = s as isize;
                // SAFETY: three tight row-major s x s matrices.
                unsafe {
                    gemm::gemm(
                        s,
                        s,
                        s,
                        c.as_mut_ptr(),
                        1,
                        ld,
                        false,
                        a.as_ptr(),
                        1,
                        ld,
                        b.as_ptr(),
                        1,
                        ld,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                }
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

fn main() {
    if std::env::args().nth(1).as_deref() == Some("threshold") {
        threshold();
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("layouts") {
        layouts();
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
