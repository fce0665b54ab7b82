//! Dropout for every model and adapter of this workspace: `burn::nn::Dropout`'s semantics
//! (active only on autodiff backends, inverted scaling `1 / (1 - p)`), with masks that are cheap
//! on the CPU.
//!
//! burn-ndarray draws a Bernoulli mask one element at a time from a ChaCha generator; on an
//! mT5-small LoRA step that was a fifth of the time. On CPU backends the mask is drawn here
//! instead, from SplitMix64 streams (two 32-bit draws per 64-bit state), deterministically from
//! the seed set with [`seed`] and the order of dropout calls. GPU backends keep drawing on the
//! device with the backend's generator (seeded by `Backend::seed`), as a host mask would have to
//! be copied over.

use std::sync::atomic::{AtomicU64, Ordering};

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};

use crate::train::SplitMix;

static STATE: AtomicU64 = AtomicU64::new(0x853c_49e6_748f_ea9b);

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Seeds the CPU dropout masks (call it where `Backend::seed` is called).
pub fn seed(seed: u64) {
    STATE.store(
        SplitMix::mix(seed ^ 0x6a09_e667_f3bc_c908),
        Ordering::SeqCst,
    );
}

/// Whether `B` computes on the host (burn-ndarray, burn-flex, and autodiff over them).
fn host_backend<B: Backend>() -> bool {
    let name = core::any::type_name::<B>();
    name.contains("NdArray") || name.contains("Flex")
}

/// A mask of `n` values, each `scale` with probability `keep` and 0 otherwise.
///
/// Value `j` is half `j % 2` (low 32 bits, then high) of the stream's draw `j / 2`, and
/// SplitMix64's draw `q` is `mix(state + (q + 1) * GOLDEN)`, so blocks of the mask are drawn
/// on rayon's threads independently and the mask is the one a single thread would draw.
fn host_mask(n: usize, keep: f64, scale: f32) -> Vec<f32> {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 14;
    let threshold = (keep * 4_294_967_296.0) as u64;
    let start = STATE.fetch_add(GOLDEN.wrapping_mul(n as u64 | 1), Ordering::SeqCst);
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(block, chunk)| {
            // BLOCK is even, so every block starts on the low half of a draw.
            let first = (block * BLOCK / 2) as u64;
            for (q, pair) in chunk.chunks_mut(2).enumerate() {
                let z =
                    SplitMix::mix(start.wrapping_add(GOLDEN.wrapping_mul(first + q as u64 + 1)));
                for (v, half) in pair.iter_mut().zip([z & 0xffff_ffff, z >> 32]) {
                    *v = if half < threshold { scale } else { 0.0 };
                }
            }
        });
    out
}

/// `n` draws from U[0, 1) on the same seeded host stream as the dropout masks (LoHa's rank and
/// module dropout).
pub fn uniform(n: usize) -> Vec<f32> {
    let mut rng = SplitMix(STATE.fetch_add(GOLDEN.wrapping_mul(n as u64 | 1), Ordering::SeqCst));
    (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
        .collect()
}

/// Randomly zeroes elements with probability `prob` during training (autodiff backends) and
/// scales the rest by `1 / (1 - prob)`; the identity otherwise.
#[derive(Module, Clone, Debug)]
pub struct Dropout {
    /// Probability of zeroing an element.
    pub prob: f64,
}

impl Dropout {
    /// Dropout with probability `prob`.
    pub fn new(prob: f64) -> Self {
        Dropout { prob }
    }

    /// Whether [`forward`](Self::forward) changes its input on backend `B` (training on an
    /// autodiff backend, with `prob > 0`): PEFT's "dropout is not `nn.Identity` and the module
    /// is training".
    pub fn is_active<B: Backend>(&self, device: &B::Device) -> bool {
        B::ad_enabled(device) && self.prob != 0.0
    }

    /// Applies dropout (identity outside training or with `prob == 0`).
    pub fn forward<B: Backend, const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let device = input.device();
        if !B::ad_enabled(&device) || self.prob == 0.0 {
            return input;
        }
        let keep = 1.0 - self.prob;
        if host_backend::<B>() {
            let shape = input.shape();
            let mask = host_mask(shape.num_elements(), keep, (1.0 / keep) as f32);
            let mask = Tensor::<B, D>::from_data(TensorData::new(mask, shape), &device);
            return input * mask;
        }
        let mask = input.random_like(Distribution::Bernoulli(keep));
        input * mask * (1.0 / keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_masks_keep_the_requested_fraction_and_are_reproducible() {
        seed(7);
        let a = host_mask(200_000, 0.9, 2.0);
        seed(7);
        let b = host_mask(200_000, 0.9, 2.0);
        assert_eq!(a, b);
        let kept = a.iter().filter(|v| **v == 2.0).count() as f64 / a.len() as f64;
        assert!((kept - 0.9).abs() < 0.005, "{kept}");
        assert!(a.iter().all(|v| *v == 0.0 || *v == 2.0));
        let c = host_mask(200_000, 0.9, 2.0);
        assert_ne!(a, c, "the next call draws a new mask");
        // The parallel blocks draw exactly the sequential stream.
        seed(7);
        let start = STATE.load(Ordering::SeqCst);
        let mut rng = SplitMix(start);
        let threshold = (0.9 * 4_294_967_296.0) as u64;
        let mut sequential = Vec::new();
        while sequential.len() < 200_001 {
            let z = rng.next_u64();
            for half in [z & 0xffff_ffff, z >> 32] {
                sequential.push(if half < threshold { 2.0 } else { 0.0 });
            }
        }
        sequential.truncate(200_001);
        assert_eq!(host_mask(200_001, 0.9, 2.0), sequential);
    }
}
