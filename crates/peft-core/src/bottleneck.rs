//! Bottleneck adapters (Houlsby, Pfeiffer, and every `BnConfig` variant) with the exact
//! semantics of AdapterHub's `adapters` library (1.3).
//!
//! A bottleneck adapter sits on a sub-layer's output, where the transformer adds the residual
//! (and, in BERT, applies the post-LayerNorm). The model hands its sub-layer output `h`, the
//! residual input `r` and its LayerNorm (if the sub-layer has one there) to
//! [`SublayerAdapters::forward`], which computes, for the active adapter:
//!
//! ```text
//! pre:   residual = h                      (residual_before_ln = true)
//!        if original_ln_before: h = h + r; (residual = h if "post_add"); h = LN(h)  [LN if given]
//!        residual = h                      (residual_before_ln = false)
//! core:  up = W_up(act(W_down(LN_before?(h)))) * scaling      (dropout in training)
//!        out = up + residual, LN_after?    (order set by adapter_residual_before_ln)
//! post:  if original_ln_after: out = LN(out + r)                             [LN if given]
//! ```
//!
//! With no active adapter the site is exactly the model's own `LN(h + r)` (or `h + r`).
//! Several active adapters are applied in order, as AdapterHub's `Stack`.

use crate::dropout::Dropout;
use burn::module::{Initializer, Module, Param};
use burn::tensor::Tensor;
use burn::tensor::activation;
use burn::tensor::backend::Backend;
use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{OrderedMap, default_true};
use crate::error::{PeftError, Result};
use crate::lora::linear;

/// Where in a transformer layer a bottleneck site sits (AdapterHub's `location_key`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SublayerKind {
    /// After the (self-)attention output: `mh_adapter`.
    Attention,
    /// After the decoder's cross-attention output: `cross_adapter`.
    CrossAttention,
    /// After the feed-forward output: `output_adapter`.
    Output,
}

/// One bottleneck site of a model: its Hugging Face module path, kind, and AdapterHub layer
/// index (decoder layers of encoder-decoder models count on from the encoder's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SublayerSite {
    /// HF module path of the sub-layer (`encoder.layer.0.output`,
    /// `decoder.block.1.layer.2`): AdapterHub keys are `<path>.adapters.<name>.<tensor>`.
    pub path: String,
    /// Placement.
    pub kind: SublayerKind,
    /// AdapterHub's layer index (for `leave_out` and per-layer `reduction_factor`).
    pub layer: usize,
    /// Hidden size at this site.
    pub hidden: usize,
}

/// `reduction_factor`: one number, or per layer (`{"0": 8, "default": 16}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReductionFactor {
    /// The same for every layer.
    One(f64),
    /// By layer index (as a string key), with an optional `default`.
    PerLayer(OrderedMap<f64>),
}

/// `residual_before_ln`: `true`, `false` or `"post_add"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResidualBeforeLn {
    /// The residual is the sub-layer output before the original LayerNorm (`true`).
    Before,
    /// The residual is the input of the adapter, after the original LayerNorm (`false`).
    After,
    /// The residual is taken after adding the sub-layer's residual, before its LayerNorm.
    PostAdd,
}

impl Serialize for ResidualBeforeLn {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ResidualBeforeLn::Before => s.serialize_bool(true),
            ResidualBeforeLn::After => s.serialize_bool(false),
            ResidualBeforeLn::PostAdd => s.serialize_str("post_add"),
        }
    }
}

impl<'de> Deserialize<'de> for ResidualBeforeLn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(true) => Ok(ResidualBeforeLn::Before),
            Value::Bool(false) => Ok(ResidualBeforeLn::After),
            Value::String(s) if s == "post_add" => Ok(ResidualBeforeLn::PostAdd),
            other => Err(de::Error::custom(format!(
                "residual_before_ln must be true, false or \"post_add\", found {other}"
            ))),
        }
    }
}

/// `scaling`: a number, `"learned"` (one trainable scalar) or `"channel"` (one per channel).
#[derive(Clone, Debug, PartialEq)]
pub enum Scaling {
    /// A fixed factor.
    Fixed(f64),
    /// A trainable scalar initialised to 1.
    Learned,
    /// A trainable vector over channels initialised to 1.
    Channel,
}

