//! `LoraConfig`: every field Hugging Face PEFT writes to `adapter_config.json`, with PEFT's defaults.
//!
//! Fields this crate interprets are typed; every other field PEFT (any version) writes is kept
//! verbatim in [`LoraConfig::extra`] and written back, so a config survives a round trip.

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use std::fmt;

use crate::error::{PeftError, Result};

/// PEFT's `TaskType`: which head the base model has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskType {
    /// Sequence classification (`BertForSequenceClassification`).
    #[serde(rename = "SEQ_CLS")]
    SeqCls,
    /// Sequence-to-sequence language modelling (T5, mT5, mt0).
    #[serde(rename = "SEQ_2_SEQ_LM")]
    Seq2SeqLm,
    /// Causal language modelling.
    #[serde(rename = "CAUSAL_LM")]
    CausalLm,
    /// Token classification.
    #[serde(rename = "TOKEN_CLS")]
    TokenCls,
    /// Extractive question answering.
    #[serde(rename = "QUESTION_ANS")]
    QuestionAns,
    /// Bare encoder producing hidden states.
    #[serde(rename = "FEATURE_EXTRACTION")]
    FeatureExtraction,
}

/// `target_modules` / `exclude_modules`: a list of names (exact or `.suffix` match) or one regex
/// (full match). The string `all-linear` in `target_modules` means every linear layer but the
/// output head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names matched exactly or as a dotted suffix.
    List(Vec<String>),
    /// A regular expression that must match the whole module path.
    Regex(String),
}

impl TargetModules {
    /// Builds a list target from names.
    pub fn list<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        TargetModules::List(names.into_iter().map(Into::into).collect())
    }

    /// `all-linear`, matched case-insensitively as PEFT does.
    pub fn is_all_linear(&self) -> bool {
        matches!(self, TargetModules::Regex(s) if s.eq_ignore_ascii_case("all-linear"))
    }
}

impl fmt::Display for TargetModules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetModules::List(v) => write!(f, "{v:?}"),
            TargetModules::Regex(s) => write!(f, "{s:?}"),
        }
    }
}

/// `init_lora_weights`: `true` (kaiming-uniform A, zero B), `"gaussian"` (A ~ N(0, 1/r), zero B),
/// or `false` (A and B both initialised like a fresh `nn.Linear`, so the adapter is not a no-op).
#[derive(Clone, Debug, PartialEq)]
pub enum InitLoraWeights {
    /// `true`: PEFT's default.
    Default,
    /// `"gaussian"`.
    Gaussian,
    /// `false`: random A and B (useful for tests).
    Random,
    /// Any other string PEFT knows (pissa, olora, loftq, eva, ...); refused when attaching.
    Other(String),
}

impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            InitLoraWeights::Default => s.serialize_bool(true),
            InitLoraWeights::Random => s.serialize_bool(false),
            InitLoraWeights::Gaussian => s.serialize_str("gaussian"),
            InitLoraWeights::Other(o) => s.serialize_str(o),
        }
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(true) => Ok(InitLoraWeights::Default),
            Value::Bool(false) => Ok(InitLoraWeights::Random),
            Value::String(s) if s.eq_ignore_ascii_case("gaussian") => Ok(InitLoraWeights::Gaussian),
            Value::String(s) => Ok(InitLoraWeights::Other(s)),
            other => Err(de::Error::custom(format!(
                "init_lora_weights must be a bool or a string, found {other}"
            ))),
        }
    }
}

/// PEFT's `bias`: which base biases become trainable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    /// No bias is trained (default).
    None,
    /// Every bias of the model is trained.
    All,
    /// Only the biases of LoRA-targeted layers are trained.
    LoraOnly,
}

/// `layers_to_transform`: one layer index or a list of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersToTransform {
    /// A single layer index.
    One(usize),
    /// Several layer indices.
    Many(Vec<usize>),
}

impl LayersToTransform {
    pub(crate) fn is_active(&self) -> bool {
        match self {
            LayersToTransform::One(_) => true,
            LayersToTransform::Many(v) => !v.is_empty(),
        }
    }

    pub(crate) fn contains(&self, idx: usize) -> bool {
        match self {
            LayersToTransform::One(i) => *i == idx,
            LayersToTransform::Many(v) => v.contains(&idx),
        }
    }
}

