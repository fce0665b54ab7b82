//! Model-agnostic training helpers with Hugging Face `Trainer` semantics: the linear warmup and
//! decay schedule, global gradient-norm clipping, and the masked token cross-entropy; and the
//! small deterministic RNG that data order and CPU dropout masks draw from.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};

/// `get_linear_schedule_with_warmup`: the learning rate rises linearly from 0 over `warmup`
/// optimizer steps, then falls linearly to 0 at `total`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup steps.
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
}

impl LinearSchedule {
    /// The learning rate of optimizer step `step` (0-based), as the HF scheduler applies it.
    pub fn lr_at(&self, step: usize) -> f64 {
        let factor = if step < self.warmup {
            step as f64 / self.warmup.max(1) as f64
        } else {
            ((self.total as f64 - step as f64)
                / (self.total.saturating_sub(self.warmup)).max(1) as f64)
                .max(0.0)
        };
        self.lr * factor
    }
}

struct GradNorm<'a> {
    grads: &'a GradientsParams,
    sum_sq: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.sum_sq += g.powf_scalar(2.0).sum().into_scalar().elem::<f64>();
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// `torch.nn.utils.clip_grad_norm_` over all gradients of `module`: when the global L2 norm
/// exceeds `max_norm`, every gradient is scaled by `max_norm / (norm + 1e-6)`. Returns the norm
/// before clipping.
pub fn clip_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let mut v = GradNorm { grads, sum_sq: 0.0 };
    module.visit(&mut v);
    let norm = v.sum_sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        module.visit(&mut Scale {
            grads,
            factor: coef,
        });
    }
    norm
}

/// Mean token cross-entropy of `logits` `[batch, len, vocab]` against `labels` `[batch, len]`,
/// ignoring positions labelled `-100` (PyTorch's `ignore_index`). Returns the loss and the number
/// of counted tokens.
pub fn masked_cross_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, usize) {
    let [b, l, _] = logits.dims();
    let keep = labels.clone().greater_equal_elem(0);
    let count = keep.clone().int().sum().into_scalar().elem::<i64>() as usize;
    let idx = labels.clamp_min(0).reshape([b, l, 1]);
    let nll = crate::ops::log_softmax(logits, 2)
        .gather(2, idx)
        .reshape([b, l])
        .neg();
    let total = nll.mask_fill(keep.bool_not(), 0.0).sum();
    (total.div_scalar(count.max(1) as f64), count)
}

/// SplitMix64: a small deterministic RNG for data order, dropout masks and synthetic inputs, so
/// that a resumed run draws what an uninterrupted one does.
pub struct SplitMix(pub u64);

impl SplitMix {
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

    /// SplitMix64's output function: a bijective mix of 64 bits.
    pub fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GOLDEN);
        Self::mix(self.0)
    }

    /// A Fisher-Yates permutation of `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
        v
    }
}
