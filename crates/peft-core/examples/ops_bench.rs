//! Times a fused host operation against the operations it replaces, interleaved in one
//! process, on the bench's mT5-small encoder shape (`[8, 128, 1024]`, one feed-forward's
//! inner activation): `ops::gelu_tanh_mul` against `ops::mul(nn::gelu_tanh(..), ..)`.
//! Medians of 300 alternated calls each, on rayon's pool as the model runs them.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release --example ops_bench -p peft-core
//! ```

use std::time::Instant;

use burn::backend::NdArray;
use burn::tensor::{Distribution, Tensor};
use peft_core::{nn, ops};

type B = NdArray<f32>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.0);
    let gate = Tensor::<B, 3>::random([8, 128, 1024], normal, &device);
    let linear = Tensor::<B, 3>::random([8, 128, 1024], normal, &device);
    let (mut apart, mut fused) = (Vec::new(), Vec::new());
    ops::on_pool(|| {
        for i in 0..600 {
            let t = Instant::now();
            let y = if i % 2 == 0 {
                ops::mul(nn::gelu_tanh(gate.clone()), linear.clone())
            } else {
                ops::gelu_tanh_mul(gate.clone(), linear.clone())
            };
            let s = t.elapsed().as_secs_f64();
            drop(y);
            if i % 2 == 0 { &mut apart } else { &mut fused }.push(s);
        }
    });
    let (a, f) = (median(apart), median(fused));
    println!(
        "gelu_tanh then mul {:.3} ms, gelu_tanh_mul {:.3} ms: {:.3}x the time",
        a * 1e3,
        f * 1e3,
        f / a
    );
}
