//! How long a product takes through burn's NdArray `matmul` (what every linear layer calls),
//! to compare with the raw `cblas_sgemm` of `crates/peft-gemm/examples/sgemm_bench.rs` on the
//! same shapes: the difference is burn-ndarray's work around the product (the operand copies
//! of its `reshape`, the output allocation).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p peft-cli --example burn_matmul_probe
//! ```

use std::time::Instant;

use burn::backend::NdArray;
use burn::tensor::{Distribution, Tensor};
// The CBLAS symbols ndarray calls come with peft-core (peft-gemm).
use peft_core as _;

fn main() {
    type B = NdArray<f32>;
    let device = Default::default();
    for (m, k, n) in [(8usize, 512usize, 32128usize), (1024, 512, 384)] {
        let x = Tensor::<B, 2>::random([m, k], Distribution::Default, &device);
        let w = Tensor::<B, 2>::random([k, n], Distribution::Default, &device);
        let _ = x.clone().matmul(w.clone()).into_data();
        let mut times: Vec<f64> = (0..20)
            .map(|_| {
                let t = Instant::now();
                let _ = x.clone().matmul(w.clone()).into_data();
                t.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{m} x {k} x {n}: {:.2} ms, {:.1} GFLOP/s",
            median * 1e3,
            2.0 * (m * k * n) as f64 / median / 1e9
        );
    }
}
