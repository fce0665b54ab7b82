//! One bottleneck adapter at one sub-layer site.

use burn::module::{Initializer, Module, Param};
use burn::tensor::Tensor;
use burn::tensor::activation;
use burn::tensor::backend::Backend;

use super::config::{BnConfig, ResidualBeforeLn, Scaling};
use crate::dropout::Dropout;
use crate::error::{PeftError, Result};
use crate::nn::{LayerNorm, gelu_tanh, linear};
use crate::params::{AdapterParams, FileLayout, NamedParam, ParamMut, ParamRef};
use crate::site::SublayerSite;

/// The activations AdapterHub resolves through transformers' `get_activation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `relu`.
    Relu,
    /// `swish` / `silu`: `x * sigmoid(x)`.
    Swish,
    /// `gelu`: the exact erf form.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `tanh`.
    Tanh,
    /// `sigmoid`.
    Sigmoid,
    /// `leakyrelu` (slope 0.01).
    LeakyRelu,
    /// `linear`: identity.
    Identity,
}

impl Activation {
    /// Parses a name as AdapterHub does (case-insensitive).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "relu" => Activation::Relu,
            "swish" | "silu" => Activation::Swish,
            "gelu" | "gelu_orig" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "tanh" => Activation::Tanh,
            "sigmoid" => Activation::Sigmoid,
            "leakyrelu" => Activation::LeakyRelu,
            "linear" => Activation::Identity,
            other => {
                return Err(PeftError::Unsupported(format!(
                    "non_linearity {other:?} (known: relu, swish, silu, gelu, gelu_new, tanh, \
                     sigmoid, leakyrelu, linear)"
                )));
            }
        })
    }

    /// Applies the activation.
    pub fn forward<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Activation::Relu => activation::relu(x),
            Activation::Swish => activation::silu(x),
            Activation::Gelu => activation::gelu(x),
            Activation::GeluTanh => gelu_tanh(x),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => activation::sigmoid(x),
            Activation::LeakyRelu => activation::leaky_relu(x, 0.01),
            Activation::Identity => x,
        }
    }
}

/// `nn.LayerNorm`'s default epsilon, which AdapterHub's adapter LayerNorms use.
const ADAPTER_LN_EPS: f64 = 1e-5;

/// `torch.nn.init.trunc_normal_(mean=0, std, a=-2 std, b=2 std)`: normal draws outside the
/// bounds are redrawn (rejection sampling, as the definition says; after 12 rounds the chance
/// that an entry is still out of bounds is below 1e-16, and such an entry is clamped).
fn trunc_normal<B: Backend>(shape: [usize; 2], std: f64, device: &B::Device) -> Tensor<B, 2> {
    let dist = burn::tensor::Distribution::Normal(0.0, std);
    let mut x = Tensor::<B, 2>::random(shape, dist, device);
    for _ in 0..12 {
        let out = x.clone().abs().greater_elem(2.0 * std);
        x = x.mask_where(out, Tensor::random(shape, dist, device));
    }
    x.clamp(-2.0 * std, 2.0 * std)
}

/// One bottleneck adapter at one site. Weights in burn's `[in, out]` layout (AdapterHub's
/// `adapter_down.0.weight` is `[bottleneck, hidden]`, the transpose of `down_weight`).
#[derive(Module, Debug)]
pub struct BottleneckAdapter<B: Backend> {
    /// The adapter's name.
    pub name: String,
    /// `ln_before`: LayerNorm on the adapter input.
    pub norm_before: Option<LayerNorm<B>>,
    /// Down projection, `[hidden, bottleneck]`.
    pub down_weight: Param<Tensor<B, 2>>,
    /// Down projection bias, `[bottleneck]`.
    pub down_bias: Param<Tensor<B, 1>>,
    /// Up projection, `[bottleneck, hidden]`.
    pub up_weight: Param<Tensor<B, 2>>,
    /// Up projection bias, `[hidden]`.
    pub up_bias: Param<Tensor<B, 1>>,
    /// `ln_after`: LayerNorm on the adapter output.
    pub norm_after: Option<LayerNorm<B>>,
    /// Learned scaling (`"learned"`: `[1]`, `"channel"`: `[hidden]`).
    pub learned_scaling: Option<Param<Tensor<B, 1>>>,
    /// Fixed scaling (1 when learned).
    pub scaling: f64,
    /// Activation between the projections (`non_linearity`, parsed when the adapter is built).
    #[module(skip)]
    pub activation: Activation,
    /// Dropout on the scaled up projection (training only).
    pub dropout: Dropout,
    /// `original_ln_before`.
    pub original_ln_before: bool,
    /// `original_ln_after`.
    pub original_ln_after: bool,
    /// `residual_before_ln` is `true`.
    pub residual_before: bool,
    /// `residual_before_ln` is `"post_add"`.
    pub residual_post_add: bool,
    /// `adapter_residual_before_ln`.
    pub adapter_residual_before_ln: bool,
}

