//! One LoRA adapter on one linear layer.

use burn::module::{Initializer, Module, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::params::{AdapterParams, FileLayout, NamedParam, ParamMut, ParamRef};

use super::config::{InitLoraWeights, lora_scaling};
use crate::dropout::Dropout;
use crate::nn::linear;

/// One LoRA adapter on one linear layer: `B(A(dropout(x))) * scaling`; with DoRA
/// (`use_dora`), also a magnitude per output that rescales the adapted weight (computed by
/// [`AdaptedLinear`](crate::AdaptedLinear), which holds the base weight).
///
/// Weights are stored in burn's `[d_input, d_output]` layout, the transpose of PEFT's:
/// `lora_a` is `[in, r]` (PEFT `lora_A.weight` is `[r, in]`) and `lora_b` is `[r, out]`
/// (PEFT `lora_B.weight` is `[out, r]`).
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// The adapter's name (`default` unless named).
    pub name: String,
    /// Down projection, `[in, r]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// Up projection, `[r, out]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// Bias of `lora_B` (`lora_bias = true`), `[out]`.
    pub lora_bias: Option<Param<Tensor<B, 1>>>,
    /// Dropout on the adapter's input (identity outside training).
    pub dropout: Dropout,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// `alpha / r` or, with rsLoRA, `alpha / sqrt(r)`.
    pub scaling: f64,
    /// DoRA (PEFT's `use_dora`): the magnitude is set when the adapter joins its layer.
    pub use_dora: bool,
    /// DoRA's magnitude vector `m`, `[out]` (PEFT `lora_magnitude_vector`): at creation the
    /// norm of every output's weights in `W + scaling * B A`.
    pub magnitude: Option<Param<Tensor<B, 1>>>,
}

/// Hyper-parameters of one LoRA adapter on one layer, resolved from a [`crate::LoraConfig`].
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// Dropout probability.
    pub dropout: f64,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// Initialisation.
    pub init: InitLoraWeights,
    /// Trainable bias on `lora_B`.
    pub lora_bias: bool,
    /// DoRA: weight-decomposed adaptation.
    pub use_dora: bool,
}

impl<B: Backend> LoraAdapter<B> {
    /// Creates an adapter for a `d_input -> d_output` layer, initialised as PEFT does.
    /// Parameters are lazy: nothing is allocated until first use.
    pub fn new(
        name: &str,
        d_input: usize,
        d_output: usize,
        spec: &LoraSpec,
        device: &B::Device,
    ) -> Self {
        let r = spec.r;
        // PyTorch's nn.Linear default (and PEFT's `kaiming_uniform_(a=sqrt(5))`):
        // U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        let kaiming = Initializer::KaimingUniform {
            gain: 1.0 / 3.0f64.sqrt(),
            fan_out_only: false,
        };
        let lora_a = match spec.init {
            InitLoraWeights::Gaussian => Initializer::Normal {
                mean: 0.0,
                std: 1.0 / r as f64,
            }
            .init_with([d_input, r], Some(d_input), Some(r), device),
            _ => kaiming.init_with([d_input, r], Some(d_input), Some(r), device),
        };
        let random = spec.init == InitLoraWeights::Random;
        let lora_b = if random {
            kaiming.init_with([r, d_output], Some(r), Some(d_output), device)
        } else {
            Initializer::Zeros.init_with([r, d_output], Some(r), Some(d_output), device)
        };
        let lora_bias = spec.lora_bias.then(|| {
            if random {
                let bound = 1.0 / (r as f64).sqrt();
                Initializer::Uniform {
                    min: -bound,
                    max: bound,
                }
                .init([d_output], device)
            } else {
                Initializer::Zeros.init([d_output], device)
            }
        });
        LoraAdapter {
            name: name.to_string(),
            lora_a,
            lora_b,
            lora_bias,
            dropout: Dropout::new(spec.dropout),
            r,
            alpha: spec.alpha,
            scaling: lora_scaling(spec.alpha, r, spec.use_rslora),
            use_dora: spec.use_dora,
            magnitude: None,
        }
    }

    /// The adapter's contribution `B(A(dropout(x))) * scaling` (without DoRA's rescaling).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.branch(self.dropout.forward(x))
    }

    /// `B(A(x)) * scaling`, no dropout.
    pub fn branch<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.unscaled(x).mul_scalar(self.scaling)
    }

    /// `B(A(x))` (with `lora_bias`), before the scaling; no dropout.
    pub(crate) fn unscaled<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let h = linear(x, self.lora_a.val(), None);
        linear(
            h,
            self.lora_b.val(),
            self.lora_bias.as_ref().map(|b| b.val()),
        )
    }

    /// `scaling * A @ B` in `[in, out]` layout: what merging adds to the base weight.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_a
            .val()
            .matmul(self.lora_b.val())
            .mul_scalar(self.scaling)
    }

    /// `scaling * lora_bias`: what merging adds to the base bias.
    pub fn delta_bias(&self) -> Option<Tensor<B, 1>> {
        self.lora_bias
            .as_ref()
            .map(|b| b.val().mul_scalar(self.scaling))
    }
}

/// Writes `LoraAdapter`'s tensor list once, for the shared and the mutable walk (`$m` is
/// empty or `mut`).
macro_rules! lora_params {
    ($visit:ident, $P:ident $(, $m:tt)?) => {
        fn $visit(& $($m)? self, f: &mut dyn FnMut(NamedParam<$P<'_, B>>)) {
        f(NamedParam {
            key: "lora_A.weight",
            layout: FileLayout::Transposed,
            param: $P::D2(& $($m)? self.lora_a),
        });
        f(NamedParam {
            key: "lora_B.weight",
            layout: FileLayout::Transposed,
            param: $P::D2(& $($m)? self.lora_b),
        });
        if let Some(b) = & $($m)? self.lora_bias {
            f(NamedParam {
                key: "lora_B.bias",
                layout: FileLayout::AsIs,
                param: $P::D1(b),
            });
        }
        if let Some(m) = & $($m)? self.magnitude {
            f(NamedParam {
                key: "lora_magnitude_vector",
                layout: FileLayout::AsIs,
                param: $P::D1(m),
            });
        }
        }
    };
}

impl<B: Backend> AdapterParams<B> for LoraAdapter<B> {
    lora_params!(visit_params, ParamRef);
    lora_params!(visit_params_mut, ParamMut, mut);
}
