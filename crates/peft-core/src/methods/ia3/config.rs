//! PEFT's `IA3Config`, field for field, with PEFT's default targets per model type.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{PeftConfigHeader, PeftType, TargetModules, de_null_false, default_true};
use crate::error::{PeftError, Result};
use crate::targeting::Targeting;

/// PEFT's default IA3 targets per `model_type` (`TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`).
pub fn default_ia3_targets(model_type: &str) -> Option<&'static [&'static str]> {
    Some(match model_type {
        "t5" => &["k", "v", "wo"],
        "mt5" => &["k", "v", "wi_1"],
        "bert" | "roberta" | "xlm-roberta" => &["key", "value", "output.dense"],
        "bart" => &["k_proj", "v_proj", "fc2"],
        "llama" | "mistral" | "qwen2" | "gemma" => &["k_proj", "v_proj", "down_proj"],
        _ => return None,
    })
}

/// PEFT's default IA3 feed-forward modules per `model_type`
/// (`TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING`).
pub fn default_ia3_feedforward(model_type: &str) -> Option<&'static [&'static str]> {
    Some(match model_type {
        "t5" => &["wo"],
        "mt5" => &[],
        "bert" | "roberta" | "xlm-roberta" => &["output.dense"],
        "bart" => &["fc2"],
        "llama" | "mistral" | "qwen2" | "gemma" => &["down_proj"],
        _ => return None,
    })
}

/// IA3's `peft_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ia3;

impl PeftType for Ia3 {
    const NAME: &'static str = "IA3";
}

/// Hugging Face PEFT's `IA3Config`, field for field; unknown fields kept in
/// [`extra`](Self::extra).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ia3Config {
    /// PEFT's shared header (`peft_type = "IA3"`, `task_type`, `inference_mode`, ...).
    #[serde(flatten)]
    pub header: PeftConfigHeader<Ia3>,
    /// Modules to adapt; `None` takes PEFT's default for the model type.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Targets whose input (not output) is scaled; `None` takes PEFT's default.
    #[serde(default)]
    pub feedforward_modules: Option<TargetModules>,
    /// For GPT-2 style `Conv1D` weights; no model here has them.
    #[serde(default, deserialize_with = "de_null_false")]
    pub fan_in_fan_out: bool,
    /// Modules that get a trainable, saved copy (e.g. a classifier head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `true`: vectors start at ones (the adapter is a no-op).
    #[serde(default = "default_true")]
    pub init_ia3_weights: bool,
    /// Every other field, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for Ia3Config {
    fn default() -> Self {
        Ia3Config {
            header: PeftConfigHeader::default(),
            target_modules: None,
            exclude_modules: None,
            feedforward_modules: None,
            fan_in_fan_out: false,
            modules_to_save: None,
            init_ia3_weights: true,
            extra: Map::new(),
        }
    }
}

impl Ia3Config {
    /// Parses an `adapter_config.json` body.
    pub fn from_json(text: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Serialises as PEFT writes it (pretty JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("Ia3Config always serialises")
    }

    /// PEFT's `IA3Config.__post_init__` checks.
    pub fn validate(&self) -> Result<()> {
        self.header.check()?;
        if self.fan_in_fan_out {
            return Err(PeftError::Unsupported(
                "fan_in_fan_out = true (Conv1D layers)".into(),
            ));
        }
        if let (Some(TargetModules::List(t)), Some(TargetModules::List(f))) =
            (&self.target_modules, &self.feedforward_modules)
            && !f.iter().all(|m| t.contains(m))
        {
            return Err(PeftError::InvalidConfig(
                "`feedforward_modules` should be a subset of `target_modules`".into(),
            ));
        }
        Ok(())
    }

    /// Where this adapter attaches (PEFT's default IA3 targets when `target_modules` is unset).
    pub fn targeting(&self) -> Targeting {
        Targeting {
            exclude_modules: self.exclude_modules.clone(),
            modules_to_save: self.modules_to_save.clone(),
            task_type: self.header.task_type,
            ..Targeting::new("IA3", self.target_modules.clone(), default_ia3_targets)
        }
    }

    /// The resolved `feedforward_modules` (PEFT's default for the model type when unset).
    pub fn effective_feedforward(&self, model_type: Option<&str>) -> Result<TargetModules> {
        match &self.feedforward_modules {
            Some(f) => Ok(f.clone()),
            None => {
                let mt = model_type.unwrap_or("<unknown>");
                match default_ia3_feedforward(mt) {
                    Some(d) => Ok(TargetModules::list(d.iter().copied())),
                    None => Err(PeftError::InvalidConfig(format!(
                        "feedforward_modules is not set and model type {mt:?} has no default; \
                         please specify feedforward_modules"
                    ))),
                }
            }
        }
    }
}

/// PEFT's `_check_target_module_feedforward`: a regex must match the whole path; a list entry
/// matches when the path ends with it (a plain string suffix, no dot required).
pub fn is_feedforward(feedforward: &TargetModules, path: &str) -> Result<bool> {
    Ok(match feedforward {
        TargetModules::Regex(p) => crate::targeting::fullmatch("feedforward_modules", p, path)?,
        TargetModules::List(l) => l.iter().any(|m| path.ends_with(m.as_str())),
    })
}
