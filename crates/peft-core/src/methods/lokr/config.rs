//! PEFT's `LoKrConfig`, field for field (its targets default to LoRA's per model type).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{PeftConfigHeader, PeftType, TargetModules, de_null_false};
use crate::error::{PeftError, Result};
use crate::methods::lycoris::LycorisCommon;
use crate::targeting::Targeting;

/// LoKr's `peft_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoKr;

impl PeftType for LoKr {
    const NAME: &'static str = "LOKR";
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
    /// The fields LoKr shares with LoHa (`r`, `alpha`, dropouts, targets, patterns).
    #[serde(flatten)]
    pub common: LycorisCommon,
    /// Decompose the left Kronecker factor too.
    #[serde(default, deserialize_with = "de_null_false")]
    pub decompose_both: bool,
    /// The factor dimensions are split by (`-1`: as close to a square root as possible).
    #[serde(default = "default_factor")]
    pub decompose_factor: i64,
    /// Rescale the rows kept by rank dropout by the share kept.
    #[serde(default, deserialize_with = "de_null_false")]
    pub rank_dropout_scale: bool,
    /// `true`, `false` or `"lycoris"` (see [`LokrInit`]).
    #[serde(default = "default_init")]
    pub init_weights: Value,
    /// Every other field, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for LoKrConfig {
    fn default() -> Self {
        LoKrConfig {
            header: PeftConfigHeader::default(),
            common: LycorisCommon::default(),
            decompose_both: false,
            decompose_factor: -1,
            rank_dropout_scale: false,
            init_weights: default_init(),
            extra: Map::new(),
        }
    }
}

impl LoKrConfig {
    /// A LoKr config of rank `r` and `alpha` on `target_modules`, PEFT's defaults elsewhere.
    pub fn new(r: usize, alpha: f64, target_modules: TargetModules) -> Self {
        LoKrConfig {
            common: LycorisCommon::new(r, alpha, target_modules),
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
        self.init()?;
        if self.decompose_factor == 0 || self.decompose_factor < -1 {
            return Err(PeftError::InvalidConfig(format!(
                "decompose_factor must be -1 or positive, found {}",
                self.decompose_factor
            )));
        }
        self.common.validate("LoKr", self.header.task_type)
    }

    /// Where this adapter attaches (LoRA's default targets when `target_modules` is unset).
    pub fn targeting(&self) -> Targeting {
        self.common.targeting("LoKr", self.header.task_type)
    }
}