impl<B: Backend> BottleneckAdapter<B> {
    /// Builds adapter `name` for `site` from `config`, initialised as AdapterHub's
    /// `init_weights` says (`bert`: N(0, 0.02) weights, zero biases; `mam_adapter`: kaiming
    /// uniform down, zero up; `houlsby`: N(0, 0.01) truncated at two standard deviations).
    pub fn new(
        name: &str,
        config: &BnConfig,
        site: &SublayerSite,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        let hidden = site.hidden;
        let bn = config.bottleneck_size(site)?;
        let (down_init, up_init) = match config.init_weights.as_str() {
            "bert" => {
                let n = Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                };
                (n.clone(), n)
            }
            "mam_adapter" => (
                Initializer::KaimingUniform {
                    gain: 1.0 / 3.0f64.sqrt(),
                    fan_out_only: false,
                },
                Initializer::Zeros,
            ),
            _ => (Initializer::Zeros, Initializer::Zeros), // houlsby: drawn below
        };
        let mut down_weight = down_init.init_with([hidden, bn], Some(hidden), Some(bn), device);
        let mut up_weight = up_init.init_with([bn, hidden], Some(bn), Some(hidden), device);
        if config.init_weights == "houlsby" {
            down_weight = Param::from_tensor(trunc_normal([hidden, bn], 0.01, device));
            up_weight = Param::from_tensor(trunc_normal([bn, hidden], 0.01, device));
        }
        let (learned_scaling, scaling) = match config.scaling {
            Scaling::Fixed(s) => (None, s),
            Scaling::Learned => (Some(Initializer::Ones.init([1], device)), 1.0),
            Scaling::Channel => (Some(Initializer::Ones.init([hidden], device)), 1.0),
        };
        Ok(BottleneckAdapter {
            name: name.to_string(),
            norm_before: config
                .ln_before
                .then(|| LayerNorm::new(hidden, ADAPTER_LN_EPS, device)),
            down_weight,
            down_bias: Initializer::Zeros.init([bn], device),
            up_weight,
            up_bias: Initializer::Zeros.init([hidden], device),
            norm_after: config
                .ln_after
                .then(|| LayerNorm::new(hidden, ADAPTER_LN_EPS, device)),
            learned_scaling,
            scaling,
            activation: Activation::parse(&config.non_linearity)?,
            dropout: Dropout::new(config.dropout),
            original_ln_before: config.original_ln_before,
            original_ln_after: config.original_ln_after,
            residual_before: config.residual_before_ln == ResidualBeforeLn::Before,
            residual_post_add: config.residual_before_ln == ResidualBeforeLn::PostAdd,
            adapter_residual_before_ln: config.adapter_residual_before_ln,
        })
    }

    /// Bottleneck size.
    pub fn bottleneck(&self) -> usize {
        self.down_weight.lazy_shape().dims::<2>()[1]
    }

    /// AdapterHub's `pre_forward`: the adapter input and its residual.
    pub(crate) fn pre_forward<const D: usize>(
        &self,
        h: Tensor<B, D>,
        input: &Tensor<B, D>,
        layer_norm: Option<&dyn Fn(Tensor<B, D>) -> Tensor<B, D>>,
    ) -> (Tensor<B, D>, Tensor<B, D>) {
        let mut residual = self.residual_before.then(|| h.clone());
        let mut h = h;
        if self.original_ln_before {
            h = h + input.clone();
            if let Some(ln) = layer_norm {
                if self.residual_post_add {
                    residual = Some(h.clone());
                }
                h = ln(h);
            }
        }
        if !self.residual_before && !self.residual_post_add {
            residual = Some(h.clone());
        }
        // `post_add` without an original LayerNorm leaves the residual unset in AdapterHub
        // (an error there); validate() refuses it unless original_ln_before, and without a
        // LayerNorm the closest meaning is the sum.
        let residual = residual.unwrap_or_else(|| h.clone());
        (h, residual)
    }

    /// AdapterHub's `Adapter.forward`: the bottleneck plus its residual.
    pub(crate) fn core<const D: usize>(
        &self,
        h: Tensor<B, D>,
        residual: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let x = match &self.norm_before {
            Some(n) => n.forward(h),
            None => h,
        };
        let down = self.activation.forward(linear(
            x,
            self.down_weight.val(),
            Some(self.down_bias.val()),
        ));
        let mut up = linear(down, self.up_weight.val(), Some(self.up_bias.val()));
        up = match &self.learned_scaling {
            Some(s) => up.mul(s.val().unsqueeze()),
            None => up.mul_scalar(self.scaling),
        };
        let mut out = self.dropout.forward(up);
        if self.adapter_residual_before_ln {
            out = out + residual.clone();
        }
        if let Some(n) = &self.norm_after {
            out = n.forward(out);
        }
        if !self.adapter_residual_before_ln {
            out = out + residual;
        }
        out
    }

    /// AdapterHub's `post_forward`.
    pub(crate) fn post_forward<const D: usize>(
        &self,
        out: Tensor<B, D>,
        input: Tensor<B, D>,
        layer_norm: Option<&dyn Fn(Tensor<B, D>) -> Tensor<B, D>>,
    ) -> Tensor<B, D> {
        if !self.original_ln_after {
            return out;
        }
        match layer_norm {
            Some(ln) => ln(out + input),
            None => out + input,
        }
    }
}

