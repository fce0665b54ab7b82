//! One IA3 vector on one linear layer.

use burn::module::{Initializer, Module, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::params::{AdapterParams, FileLayout, NamedParam, ParamMut, ParamRef};

/// One IA3 vector on one linear layer.
#[derive(Module, Debug)]
pub struct Ia3Adapter<B: Backend> {
    /// The adapter's name.
    pub name: String,
    /// The learned scaling vector: `[in]` on feed-forward targets, `[out]` otherwise. PEFT
    /// stores it as `[1, in]` or `[out, 1]`.
    pub ia3_l: Param<Tensor<B, 1>>,
    /// Whether the input (true) or the output (false) is scaled.
    pub feedforward: bool,
}

impl<B: Backend> Ia3Adapter<B> {
    /// A vector of ones (`init_ia3_weights = true`) or, as PEFT's `torch.randn`, N(0, 1)
    /// values (`false`).
    pub fn new(
        name: &str,
        len: usize,
        feedforward: bool,
        init_ones: bool,
        device: &B::Device,
    ) -> Self {
        let init = if init_ones {
            Initializer::Ones
        } else {
            Initializer::Normal {
                mean: 0.0,
                std: 1.0,
            }
        };
        Ia3Adapter {
            name: name.to_string(),
            ia3_l: init.init([len], device),
            feedforward,
        }
    }

    /// PEFT's stored shape of `ia3_l`: `[1, in]` (feed-forward) or `[out, 1]`.
    pub fn peft_shape(&self) -> Vec<usize> {
        let n = self.ia3_l.lazy_shape().num_elements();
        if self.feedforward {
            vec![1, n]
        } else {
            vec![n, 1]
        }
    }
}

/// Writes `Ia3Adapter`'s tensor list once, for the shared and the mutable walk (`$m` is
/// empty or `mut`).
macro_rules! ia3_params {
    ($visit:ident, $P:ident $(, $m:tt)?) => {
        fn $visit(& $($m)? self, f: &mut dyn FnMut(NamedParam<$P<'_, B>>)) {
        f(NamedParam {
            key: "ia3_l",
            layout: FileLayout::Reshaped(self.peft_shape()),
            param: $P::D1(& $($m)? self.ia3_l),
        });
        }
    };
}

impl<B: Backend> AdapterParams<B> for Ia3Adapter<B> {
    ia3_params!(visit_params, ParamRef);
    ia3_params!(visit_params_mut, ParamMut, mut);
}