impl Serialize for Scaling {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Scaling::Fixed(v) => s.serialize_f64(*v),
            Scaling::Learned => s.serialize_str("learned"),
            Scaling::Channel => s.serialize_str("channel"),
        }
    }
}

impl<'de> Deserialize<'de> for Scaling {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => Ok(Scaling::Fixed(n.as_f64().unwrap_or(1.0))),
            Value::String(s) if s == "learned" => Ok(Scaling::Learned),
            Value::String(s) if s == "channel" => Ok(Scaling::Channel),
            other => Err(de::Error::custom(format!(
                "scaling must be a number, \"learned\" or \"channel\", found {other}"
            ))),
        }
    }
}

fn default_rf() -> ReductionFactor {
    ReductionFactor::One(16.0)
}
fn default_nl() -> String {
    "relu".into()
}
fn default_init() -> String {
    "bert".into()
}
fn default_scaling() -> Scaling {
    Scaling::Fixed(1.0)
}
fn default_rbl() -> ResidualBeforeLn {
    ResidualBeforeLn::Before
}

/// AdapterHub's `BnConfig` (the `config` object of its `adapter_config.json`), field for field.
/// Fields that change the computation in ways not implemented here (parallel adapters, gating,
/// PHM layers, invertible adapters, stochastic depth) are refused by
/// [`validate`](Self::validate); unknown fields are kept in [`extra`](Self::extra).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BnConfig {
    /// AdapterHub's `architecture`: absent (`null`) for bottleneck adapters; other values
    /// (`lora`, `prefix_tuning`, `union`, ...) name methods this type does not describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// An adapter after the attention output (Houlsby).
    #[serde(default)]
    pub mh_adapter: bool,
    /// An adapter after the feed-forward output.
    #[serde(default)]
    pub output_adapter: bool,
    /// Hidden size / bottleneck size.
    #[serde(default = "default_rf")]
    pub reduction_factor: ReductionFactor,
    /// Activation between the projections (`relu`, `swish`, `gelu`, `tanh`, ...).
    #[serde(default = "default_nl")]
    pub non_linearity: String,
    /// Add the residual and apply the model's LayerNorm before the adapter.
    #[serde(default)]
    pub original_ln_before: bool,
    /// Add the residual and apply the model's LayerNorm after the adapter.
    #[serde(default = "default_true")]
    pub original_ln_after: bool,
    /// A new LayerNorm on the adapter's input.
    #[serde(default)]
    pub ln_before: bool,
    /// A new LayerNorm on the adapter's output.
    #[serde(default)]
    pub ln_after: bool,
    /// `bert`, `mam_adapter` or `houlsby`.
    #[serde(default = "default_init")]
    pub init_weights: String,
    /// Parallel adapter (not implemented).
    #[serde(default)]
    pub is_parallel: bool,
    /// Output scaling.
    #[serde(default = "default_scaling")]
    pub scaling: Scaling,
    /// Gating (not implemented).
    #[serde(default)]
    pub use_gating: bool,
    /// Which tensor the adapter's residual is.
    #[serde(default = "default_rbl")]
    pub residual_before_ln: ResidualBeforeLn,
    /// Adapter residual added before (`true`) or after (`false`) `ln_after`.
    #[serde(default)]
    pub adapter_residual_before_ln: bool,
    /// An adapter after the decoder's cross-attention.
    #[serde(default)]
    pub cross_adapter: bool,
    /// Layer indices without adapters.
    #[serde(default)]
    pub leave_out: Vec<usize>,
    /// Dropout on the adapter output, in training only.
    #[serde(default)]
    pub dropout: f64,
    /// Every other field (`inv_adapter`, `phm_*`, `init_weights_seed`, ...), kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl BnConfig {
    /// AdapterHub's `DoubleSeqBnConfig` (Houlsby et al. 2019): adapters after attention and
    /// feed-forward, swish, reduction factor 16.
    pub fn houlsby() -> Self {
        BnConfig {
            mh_adapter: true,
            output_adapter: true,
            non_linearity: "swish".into(),
            ..Self::base()
        }
    }

    /// AdapterHub's `SeqBnConfig` (Pfeiffer et al. 2020): one adapter after the feed-forward,
    /// relu, reduction factor 16, the model's LayerNorm before and after.
    pub fn pfeiffer() -> Self {
        BnConfig {
            output_adapter: true,
            original_ln_before: true,
            ..Self::base()
        }
    }

    fn base() -> Self {
        BnConfig {
            architecture: None,
            mh_adapter: false,
            output_adapter: false,
            reduction_factor: default_rf(),
            non_linearity: default_nl(),
            original_ln_before: false,
            original_ln_after: true,
            ln_before: false,
            ln_after: false,
            init_weights: default_init(),
            is_parallel: false,
            scaling: default_scaling(),
            use_gating: false,
            residual_before_ln: ResidualBeforeLn::Before,
            adapter_residual_before_ln: false,
            cross_adapter: false,
            leave_out: Vec::new(),
            dropout: 0.0,
            extra: Map::new(),
        }
    }

    /// A named AdapterHub preset: `houlsby`/`double_seq_bn`, `pfeiffer`/`seq_bn`.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "houlsby" | "double_seq_bn" => Some(Self::houlsby()),
            "pfeiffer" | "seq_bn" => Some(Self::pfeiffer()),
            _ => None,
        }
    }

    /// Refuses options not implemented here and inconsistent values.
    pub fn validate(&self) -> Result<()> {
        if let Some(a) = &self.architecture
            && a != "bottleneck"
        {
            return Err(PeftError::Unsupported(format!(
                "AdapterHub architecture {a:?} (only bottleneck adapters are implemented)"
            )));
        }
        let refuse = |what: &str| Err(PeftError::Unsupported(what.to_string()));
        if self.is_parallel {
            return refuse("is_parallel = true (parallel bottleneck adapters)");
        }
        if self.use_gating {
            return refuse("use_gating = true");
        }
        for (key, off) in [
            ("phm_layer", Value::Bool(false)),
            ("inv_adapter", Value::Null),
            ("stochastic_depth", Value::from(0.0)),
        ] {
            if let Some(v) = self.extra.get(key)
                && *v != off
                && !(v.is_number() && v.as_f64() == Some(0.0))
            {
                return refuse(&format!("{key} = {v}"));
            }
        }
        if !matches!(
            self.init_weights.as_str(),
            "bert" | "mam_adapter" | "houlsby"
        ) {
            return refuse(&format!("init_weights = {:?}", self.init_weights));
        }
        Activation::parse(&self.non_linearity)?;
        if self.residual_before_ln == ResidualBeforeLn::PostAdd && !self.original_ln_before {
            return Err(PeftError::InvalidConfig(
                "residual_before_ln = \"post_add\" needs original_ln_before = true".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(PeftError::InvalidConfig(format!(
                "dropout must be in [0, 1), found {}",
                self.dropout
            )));
        }
        match &self.reduction_factor {
            ReductionFactor::One(r) if *r <= 0.0 => Err(PeftError::InvalidConfig(format!(
                "reduction_factor must be positive, found {r}"
            ))),
            ReductionFactor::PerLayer(m) if m.0.iter().any(|(_, r)| *r <= 0.0) => Err(
                PeftError::InvalidConfig("reduction_factor values must be positive".into()),
            ),
            _ => Ok(()),
        }
    }

    /// Whether this config puts an adapter at `site` (location flag set, layer not left out).
    pub fn applies_to(&self, site: &SublayerSite) -> bool {
        let placed = match site.kind {
            SublayerKind::Attention => self.mh_adapter,
            SublayerKind::CrossAttention => self.cross_adapter,
            SublayerKind::Output => self.output_adapter,
        };
        placed && !self.leave_out.contains(&site.layer)
    }

    /// The bottleneck size at `site`: `int(hidden // reduction_factor)`, at least 1.
    pub fn bottleneck_size(&self, site: &SublayerSite) -> Result<usize> {
        let rf = match &self.reduction_factor {
            ReductionFactor::One(r) => *r,
            ReductionFactor::PerLayer(m) => {
                match m.get(&site.layer.to_string()).or_else(|| m.get("default")) {
                    Some(r) => *r,
                    None => {
                        return Err(PeftError::InvalidConfig(format!(
                            "reduction_factor has no entry for layer {} and no \"default\"",
                            site.layer
                        )));
                    }
                }
            }
        };
        Ok(((site.hidden as f64 / rf).floor() as usize).max(1))
    }
}

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

    /// Number of parameters, without materialising lazy ones.
    pub fn num_params(&self) -> usize {
        let ln = |n: &Option<LayerNorm<B>>| {
            n.as_ref().map_or(0, |n| {
                n.weight.lazy_shape().num_elements() + n.bias.lazy_shape().num_elements()
            })
        };
        self.down_weight.lazy_shape().num_elements()
            + self.down_bias.lazy_shape().num_elements()
            + self.up_weight.lazy_shape().num_elements()
            + self.up_bias.lazy_shape().num_elements()
            + ln(&self.norm_before)
            + ln(&self.norm_after)
            + self
                .learned_scaling
                .as_ref()
                .map_or(0, |s| s.lazy_shape().num_elements())
    }

    /// AdapterHub's `pre_forward`: the adapter input and its residual.
    fn pre_forward<const D: usize>(
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
    fn core<const D: usize>(&self, h: Tensor<B, D>, residual: Tensor<B, D>) -> Tensor<B, D> {
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
    fn post_forward<const D: usize>(
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

/// The bottleneck site of one sub-layer: named adapters (none by default), the active ones,
/// and whether adapters are disabled. The model-facing type: every model calls
/// [`forward`](Self::forward) where the sub-layer adds its residual.
#[derive(Module, Debug)]
pub struct SublayerAdapters<B: Backend> {
    /// Bottleneck adapters, by name.
    pub adapters: Vec<BottleneckAdapter<B>>,
    /// Active adapters, applied in order (AdapterHub's `Stack`).
    pub active: Vec<String>,
    /// When true the site computes the model's own residual (and LayerNorm).
    pub disabled: bool,
}

impl<B: Backend> Default for SublayerAdapters<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> SublayerAdapters<B> {
    /// An empty site.
    pub fn new() -> Self {
        SublayerAdapters {
            adapters: Vec::new(),
            active: Vec::new(),
            disabled: false,
        }
    }

    /// The adapter named `name`.
    pub fn adapter(&self, name: &str) -> Option<&BottleneckAdapter<B>> {
        self.adapters.iter().find(|a| a.name == name)
    }

    /// The adapter named `name`, mutably.
    pub fn adapter_mut(&mut self, name: &str) -> Option<&mut BottleneckAdapter<B>> {
        self.adapters.iter_mut().find(|a| a.name == name)
    }

    /// Adds an adapter (active only if [`active`](Self::active) says so).
    pub fn add(&mut self, adapter: BottleneckAdapter<B>) -> Result<()> {
        if self.adapter(&adapter.name).is_some() {
            return Err(PeftError::AdapterExists(adapter.name));
        }
        self.adapters.push(adapter);
        Ok(())
    }

    /// Removes adapter `name`.
    pub fn delete(&mut self, name: &str) {
        self.adapters.retain(|a| a.name != name);
        self.active.retain(|a| a != name);
    }

    /// The sub-layer output with the residual added: through the active adapters, or the
    /// model's own `layer_norm(hidden + residual)` (`hidden + residual` without a LayerNorm).
    pub fn forward<const D: usize>(
        &self,
        hidden: Tensor<B, D>,
        residual: Tensor<B, D>,
        layer_norm: Option<&dyn Fn(Tensor<B, D>) -> Tensor<B, D>>,
    ) -> Tensor<B, D> {
        let stack: Vec<&BottleneckAdapter<B>> = if self.disabled {
            Vec::new()
        } else {
            self.active.iter().filter_map(|n| self.adapter(n)).collect()
        };
        let Some(last) = stack.last() else {
            return match layer_norm {
                Some(ln) => ln(hidden + residual),
                None => hidden + residual,
            };
        };
        let mut h = hidden;
        for a in &stack {
            let (x, res) = a.pre_forward(h, &residual, layer_norm);
            h = a.core(x, res);
        }
        last.post_forward(h, residual, layer_norm)
    }
}
