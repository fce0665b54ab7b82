//! IA3 ("Infused Adapter by Inhibiting and Amplifying Inner Activations"), with PEFT's semantics.
//!
//! Each targeted linear layer gets a learned vector `ia3_l`, initialised to ones:
//! - on an ordinary target the layer's output is scaled, `y = base(x) * l` (`l` is `[out]`, the
//!   bias scaled with it);
//! - on a feed-forward target the layer's input is scaled, `y = base(x * l)` (`l` is `[in]`).
//!
//! Several active IA3 adapters multiply their vectors. Merging folds `l` into the weight (rows for
//! feed-forward targets, columns otherwise, and the bias of ordinary targets).

use burn::module::{Initializer, Module, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{LoraConfig, TargetModules, TaskType, de_null_false, default_true};
use crate::error::{PeftError, Result};

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

fn default_peft_type() -> Option<String> {
    Some("IA3".to_string())
}

/// Hugging Face PEFT's `IA3Config`, field for field; unknown fields kept in
/// [`extra`](Self::extra).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ia3Config {
    /// Always `"IA3"`.
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
            peft_type: default_peft_type(),
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
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
        if let Some(t) = &self.peft_type
            && t != "IA3"
        {
            return Err(PeftError::InvalidConfig(format!(
                "peft_type is {t:?}, expected \"IA3\""
            )));
        }
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

    /// The targeting fields as a [`LoraConfig`], so IA3 and LoRA resolve targets with the same
    /// code (PEFT's `check_target_module_exists` is shared too). Default targets are filled in.
    pub fn targeting_view(&self, model_type: Option<&str>) -> Result<LoraConfig> {
        let target_modules = match &self.target_modules {
            Some(t) => t.clone(),
            None => {
                let mt = model_type.unwrap_or("<unknown>");
                match default_ia3_targets(mt) {
                    Some(d) => TargetModules::list(d.iter().copied()),
                    None => {
                        return Err(PeftError::InvalidConfig(format!(
                            "target_modules is not set and model type {mt:?} has no default IA3 \
                             targets; please specify target_modules"
                        )));
                    }
                }
            }
        };
        Ok(LoraConfig {
            task_type: self.task_type,
            target_modules: Some(target_modules),
            exclude_modules: self.exclude_modules.clone(),
            modules_to_save: self.modules_to_save.clone(),
            ..LoraConfig::default()
        })
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

/// One IA3 vector on one linear layer.
#[derive(Module, Debug)]
pub struct Ia3Adapter<B: Backend> {
    /// The adapter's name.
    pub name: String,
    /// The learned scaling vector: `[in]` on feed-forward targets, `[out]` otherwise. PEFT
    /// stores it as `[1, in]` or `[out, 1]`.
    pub ia3_l: Param<Tensor<B, 1>>,
    /// Whether the input (true) or the output (false) is scaled.
    pub feedforward: bool,
}

impl<B: Backend> Ia3Adapter<B> {
    /// A vector of ones (`init_ia3_weights = true`) or, as PEFT's `torch.randn`, N(0, 1)
    /// values (`false`).
    pub fn new(
        name: &str,
        len: usize,
        feedforward: bool,
        init_ones: bool,
        device: &B::Device,
    ) -> Self {
        let init = if init_ones {
            Initializer::Ones
        } else {
            Initializer::Normal {
                mean: 0.0,
                std: 1.0,
            }
        };
        Ia3Adapter {
            name: name.to_string(),
            ia3_l: init.init([len], device),
            feedforward,
        }
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.ia3_l.lazy_shape().num_elements()
    }

    /// PEFT's stored shape of `ia3_l`: `[1, in]` (feed-forward) or `[out, 1]`.
    pub fn peft_shape(&self) -> Vec<usize> {
        let n = self.num_params();
        if self.feedforward {
            vec![1, n]
        } else {
            vec![n, 1]
        }
    }
}
