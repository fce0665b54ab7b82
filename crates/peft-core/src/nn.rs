//! Building blocks the models and the adapters share: the flattened linear product, PyTorch's
//! LayerNorm under transformers' parameter names, and the tanh-approximated GELU.

use burn::module::{Initializer, Module, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module;

/// `x W + b` over the last dimension of `x`. Leading dimensions are flattened first, so a
/// `[batch, len, in]` input is one `[batch * len, in] x [in, out]` product instead of `batch`
/// small ones (and the weight gradient comes out `[in, out]` directly, not summed over a batch
/// of per-sample gradients).
pub fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    if D <= 2 {
        return module::linear(x, weight, bias);
    }
    let dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = module::linear(x.reshape([rows, d_in]), weight, bias);
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// transformers' `gelu_new` (`NewGELUActivation`, the tanh approximation),
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, computed as the identical
/// `x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))` with one `exp` and multiplications only: CPU
/// backends evaluate `tanh` and `powf` per element in double precision, `exp` and products
/// vectorised, which made the activation a sixth of an mT5 forward pass.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let c = 2.0 * (2.0 / std::f64::consts::PI).sqrt();
    let x2 = x.clone() * x.clone();
    let u = (x.clone() * (x2.mul_scalar(0.044715).add_scalar(1.0))).mul_scalar(-c);
    x / u.exp().add_scalar(1.0)
}

/// PyTorch's `nn.LayerNorm` with transformers' parameter names (`weight`, `bias`): the
/// LayerNorm of bottleneck adapters (`ln_before`/`ln_after`, eps 1e-5) and of BERT.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// Scale, `[hidden]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Shift, `[hidden]`.
    pub bias: Param<Tensor<B, 1>>,
    /// Epsilon.
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// Scale ones, shift zeros (lazily).
    pub fn new(hidden: usize, eps: f64, device: &B::Device) -> Self {
        LayerNorm {
            weight: Initializer::Ones.init([hidden], device),
            bias: Initializer::Zeros.init([hidden], device),
            eps,
        }
    }

    /// Normalises the last dimension (biased variance, as PyTorch), then scales and shifts.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mean = x.clone().mean_dim(D - 1);
        let centered = x - mean;
        let var = (centered.clone() * centered.clone()).mean_dim(D - 1);
        let normed = centered / (var + self.eps).sqrt();
        normed * self.weight.val().unsqueeze() + self.bias.val().unsqueeze()
    }
}
