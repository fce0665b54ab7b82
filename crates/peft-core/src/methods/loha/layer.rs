//! One LoHa adapter on one linear layer.

use burn::module::{Initializer, Module, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::params::{AdapterParams, FileLayout, NamedParam, ParamMut, ParamRef};

/// One LoHa adapter on one linear layer, its tensors in PEFT's shapes: `hada_w1_a`, `hada_w2_a`
/// `[out, r]`, `hada_w1_b`, `hada_w2_b` `[r, in]`. The weight change (PyTorch layout, `[out, in]`)
/// is `(w1_a w1_b) * (w2_a w2_b) * scaling`.
#[derive(Module, Debug)]
pub struct LohaAdapter<B: Backend> {
    /// The adapter's name.
    pub name: String,
    /// `hada_w1_a`, `[out, r]`.
    pub w1_a: Param<Tensor<B, 2>>,
    /// `hada_w1_b`, `[r, in]`.
    pub w1_b: Param<Tensor<B, 2>>,
    /// `hada_w2_a`, `[out, r]`.
    pub w2_a: Param<Tensor<B, 2>>,
    /// `hada_w2_b`, `[r, in]`.
    pub w2_b: Param<Tensor<B, 2>>,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// `alpha / r`.
    pub scaling: f64,
    /// Training: probability of dropping each output row of the weight change.
    pub rank_dropout: f64,
    /// Training: probability of skipping the adapter for a forward pass.
    pub module_dropout: f64,
}

impl<B: Backend> LohaAdapter<B> {
    /// A LoHa adapter for a `d_input -> d_output` layer, initialised as PEFT does: kaiming-uniform
    /// `w1_a`, `w1_b`, `w2_a` and zero `w2_b` (`init_weights = false`: all four kaiming-uniform).
    /// Parameters are lazy.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        d_input: usize,
        d_output: usize,
        r: usize,
        alpha: f64,
        rank_dropout: f64,
        module_dropout: f64,
        init_weights: bool,
        device: &B::Device,
    ) -> Self {
        // `kaiming_uniform_(a=sqrt(5))` on a `[rows, cols]` tensor: U(+-1/sqrt(cols)).
        let kaiming = |shape: [usize; 2]| {
            Initializer::KaimingUniform {
                gain: 1.0 / 3.0f64.sqrt(),
                fan_out_only: false,
            }
            .init_with(shape, Some(shape[1]), Some(shape[0]), device)
        };
        LohaAdapter {
            name: name.to_string(),
            w1_a: kaiming([d_output, r]),
            w1_b: kaiming([r, d_input]),
            w2_a: kaiming([d_output, r]),
            w2_b: if init_weights {
                Initializer::Zeros.init([r, d_input], device)
            } else {
                kaiming([r, d_input])
            },
            r,
            alpha,
            scaling: alpha / r as f64,
            rank_dropout,
            module_dropout,
        }
    }

    /// The weight change in burn's `[in, out]` layout (what merging adds to the base weight).
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.delta_weight_torch().transpose()
    }

    /// The weight change in PyTorch's `[out, in]` layout.
    fn delta_weight_torch(&self) -> Tensor<B, 2> {
        (self.w1_a.val().matmul(self.w1_b.val()) * self.w2_a.val().matmul(self.w2_b.val()))
            .mul_scalar(self.scaling)
    }

    /// The adapter's contribution `x dW^T`. In training (autodiff backends), `module_dropout`
    /// may skip it (`None`) and `rank_dropout` drops output rows of `dW`, the rest scaled by
    /// `1 / share kept`, as PEFT's `LoHaLayer`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Option<Tensor<B, D>> {
        crate::methods::lycoris::delta_activations(
            x,
            || self.delta_weight_torch(),
            self.rank_dropout,
            true,
            self.module_dropout,
        )
    }
}

/// Writes `LohaAdapter`'s tensor list once, for the shared and the mutable walk.
macro_rules! loha_params {
    ($visit:ident, $P:ident $(, $m:tt)?) => {
        fn $visit(& $($m)? self, f: &mut dyn FnMut(NamedParam<$P<'_, B>>)) {
            for (key, p) in [
                ("hada_w1_a", & $($m)? self.w1_a),
                ("hada_w1_b", & $($m)? self.w1_b),
                ("hada_w2_a", & $($m)? self.w2_a),
                ("hada_w2_b", & $($m)? self.w2_b),
            ] {
                f(NamedParam {
                    key,
                    layout: FileLayout::AsIs,
                    param: $P::D2(p),
                });
            }
        }
    };
}

impl<B: Backend> AdapterParams<B> for LohaAdapter<B> {
    loha_params!(visit_params, ParamRef);
    loha_params!(visit_params_mut, ParamMut, mut);
}
