//! AdapterHub's `BnConfig`: the bottleneck adapter's hyper-parameters and presets.

use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::layer::Activation;
use crate::config::{OrderedMap, default_true};
use crate::error::{PeftError, Result};
use crate::site::{SublayerKind, SublayerSite};

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
