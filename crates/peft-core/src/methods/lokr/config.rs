//! PEFT's `LoKrConfig`, field for field (its targets default to LoRA's per model type).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{
    LayersToTransform, OrderedMap, PeftConfigHeader, PeftType, StringOrList, TargetModules,
    de_null_false, ser_num, ser_num_map,
};
use crate::error::{PeftError, Result};
use crate::targeting::{Targeting, pattern_key};

/// LoKr's `peft_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoKr;

impl PeftType for LoKr {
    const NAME: &'static str = "LOKR";
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_factor() -> i64 {
    -1
}
fn default_init() -> Value {
    Value::Bool(true)
}

/// How a LoKr adapter starts (`init_weights`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LokrInit {
    /// `true`: `w1` (or `w1_a`) zero, the rest kaiming-uniform: a no-op adapter.
    Default,
    /// `false`: every factor kaiming-uniform.
    Random,
    /// `"lycoris"`: `w2` (or `w2_b`) zero, the rest kaiming-uniform.
    Lycoris,
}

/// Hugging Face PEFT's `LoKrConfig`, field for field; unknown fields kept in
/// [`extra`](Self::extra).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoKrConfig {
    /// PEFT's shared header (`peft_type = "LOKR"`, `task_type`, `inference_mode`, ...).
    #[serde(flatten)]
    pub header: PeftConfigHeader<LoKr>,
    /// Rank of the low-rank factors.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Alpha (scaling = alpha / r).
    #[serde(default = "default_alpha", serialize_with = "ser_num")]
    pub alpha: f64,
    /// In training, the probability of dropping each output row of the weight change.
    #[serde(default)]
    pub rank_dropout: f64,
    /// In training, the probability of skipping the adapter for a whole forward pass.
    #[serde(default)]
    pub module_dropout: f64,
    /// Conv layers only; no model here has them.
    #[serde(default, deserialize_with = "de_null_false")]
    pub use_effective_conv2d: bool,
    /// Decompose the left Kronecker factor too.
    #[serde(default, deserialize_with = "de_null_false")]
    pub decompose_both: bool,
    /// The factor dimensions are split by (`-1`: as close to a square root as possible).
    #[serde(default = "default_factor")]
    pub decompose_factor: i64,
    /// Rescale the rows kept by rank dropout by the share kept.
    #[serde(default, deserialize_with = "de_null_false")]
    pub rank_dropout_scale: bool,
    /// Modules to adapt; `None` takes PEFT's default (LoRA's) for the model type.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// `true`, `false` or `"lycoris"` (see [`LokrInit`]).
    #[serde(default = "default_init")]
    pub init_weights: Value,
    /// Only these layer indices are adapted.
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    /// The name of the layer list for `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<StringOrList>,
    /// Per-module ranks.
    #[serde(default)]
    pub rank_pattern: OrderedMap<usize>,
    /// Per-module alphas.
    #[serde(default, serialize_with = "ser_num_map")]
    pub alpha_pattern: OrderedMap<f64>,
    /// Modules that get a trainable, saved copy (e.g. a classifier head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Every other field, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for LoKrConfig {
    fn default() -> Self {
        LoKrConfig {
            header: PeftConfigHeader::default(),
            r: default_r(),
            alpha: default_alpha(),
            rank_dropout: 0.0,
            module_dropout: 0.0,
            use_effective_conv2d: false,
            decompose_both: false,
            decompose_factor: -1,
            rank_dropout_scale: false,
            target_modules: None,
            exclude_modules: None,
            init_weights: default_init(),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: OrderedMap::default(),
            alpha_pattern: OrderedMap::default(),
            modules_to_save: None,
            extra: Map::new(),
        }
    }
}

impl LoKrConfig {
    /// A LoKr config of rank `r` and `alpha` on `target_modules`, PEFT's defaults elsewhere.
    pub fn new(r: usize, alpha: f64, target_modules: TargetModules) -> Self {
        LoKrConfig {
            r,
            alpha,
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
        serde_json::to_string_pretty(self).expect("LoKrConfig always serialises")
    }

    /// `init_weights` as a [`LokrInit`].
    pub fn init(&self) -> Result<LokrInit> {
        match &self.init_weights {
            Value::Bool(true) | Value::Null => Ok(LokrInit::Default),
            Value::Bool(false) => Ok(LokrInit::Random),
            Value::String(s) if s == "lycoris" => Ok(LokrInit::Lycoris),
            other => Err(PeftError::InvalidConfig(format!(
                "init_weights must be true, false or \"lycoris\", found {other}"
            ))),
        }
    }

    /// PEFT's `LoKrConfig.__post_init__` checks, and what this crate refuses.
    pub fn validate(&self) -> Result<()> {
        self.header.check()?;
        if self.r == 0 {
            return Err(PeftError::InvalidConfig(format!(
                "`r` should be a positive integer value but the value passed is {}",
                self.r
            )));
        }
        self.init()?;
        for (name, p) in [
            ("rank_dropout", self.rank_dropout),
            ("module_dropout", self.module_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(PeftError::InvalidConfig(format!(
                    "{name} must be in [0, 1), found {p}"
                )));
            }
        }
        if self.decompose_factor == 0 || self.decompose_factor < -1 {
            return Err(PeftError::InvalidConfig(format!(
                "decompose_factor must be -1 or positive, found {}",
                self.decompose_factor
            )));
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(PeftError::InvalidConfig(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
                    .into(),
            ));
        }
        self.targeting().validate()
    }

    /// Where this adapter attaches (LoRA's default targets when `target_modules` is unset).
    pub fn targeting(&self) -> Targeting {
        Targeting {
            exclude_modules: self.exclude_modules.clone(),
            modules_to_save: self.modules_to_save.clone(),
            layers_to_transform: self.layers_to_transform.clone(),
            layers_pattern: self.layers_pattern.clone(),
            task_type: self.header.task_type,
            ..Targeting::new(
                "LoKr",
                self.target_modules.clone(),
                crate::targeting::default_lora_targets,
            )
        }
    }

    /// The rank for the module at `path` (`rank_pattern` first, then `r`).
    pub fn rank_for(&self, path: &str) -> Result<usize> {
        Ok(
            match pattern_key(self.rank_pattern.keys(), path, "rank_pattern")? {
                Some(k) => *self.rank_pattern.get(k).expect("key from the map"),
                None => self.r,
            },
        )
    }

    /// The alpha for the module at `path` (`alpha_pattern` first, then `alpha`).
    pub fn alpha_for(&self, path: &str) -> Result<f64> {
        Ok(
            match pattern_key(self.alpha_pattern.keys(), path, "alpha_pattern")? {
                Some(k) => *self.alpha_pattern.get(k).expect("key from the map"),
                None => self.alpha,
            },
        )
    }
}
