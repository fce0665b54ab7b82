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

/// Where a dropout call's mask lies in the seeded stream, and the probability of keeping.
///
/// Element `j` of the mask is kept when half `j % 2` (low 32 bits, then high) of the stream's
/// draw `j / 2` is below `keep * 2^32`. SplitMix64's draw `q` is `mix(start + (q + 1) *
/// GOLDEN)`, so any part of the mask is drawn on its own (on rayon's threads) and equals what
/// a single thread drawing the whole stream would give.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaskStream {
    start: u64,
    threshold: u64,
}

impl MaskStream {
    /// The stream of the next dropout call, over `n` elements (advances the global state).
    fn next(n: usize, keep: f64) -> Self {
        MaskStream {
            start: STATE.fetch_add(GOLDEN.wrapping_mul(n as u64 | 1), Ordering::SeqCst),
            threshold: (keep * 4_294_967_296.0) as u64,
        }
    }

    /// The keep bits of elements `64 * first_word ..`, one word per 64 elements: bit `b` of
    /// `words[w]` is set when element `64 * (first_word + w) + b` is kept.
    pub(crate) fn fill(&self, first_word: usize, words: &mut [u64]) {
        #[cfg(target_arch = "x86_64")]
        if self.threshold <= u64::from(u32::MAX) && std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present.
            unsafe { self.fill_avx2(first_word, words) };
            return;
        }
        self.fill_scalar(first_word, words);
    }

    /// [`Self::fill`], one draw at a time.
    fn fill_scalar(&self, first_word: usize, words: &mut [u64]) {
        for (w, word) in words.iter_mut().enumerate() {
            let first = 32 * (first_word + w) as u64;
            let mut bits = 0u64;
            for q in 0..32u64 {
                let z = SplitMix::mix(self.start.wrapping_add(GOLDEN.wrapping_mul(first + q + 1)));
                bits |= u64::from((z & 0xffff_ffff) < self.threshold) << (2 * q);
                bits |= u64::from((z >> 32) < self.threshold) << (2 * q + 1);
            }
            *word = bits;
        }
    }

    /// [`Self::fill`], four draws at a time: SplitMix64 on 64-bit lanes (each product from
    /// three 32-bit ones), the halves compared with the threshold as signed numbers after
    /// flipping their top bits, and the 8 answers of 4 draws read off as 8 consecutive bits
    /// (low half, then high, draw after draw: the scalar order). The same bits; a test holds
    /// that. Needs `threshold < 2^32`.
    ///
    /// # Safety
    /// AVX2 is present.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn fill_avx2(&self, first_word: usize, words: &mut [u64]) {
        use std::arch::x86_64::*;

        /// `a * b` modulo 2^64 on each lane, `b` given as its 32-bit halves.
        #[inline]
        #[target_feature(enable = "avx2")]
        fn mul(a: __m256i, b_lo: __m256i, b_hi: __m256i) -> __m256i {
            let low = _mm256_mul_epu32(a, b_lo);
            let cross = _mm256_add_epi64(
                _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), b_lo),
                _mm256_mul_epu32(a, b_hi),
            );
            _mm256_add_epi64(low, _mm256_slli_epi64::<32>(cross))
        }
        const M1: u64 = 0xBF58_476D_1CE4_E5B9;
        const M2: u64 = 0x94D0_49BB_1331_11EB;
        let halves = |m: u64| {
            (
                _mm256_set1_epi64x((m & 0xffff_ffff) as i64),
                _mm256_set1_epi64x((m >> 32) as i64),
            )
        };
        let ((m1_lo, m1_hi), (m2_lo, m2_hi)) = (halves(M1), halves(M2));
        let flip = _mm256_set1_epi32(i32::MIN);
        // threshold < 2^32: its top bit flipped, as a signed 32-bit number, on every lane.
        let limit = _mm256_set1_epi32((self.threshold as u32 ^ 0x8000_0000) as i32);
        let step = _mm256_set1_epi64x(GOLDEN.wrapping_mul(4) as i64);
        for (w, word) in words.iter_mut().enumerate() {
            // Draw q of this word is mix(start + (first + q + 1) * GOLDEN), q = 0..32.
            let first = 32 * (first_word + w) as u64;
            let at = |q: u64| self.start.wrapping_add(GOLDEN.wrapping_mul(first + q + 1)) as i64;
            let mut x = _mm256_set_epi64x(at(3), at(2), at(1), at(0));
            let mut bits = 0u64;
            for group in 0..8 {
                let mut z = x;
                z = _mm256_xor_si256(z, _mm256_srli_epi64::<30>(z));
                z = mul(z, m1_lo, m1_hi);
                z = _mm256_xor_si256(z, _mm256_srli_epi64::<27>(z));
                z = mul(z, m2_lo, m2_hi);
                z = _mm256_xor_si256(z, _mm256_srli_epi64::<31>(z));
                // half < threshold, unsigned: flipped half < flipped threshold, signed.
                let below = _mm256_cmpgt_epi32(limit, _mm256_xor_si256(z, flip));
                let m = _mm256_movemask_ps(_mm256_castsi256_ps(below)) as u32 as u64;
                bits |= m << (8 * group);
                x = _mm256_add_epi64(x, step);
            }
            *word = bits;
        }
    }

    /// The mask as values: `scale` where kept, 0 elsewhere (`n` of them).
    fn values(&self, n: usize, scale: f32) -> Vec<f32> {
        use rayon::prelude::*;
        const BLOCK: usize = 1 << 14;
        let mut out = vec![0.0f32; n];
        out.par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(block, chunk)| {
                let mut words = [0u64; BLOCK / 64];
                let words = &mut words[..chunk.len().div_ceil(64)];
                self.fill(block * BLOCK / 64, words);
                for (j, v) in chunk.iter_mut().enumerate() {
                    *v = if words[j / 64] >> (j % 64) & 1 == 1 {
                        scale
                    } else {
                        0.0
                    };
                }
            });
        out
    }
}