/// A string or a list of strings (`layers_pattern`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// One string.
    One(String),
    /// Several strings.
    Many(Vec<String>),
}

impl StringOrList {
    pub(crate) fn as_slice(&self) -> &[String] {
        match self {
            StringOrList::One(s) => std::slice::from_ref(s),
            StringOrList::Many(v) => v,
        }
    }
}

/// A JSON object whose key order is kept: PEFT's `rank_pattern` and `alpha_pattern` are looked up
/// in insertion order, first match wins.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct OrderedMap<V>(pub Vec<(String, V)>);

impl<V> OrderedMap<V> {
    /// Whether the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl<V: Serialize> Serialize for OrderedMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V2<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object or null")
            }
            fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(OrderedMap(Vec::new()))
            }
            fn visit_none<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(OrderedMap(Vec::new()))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, V>()? {
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_any(V2(std::marker::PhantomData))
    }
}

/// A number written as an integer when it is integral (PEFT writes `lora_alpha: 32`, not `32.0`).
fn ser_num<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

fn ser_num_map<S: Serializer>(m: &OrderedMap<f64>, s: S) -> std::result::Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(m.0.len()))?;
    for (k, v) in &m.0 {
        if v.fract() == 0.0 && v.abs() < 9.0e15 {
            map.serialize_entry(k, &(*v as i64))?;
        } else {
            map.serialize_entry(k, v)?;
        }
    }
    map.end()
}

/// A bool that PEFT may write as `null` (meaning false).
pub(crate) fn de_null_false<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// Serde default `true`.
pub(crate) fn default_true() -> bool {
    true
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_init() -> InitLoraWeights {
    InitLoraWeights::Default
}
fn default_bias() -> Bias {
    Bias::None
}
fn default_peft_type() -> Option<String> {
    Some("LORA".to_string())
}

/// Hugging Face PEFT's `LoraConfig`, field for field.
///
/// Defaults equal PEFT's (`r = 8`, `lora_alpha = 8`, `lora_dropout = 0.0`, `bias = "none"`,
/// `init_lora_weights = true`, ...). Unknown fields are kept in [`extra`](Self::extra).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    #[serde(default = "default_peft_type")]
    pub peft_type: Option<String>,
    /// The task (decides the default head handling).
    #[serde(default)]
    pub task_type: Option<TaskType>,
    /// The base model this adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The base model's revision.
    #[serde(default)]
    pub revision: Option<String>,
    /// `true` in saved configs: adapters load frozen.
    #[serde(default)]
    pub inference_mode: bool,
    /// LoRA rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Modules to adapt; `None` takes PEFT's default for the model type.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// LoRA alpha (scaling = alpha / r).
    #[serde(default = "default_alpha", serialize_with = "ser_num")]
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch's input, in training only.
    #[serde(default)]
    pub lora_dropout: f64,
    /// For GPT-2 style `Conv1D` weights; no model here has them, so it only round-trips.
    #[serde(default, deserialize_with = "de_null_false")]
    pub fan_in_fan_out: bool,
    /// Which base biases are trained.
    #[serde(default = "default_bias")]
    pub bias: Bias,
    /// Rank-stabilised scaling alpha / sqrt(r).
    #[serde(default, deserialize_with = "de_null_false")]
    pub use_rslora: bool,
    /// Modules (besides LoRA) that get a trainable, saved copy (e.g. a classifier head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// How A and B are initialised.
    #[serde(default = "default_init")]
    pub init_lora_weights: InitLoraWeights,
    /// Only these layer indices are adapted (with a list `target_modules`).
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    /// The name of the layer list (`layer`, `block`, ...) for `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<StringOrList>,
    /// Per-module ranks: key regex matched against the module path's end.
    #[serde(default)]
    pub rank_pattern: OrderedMap<usize>,
    /// Per-module alphas, matched like `rank_pattern`.
    #[serde(default, serialize_with = "ser_num_map")]
    pub alpha_pattern: OrderedMap<f64>,
    /// Weight-decomposed LoRA (not implemented yet: refused when attaching).
    #[serde(default, deserialize_with = "de_null_false")]
    pub use_dora: bool,
    /// A trainable bias on `lora_B`.
    #[serde(default, deserialize_with = "de_null_false")]
    pub lora_bias: bool,
    /// Every other field, kept verbatim (`peft_version`, `revision`, `megatron_config`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            peft_type: default_peft_type(),
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            r: default_r(),
            target_modules: None,
            exclude_modules: None,
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            fan_in_fan_out: false,
            bias: Bias::None,
            use_rslora: false,
            modules_to_save: None,
            init_lora_weights: InitLoraWeights::Default,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: OrderedMap::default(),
            alpha_pattern: OrderedMap::default(),
            use_dora: false,
            lora_bias: false,
            extra: Map::new(),
        }
    }
}

