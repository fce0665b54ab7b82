//! AdamW (decoupled weight decay), computed as burn's `AdamW` computes it (the same `f32`
//! operations in the same order, so the same values) and with burn's state record (so
//! checkpoints written by either load in the other), in one pass on burn-ndarray.
//!
//! burn's `AdamW` updates a parameter with about a dozen whole-tensor operations, each a
//! single-threaded burn-ndarray pass that allocates its result: for a full fine-tuning of
//! mT5-small (300 MB of parameters) that is gigabytes of memory traffic per step. Here, on
//! `NdArray<f32>`, the moments are updated in place and the parameter written once, in
//! chunks on rayon's threads. Other backends take burn's formula, written out below.
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::module::Module;
//! use burn::nn::LinearConfig;
//! use burn::optim::{GradientsParams, Optimizer};
//! use burn::tensor::Tensor;
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let linear = LinearConfig::new(4, 2).init::<B>(&device);
//! let mut optim = peft_core::optim::AdamWConfig::new().with_weight_decay(0.01).init();
//! let loss = linear.forward(Tensor::<B, 2>::ones([3, 4], &device)).sum();
//! let grads = GradientsParams::from_grads(loss.backward(), &linear);
//! let linear = optim.step(1e-3, linear, grads);
//! assert_eq!(linear.num_params(), 10);
//! ```

use burn::grad_clipping::GradientClippingConfig;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

/// AdamW's settings, with burn's `AdamWConfig` defaults (PyTorch's, but `epsilon` 1e-5 and
/// `weight_decay` 1e-4; set them as the run asks).
#[derive(Clone, Debug)]
pub struct AdamWConfig {
    /// Decay of the first moment.
    pub beta_1: f32,
    /// Decay of the second moment.
    pub beta_2: f32,
    /// Added to the square root of the second moment.
    pub epsilon: f32,
    /// Decoupled weight decay, times the learning rate per step.
    pub weight_decay: f32,
    /// Gradient clipping, applied by burn's optimizer adaptor before the step.
    pub grad_clipping: Option<GradientClippingConfig>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl AdamWConfig {
    /// burn's defaults: betas 0.9 and 0.999, epsilon 1e-5, weight decay 1e-4, no clipping.
    pub fn new() -> Self {
        AdamWConfig {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-5,
            weight_decay: 1e-4,
            grad_clipping: None,
        }
    }

    /// Sets `beta_1`.
    pub fn with_beta_1(mut self, beta_1: f32) -> Self {
        self.beta_1 = beta_1;
        self
    }

    /// Sets `beta_2`.
    pub fn with_beta_2(mut self, beta_2: f32) -> Self {
        self.beta_2 = beta_2;
        self
    }

    /// Sets `epsilon`.
    pub fn with_epsilon(mut self, epsilon: f32) -> Self {
        self.epsilon = epsilon;
        self
    }

    /// Sets `weight_decay`.
    pub fn with_weight_decay(mut self, weight_decay: f32) -> Self {
        self.weight_decay = weight_decay;
        self
    }

    /// Sets gradient clipping.
    pub fn with_grad_clipping(mut self, grad_clipping: Option<GradientClippingConfig>) -> Self {
        self.grad_clipping = grad_clipping;
        self
    }

    /// The optimizer for the parameters of `M`, through burn's adaptor.
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(&self) -> OptimizerAdaptor<AdamW, M, B> {
        let mut optim = OptimizerAdaptor::from(AdamW {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
        });
        if let Some(clipping) = &self.grad_clipping {
            optim = optim.with_grad_clipping(clipping.init());
        }
        optim
    }
}

/// The AdamW step ([`AdamWConfig::init`] wraps it for modules).
#[derive(Clone, Debug)]
pub struct AdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
}

/// The scalars of one step, as burn's `AdamW` rounds them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamWStep {
    /// `beta_1`, `1 - beta_1`.
    pub beta_1: f32,
    pub factor_1: f32,
    /// `beta_2`, `1 - beta_2`.
    pub beta_2: f32,
    pub factor_2: f32,
    /// The bias corrections `1 - beta^t`.
    pub correction_1: f32,
    pub correction_2: f32,
    pub epsilon: f32,
    /// `1 - lr * weight_decay` (rounded from `f64`).
    pub keep: f32,
    /// The learning rate (rounded from `f64`).
    pub lr: f32,
}