/// A mask of `n` values, each `scale` with probability `keep` and 0 otherwise, from the next
/// part of the stream ([`MaskStream`]).
#[cfg(test)]
fn host_mask(n: usize, keep: f64, scale: f32) -> Vec<f32> {
    MaskStream::next(n, keep).values(n, scale)
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
            let n = shape.num_elements();
            let (stream, scale) = (MaskStream::next(n, keep), (1.0 / keep) as f32);
            // burn-ndarray: mask and product in one pass, the mask kept as bits for the
            // backward pass; the same values as the product below.
            #[cfg(feature = "ndarray")]
            let input = match crate::ops::dropout_host(input, &stream, scale) {
                Ok(out) => return out,
                Err(input) => input,
            };
            let mask =
                Tensor::<B, D>::from_data(TensorData::new(stream.values(n, scale), shape), &device);
            return input * mask;
        }
        let mask = input.random_like(Distribution::Bernoulli(keep));
        input * mask * (1.0 / keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests that seed the global stream and draw from it, one at a time.
    static STREAM: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// The dispatched `fill` (four draws at a time where the CPU has AVX2) gives the scalar
    /// draw's bits, for starts anywhere in the stream, thresholds from 0 to 2^32, and words
    /// that do not start at 0.
    #[test]
    fn vector_fill_equals_the_scalar_draws() {
        let mut rng = SplitMix(0x0d20_9f11);
        for threshold in [
            0u64,
            1,
            1 << 31,
            3_865_470_566,
            u64::from(u32::MAX),
            1 << 32,
        ] {
            for _ in 0..20 {
                let stream = MaskStream {
                    start: rng.next_u64(),
                    threshold,
                };
                let first = (rng.next_u64() % 1000) as usize;
                let (mut fast, mut slow) = ([0u64; 37], [0u64; 37]);
                stream.fill(first, &mut fast);
                stream.fill_scalar(first, &mut slow);
                assert_eq!(fast, slow, "threshold {threshold}, start {}", stream.start);
            }
        }
    }

    #[test]
    fn host_masks_keep_the_requested_fraction_and_are_reproducible() {
        let _stream = STREAM.lock().unwrap_or_else(|e| e.into_inner());
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

    /// The one-pass dropout of burn-ndarray (`ops::dropout_host`) gives `x * mask` with the
    /// mask the generic path draws, and its gradient is `g * mask`, bit for bit, including
    /// the non-finite inputs that `x * 0` turns into NaN.
    #[test]
    fn one_pass_dropout_equals_the_mask_product() {
        let _stream = STREAM.lock().unwrap_or_else(|e| e.into_inner());
        use burn::backend::{Autodiff, NdArray};
        type Ad = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let n = 3 * 16_384 + 77;
        let mut xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        xs[5] = f32::INFINITY;
        xs[9] = f32::NAN;
        let gs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let dropout = Dropout::new(0.25);

        seed(11);
        let x =
            Tensor::<Ad, 2>::from_data(TensorData::new(xs.clone(), [1, n]), &device).require_grad();
        let y = dropout.forward(x.clone());
        let g = Tensor::<Ad, 2>::from_data(TensorData::new(gs.clone(), [1, n]), &device);
        let grads = (y.clone() * g).sum().backward();
        let dx = x.grad(&grads).expect("x is tracked").into_data();
        let y = y.into_data();

        seed(11);
        let mask = host_mask(n, 0.75, (1.0f64 / 0.75) as f32);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let want_y: Vec<f32> = xs.iter().zip(&mask).map(|(x, m)| x * m).collect();
        let want_dx: Vec<f32> = gs.iter().zip(&mask).map(|(g, m)| g * m).collect();
        assert_eq!(bits(y.as_slice::<f32>().unwrap()), bits(&want_y));
        assert_eq!(bits(dx.as_slice::<f32>().unwrap()), bits(&want_dx));
        let kept = mask.iter().filter(|m| **m != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.75).abs() < 0.01, "{kept}");
    }
}