/// Extra fields that, when set to anything but their PEFT default, change the computation in
/// ways this crate does not implement yet.
const UNSUPPORTED_EXTRA: &[&str] = &[
    "use_qalora",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
    "modules_to_tie",
];

impl LoraConfig {
    /// A config with PEFT's defaults and the given rank, alpha and targets.
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> Self {
        LoraConfig {
            r,
            lora_alpha,
            target_modules: Some(target_modules),
            ..Default::default()
        }
    }

    /// Parses an `adapter_config.json` body.
    pub fn from_json(text: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Serialises as PEFT writes it (pretty JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("LoraConfig always serialises")
    }

    /// Checks ranges and refuses options this crate does not implement, the way PEFT's
    /// `__post_init__` and `update_layer` do.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.peft_type
            && t != "LORA"
        {
            return Err(PeftError::InvalidConfig(format!(
                "peft_type is {t:?}, expected \"LORA\""
            )));
        }
        if self.r == 0 {
            return Err(PeftError::InvalidConfig(
                "`r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        if let Some((k, _)) = self.rank_pattern.0.iter().find(|(_, r)| *r == 0) {
            return Err(PeftError::InvalidConfig(format!(
                "rank_pattern[{k:?}] is 0; ranks must be positive"
            )));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::InvalidConfig(format!(
                "lora_dropout must be in [0, 1), found {}",
                self.lora_dropout
            )));
        }
        if self.use_dora {
            return Err(PeftError::Unsupported("use_dora = true (DoRA)".into()));
        }
        if let InitLoraWeights::Other(o) = &self.init_lora_weights {
            return Err(PeftError::Unsupported(format!("init_lora_weights = {o:?}")));
        }
        if self.layers_pattern.is_some()
            && !self
                .layers_to_transform
                .as_ref()
                .is_some_and(|l| l.is_active())
        {
            return Err(PeftError::InvalidConfig(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
                    .into(),
            ));
        }
        if matches!(self.target_modules, Some(TargetModules::Regex(_)))
            && self.layers_to_transform.is_some()
        {
            return Err(PeftError::InvalidConfig(
                "`layers_to_transform` cannot be used when `target_modules` is a str.".into(),
            ));
        }
        if matches!(self.target_modules, Some(TargetModules::Regex(_)))
            && self.layers_pattern.is_some()
        {
            return Err(PeftError::InvalidConfig(
                "`layers_pattern` cannot be used when `target_modules` is a str.".into(),
            ));
        }
        if self.lora_bias && self.init_lora_weights == InitLoraWeights::Gaussian {
            return Err(PeftError::InvalidConfig(
                "lora_bias=True is only supported with init_lora_weights=True or False".into(),
            ));
        }
        for key in UNSUPPORTED_EXTRA {
            match self.extra.get(*key) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                Some(Value::Array(a)) if a.is_empty() => {}
                Some(Value::Object(o)) if o.is_empty() => {}
                Some(v) => {
                    return Err(PeftError::Unsupported(format!("{key} = {v}")));
                }
            }
        }
        Ok(())
    }

    /// The rank for the module at `path` (`rank_pattern` first, then `r`).
    pub fn rank_for(&self, path: &str) -> Result<usize> {
        Ok(
            match crate::targeting::pattern_key(self.rank_pattern.keys(), path, "rank_pattern")? {
                Some(k) => *self.rank_pattern.get(k).expect("key from the map"),
                None => self.r,
            },
        )
    }

    /// The alpha for the module at `path` (`alpha_pattern` first, then `lora_alpha`).
    pub fn alpha_for(&self, path: &str) -> Result<f64> {
        Ok(
            match crate::targeting::pattern_key(self.alpha_pattern.keys(), path, "alpha_pattern")? {
                Some(k) => *self.alpha_pattern.get(k).expect("key from the map"),
                None => self.lora_alpha,
            },
        )
    }
}

/// LoRA's scaling factor: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
pub fn lora_scaling(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}
