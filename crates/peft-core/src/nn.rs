//! Building blocks the models and the adapters share: the flattened linear product, PyTorch's
//! LayerNorm under transformers' parameter names, and the tanh-approximated GELU.

use burn::module::{Initializer, Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::ops;

/// `x W + b` over the last dimension of `x`. Leading dimensions are flattened first, so a
/// `[batch, len, in]` input is one `[batch * len, in] x [in, out]` product instead of `batch`
/// small ones (and the weight gradient comes out `[in, out]` directly, not summed over a batch
/// of per-sample gradients). The flattening and the product go through [`crate::ops`], which
/// copies neither the activations nor the weight on burn-ndarray.
pub fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    flattened(x, bias, |x| ops::matmul(x, weight))
}

/// `product(x)` over `x`'s rows flattened to `[rows, in]`, plus `bias`, back in `x`'s
/// leading shape.
fn flattened<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    bias: Option<Tensor<B, 1>>,
    product: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = product(ops::reshape(x, [rows, d_in]));
    let y = match bias {
        Some(b) => y + b.unsqueeze(),
        None => y,
    };
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    ops::reshape(y, out)
}

/// [`linear`], with the product through [`ops::matmul_packed`]: when `x` has at most
/// [`peft_gemm::SMALL_M`] rows in all (a decoding step) on burn-ndarray, the weight is read
/// from its packed copy in `pack` (see [`ops::DecodePack`]). The same values as [`linear`].
pub fn linear_packed<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    pack: &ops::DecodePack,
) -> Tensor<B, D> {
    flattened(x, bias, |x| ops::matmul_packed(x, weight, pack))
}

/// burn's `[in, out]` weight from PyTorch's `[out, in]` values (`rows = out`, `cols = in`):
/// the `[cols, rows]` transpose of `values`, stored in standard (row-major) layout rather than
/// as the strided view `Tensor::transpose` gives. Products read such a weight in place row by
/// row ([`crate::ops`]); a transposed view would have to be copied, or read column-wise with
/// a different rounding, at every product.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::TensorData;
///
/// // PyTorch's [out = 2, in = 3] weight.
/// let w = peft_core::nn::transposed_from::<NdArray>(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3], &Default::default());
/// w.into_data().assert_eq(&TensorData::new(vec![1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0], [3, 2]), true);
/// ```
///
/// # Panics
/// When `values.len() != rows * cols`.
pub fn transposed_from<B: Backend>(
    values: Vec<f32>,
    [rows, cols]: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2> {
    assert_eq!(
        values.len(),
        rows * cols,
        "transposed_from: {rows} x {cols} values"
    );
    const BLOCK: usize = 32;
    let mut out = vec![0.0f32; values.len()];
    for r0 in (0..rows).step_by(BLOCK) {
        for c0 in (0..cols).step_by(BLOCK) {
            for r in r0..(r0 + BLOCK).min(rows) {
                for c in c0..(c0 + BLOCK).min(cols) {
                    out[c * rows + r] = values[r * cols + c];
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(out, [cols, rows]), device)
}

/// transformers' `gelu_new` (`NewGELUActivation`, the tanh approximation),
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, computed as the identical
/// `x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))` with one `exp` and multiplications only: CPU
/// backends evaluate `tanh` and `powf` per element in double precision, `exp` and products
/// vectorised, which made the activation a sixth of an mT5 forward pass.
///
/// On burn-ndarray this is one pass on rayon's threads with an analytic backward pass
/// ([`crate::ops`]), with the same values.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let x = match ops::gelu_tanh_host(x) {
        Ok(y) => return y,
        Err(x) => x,
    };
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