/// Writes `BottleneckAdapter`'s tensor list once, for the shared and the mutable walk (`$m` is
/// empty or `mut`): AdapterHub's tensor names, relative to `<site path>.adapters.<name>.`, in
/// AdapterHub's layout (`adapter_down.1.*` when `ln_before` puts a LayerNorm at index 0).
macro_rules! bottleneck_params {
    ($visit:ident, $P:ident $(, $m:tt)?) => {
        fn $visit(& $($m)? self, f: &mut dyn FnMut(NamedParam<$P<'_, B>>)) {
        let v1 = |key, p| NamedParam {
            key,
            layout: FileLayout::AsIs,
            param: $P::D1(p),
        };
        let v2 = |key, p| NamedParam {
            key,
            layout: FileLayout::Transposed,
            param: $P::D2(p),
        };
        let (down_w, down_b) = if let Some(n) = & $($m)? self.norm_before {
            f(v1("adapter_norm_before.weight", & $($m)? n.weight));
            f(v1("adapter_norm_before.bias", & $($m)? n.bias));
            ("adapter_down.1.weight", "adapter_down.1.bias")
        } else {
            ("adapter_down.0.weight", "adapter_down.0.bias")
        };
        f(v2(down_w, & $($m)? self.down_weight));
        f(v1(down_b, & $($m)? self.down_bias));
        f(v2("adapter_up.weight", & $($m)? self.up_weight));
        f(v1("adapter_up.bias", & $($m)? self.up_bias));
        if let Some(n) = & $($m)? self.norm_after {
            f(v1("adapter_norm_after.weight", & $($m)? n.weight));
            f(v1("adapter_norm_after.bias", & $($m)? n.bias));
        }
        if let Some(s) = & $($m)? self.learned_scaling {
            f(v1("scaling", s));
        }
        }
    };
}

impl<B: Backend> AdapterParams<B> for BottleneckAdapter<B> {
    bottleneck_params!(visit_params, ParamRef);
    bottleneck_params!(visit_params_mut, ParamMut, mut);
}
