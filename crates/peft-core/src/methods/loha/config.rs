//! PEFT's `LoHaConfig`, field for field (its targets default to LoRA's per model type).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{PeftConfigHeader, PeftType, TargetModules, default_true};
use crate::error::Result;
use crate::methods::lycoris::LycorisCommon;
use crate::targeting::Targeting;

/// LoHa's `peft_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoHa;

impl PeftType for LoHa {
    const NAME: &'static str = "LOHA";
}

/// Hugging Face PEFT's `LoHaConfig`, field for field; unknown fields kept in
/// [`extra`](Self::extra).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoHaConfig {
    /// PEFT's shared header (`peft_type = "LOHA"`, `task_type`, `inference_mode`, ...).
    #[serde(flatten)]
    pub header: PeftConfigHeader<LoHa>,
    /// The fields LoHa shares with LoKr (`r`, `alpha`, dropouts, targets, patterns).
    #[serde(flatten)]
    pub common: LycorisCommon,
    /// `true`: `w2_b` starts at zero (the adapter is a no-op); `false`: all four random.
    #[serde(default = "default_true")]
    pub init_weights: bool,
    /// Every other field, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for LoHaConfig {
    fn default() -> Self {
        LoHaConfig {
            header: PeftConfigHeader::default(),
            common: LycorisCommon::default(),
            init_weights: true,
            extra: Map::new(),
        }
    }
}

impl LoHaConfig {
    /// A LoHa config of rank `r` and `alpha` on `target_modules`, PEFT's defaults elsewhere.
    pub fn new(r: usize, alpha: f64, target_modules: TargetModules) -> Self {
        LoHaConfig {
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
        serde_json::to_string_pretty(self).expect("LoHaConfig always serialises")
    }

    /// PEFT's `LoHaConfig.__post_init__` checks, and what this crate refuses.
    pub fn validate(&self) -> Result<()> {
        self.header.check()?;
        self.common.validate("LoHa", self.header.task_type)
    }

    /// Where this adapter attaches (LoRA's default targets when `target_modules` is unset).
    pub fn targeting(&self) -> Targeting {
        self.common.targeting("LoHa", self.header.task_type)
    }
}