impl<B: Backend> SimpleOptimizer<B> for AdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let time = state.as_ref().map_or(0, |s| s.momentum.time) + 1;
        let step = AdamWStep {
            beta_1: self.beta_1,
            factor_1: 1.0 - self.beta_1,
            beta_2: self.beta_2,
            factor_2: 1.0 - self.beta_2,
            correction_1: 1f32 - self.beta_1.powi(time as i32),
            correction_2: 1f32 - self.beta_2.powi(time as i32),
            epsilon: self.epsilon,
            keep: (1.0 - lr * self.weight_decay as f64) as f32,
            lr: lr as f32,
        };
        let moments = state.map(|s| (s.momentum.moment_1, s.momentum.moment_2));
        #[cfg(feature = "ndarray")]
        let (tensor, grad, moments) = match crate::ops::adamw_host(tensor, grad, moments, step) {
            Ok((tensor, moment_1, moment_2)) => {
                let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
                return (tensor, Some(AdamWState { momentum }));
            }
            Err(inputs) => inputs,
        };
        // burn's formula, operation for operation.
        let (moment_1, moment_2) = match moments {
            Some((m, v)) => (
                m.mul_scalar(step.beta_1)
                    .add(grad.clone().mul_scalar(step.factor_1)),
                v.mul_scalar(step.beta_2)
                    .add(grad.square().mul_scalar(step.factor_2)),
            ),
            None => (
                grad.clone().mul_scalar(step.factor_1),
                grad.square().mul_scalar(step.factor_2),
            ),
        };
        let delta = moment_1.clone().div_scalar(step.correction_1).div(
            moment_2
                .clone()
                .div_scalar(step.correction_2)
                .sqrt()
                .add_scalar(step.epsilon),
        );
        let decay_rate = lr * self.weight_decay as f64;
        let decayed = if decay_rate == 0.0 {
            tensor
        } else {
            // `1 - lr * weight_decay` rounded to f32, as burn rounds an `f64` scalar.
            tensor.mul_scalar(step.keep)
        };
        let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
        (
            decayed - delta.mul_scalar(step.lr),
            Some(AdamWState { momentum }),
        )
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::backend::NdArray;
    use burn::optim::{AdamWConfig as BurnAdamWConfig, SimpleOptimizer};
    use burn::tensor::{Distribution, Tensor};

    use super::AdamWConfig;

    type Nd = NdArray<f32>;

    fn address(t: &Tensor<Nd, 2>) -> *const f32 {
        match t.clone().into_primitive().tensor() {
            burn::backend::ndarray::NdArrayTensor::F32(s) => s.view().as_ptr(),
            _ => panic!("f32 expected"),
        }
    }

    /// Ours and burn's AdamW with the same settings (epsilon 1e-8, beta_2 0.98).
    fn both(weight_decay: f32) -> (super::AdamW, burn::optim::AdamW) {
        let config = AdamWConfig::new()
            .with_weight_decay(weight_decay)
            .with_epsilon(1e-8)
            .with_beta_2(0.98);
        let ours = super::AdamW {
            beta_1: config.beta_1,
            beta_2: config.beta_2,
            epsilon: config.epsilon,
            weight_decay: config.weight_decay,
        };
        let theirs = BurnAdamWConfig::new()
            .with_weight_decay(weight_decay)
            .with_epsilon(1e-8)
            .with_beta_2(0.98)
            .build();
        (ours, theirs)
    }

    /// Four steps of the one-pass AdamW give burn's `AdamW` bit for bit: parameters and both
    /// moments, from the first step (no state) on, with and without weight decay, on a
    /// tensor large enough to be split across threads.
    #[test]
    fn host_adamw_equals_burns_bit_for_bit() {
        let device = Default::default();
        for weight_decay in [0.0f32, 0.01] {
            let (ours, theirs) = both(weight_decay);
            let mut p_ours =
                Tensor::<Nd, 2>::random([300, 170], Distribution::Uniform(-1.0, 1.0), &device);
            let mut p_theirs = p_ours.clone();
            let (mut s_ours, mut s_theirs) = (None, None);
            let mut addresses = Vec::new();
            for step in 0..4 {
                let g =
                    Tensor::<Nd, 2>::random([300, 170], Distribution::Normal(0.0, 1.0), &device);
                let lr = 1e-3 * (step + 1) as f64;
                (p_ours, s_ours) =
                    SimpleOptimizer::<Nd>::step(&ours, lr, p_ours, g.clone(), s_ours);
                (p_theirs, s_theirs) = theirs.step(lr, p_theirs, g, s_theirs);
                p_ours
                    .clone()
                    .into_data()
                    .assert_eq(&p_theirs.clone().into_data(), true);
                let (a, b) = (
                    &s_ours.as_ref().expect("state").momentum,
                    &s_theirs.as_ref().expect("state").momentum,
                );
                assert_eq!(a.time, b.time);
                a.moment_1
                    .clone()
                    .into_data()
                    .assert_eq(&b.moment_1.clone().into_data(), true);
                a.moment_2
                    .clone()
                    .into_data()
                    .assert_eq(&b.moment_2.clone().into_data(), true);
                addresses.push(address(&a.moment_1));
            }
            // The one-pass path ran: after the first step the moments are updated in place.
            assert!(addresses[1..].iter().all(|&x| x == addresses[1]));
        }
    }

    /// The generic path (any backend but burn-ndarray's own; here `Autodiff<NdArray>`, which
    /// the one-pass path declines) gives burn's `AdamW` bit for bit too, with and without
    /// weight decay.
    #[test]
    fn generic_adamw_equals_burns_bit_for_bit() {
        type Ad = burn::backend::Autodiff<Nd>;
        let device = Default::default();
        for weight_decay in [0.0f32, 0.01] {
            let (ours, theirs) = both(weight_decay);
            let mut p_ours =
                Tensor::<Ad, 2>::random([40, 30], Distribution::Uniform(-1.0, 1.0), &device);
            let mut p_theirs = p_ours.clone();
            let (mut s_ours, mut s_theirs) = (None, None);
            for step in 0..3 {
                let g = Tensor::<Ad, 2>::random([40, 30], Distribution::Normal(0.0, 1.0), &device);
                let lr = 3e-3 * (step + 1) as f64;
                (p_ours, s_ours) =
                    SimpleOptimizer::<Ad>::step(&ours, lr, p_ours, g.clone(), s_ours);
                (p_theirs, s_theirs) = theirs.step(lr, p_theirs, g, s_theirs);
                p_ours
                    .clone()
                    .into_data()
                    .assert_eq(&p_theirs.clone().into_data(), true);
            }
        }
    }
}
