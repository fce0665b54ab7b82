//! The adapter methods, one folder each (`config`: the reference library's config, field for
//! field; `layer`: the adapter on one site, with its named tensors; `model`: attaching it to a
//! model), and [`AdapterConfig`], the one enum over them that a [`crate::PeftModel`] holds.
//!
//! Adding a method: a folder here, a variant of [`AdapterConfig`], its tensors listed once
//! through [`crate::params::AdapterParams`], and its file keys in peft-io. No model changes.

pub mod bottleneck;
pub mod ia3;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod lycoris;
pub mod prompt;

use bottleneck::BnConfig;
use ia3::Ia3Config;
use loha::LoHaConfig;
use lokr::LoKrConfig;
use lora::{Bias, LoraConfig};
use prompt::{PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig};

use crate::config::TaskType;

/// The config of one named adapter: which method, with its hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum AdapterConfig {
    /// PEFT LoRA.
    Lora(LoraConfig),
    /// PEFT IA3.
    Ia3(Ia3Config),
    /// PEFT LoHa.
    LoHa(LoHaConfig),
    /// PEFT LoKr.
    LoKr(LoKrConfig),
    /// AdapterHub bottleneck adapter (Houlsby, Pfeiffer, any `BnConfig`).
    Bottleneck(BnConfig),
    /// PEFT prompt tuning.
    PromptTuning(PromptTuningConfig),
    /// PEFT P-tuning (`PromptEncoderConfig`).
    PTuning(PromptEncoderConfig),
    /// PEFT prefix tuning.
    PrefixTuning(PrefixTuningConfig),
}

impl AdapterConfig {
    /// Loaded for inference only: its parameters never require gradients.
    pub fn inference_mode(&self) -> bool {
        match self {
            AdapterConfig::Lora(c) => c.header.inference_mode,
            AdapterConfig::Ia3(c) => c.header.inference_mode,
            AdapterConfig::LoHa(c) => c.header.inference_mode,
            AdapterConfig::LoKr(c) => c.header.inference_mode,
            AdapterConfig::Bottleneck(_) => false,
            AdapterConfig::PromptTuning(c) => c.header.inference_mode,
            AdapterConfig::PTuning(c) => c.header.inference_mode,
            AdapterConfig::PrefixTuning(c) => c.header.inference_mode,
        }
    }

    /// Sets [`inference_mode`](Self::inference_mode) (bottleneck adapters track it in the
    /// [`crate::PeftModel`] instead; AdapterHub has no such field).
    pub fn set_inference_mode(&mut self, on: bool) {
        match self {
            AdapterConfig::Lora(c) => c.header.inference_mode = on,
            AdapterConfig::Ia3(c) => c.header.inference_mode = on,
            AdapterConfig::LoHa(c) => c.header.inference_mode = on,
            AdapterConfig::LoKr(c) => c.header.inference_mode = on,
            AdapterConfig::Bottleneck(_) => {}
            AdapterConfig::PromptTuning(c) => c.header.inference_mode = on,
            AdapterConfig::PTuning(c) => c.header.inference_mode = on,
            AdapterConfig::PrefixTuning(c) => c.header.inference_mode = on,
        }
    }

    /// PEFT's `task_type`.
    pub fn task_type(&self) -> Option<TaskType> {
        match self {
            AdapterConfig::Lora(c) => c.header.task_type,
            AdapterConfig::Ia3(c) => c.header.task_type,
            AdapterConfig::LoHa(c) => c.header.task_type,
            AdapterConfig::LoKr(c) => c.header.task_type,
            AdapterConfig::Bottleneck(_) => None,
            AdapterConfig::PromptTuning(c) => c.header.task_type,
            AdapterConfig::PTuning(c) => c.header.task_type,
            AdapterConfig::PrefixTuning(c) => c.header.task_type,
        }
    }

    /// Which base biases the adapter trains (LoRA only).
    pub fn bias(&self) -> Bias {
        match self {
            AdapterConfig::Lora(c) => c.bias,
            _ => Bias::None,
        }
    }

    /// The method's name as the files write it (PEFT's `peft_type`; `BOTTLENECK` for
    /// AdapterHub adapters).
    pub fn peft_type(&self) -> &'static str {
        match self {
            AdapterConfig::Lora(_) => "LORA",
            AdapterConfig::Ia3(_) => "IA3",
            AdapterConfig::LoHa(_) => "LOHA",
            AdapterConfig::LoKr(_) => "LOKR",
            AdapterConfig::Bottleneck(_) => "BOTTLENECK",
            AdapterConfig::PromptTuning(_) => "PROMPT_TUNING",
            AdapterConfig::PTuning(_) => "P_TUNING",
            AdapterConfig::PrefixTuning(_) => "PREFIX_TUNING",
        }
    }

    /// The LoRA config, if this is one.
    pub fn as_lora(&self) -> Option<&LoraConfig> {
        match self {
            AdapterConfig::Lora(c) => Some(c),
            _ => None,
        }
    }
}

impl From<LoraConfig> for AdapterConfig {
    fn from(c: LoraConfig) -> Self {
        AdapterConfig::Lora(c)
    }
}

impl AdapterConfig {
    /// Whether this is a prompt-learning method (prompt tuning, P-tuning, prefix tuning).
    pub fn is_prompt_learning(&self) -> bool {
        self.prompt_common().is_some()
    }

    /// The fields every prompt-learning config shares (`num_virtual_tokens`, ...), if this is
    /// one.
    pub fn prompt_common(&self) -> Option<&prompt::PromptLearningCommon> {
        match self {
            AdapterConfig::PromptTuning(c) => Some(&c.common),
            AdapterConfig::PTuning(c) => Some(&c.common),
            AdapterConfig::PrefixTuning(c) => Some(&c.common),
            _ => None,
        }
    }

    /// Like [`prompt_common`](Self::prompt_common), mutably.
    pub fn prompt_common_mut(&mut self) -> Option<&mut prompt::PromptLearningCommon> {
        match self {
            AdapterConfig::PromptTuning(c) => Some(&mut c.common),
            AdapterConfig::PTuning(c) => Some(&mut c.common),
            AdapterConfig::PrefixTuning(c) => Some(&mut c.common),
            _ => None,
        }
    }

    /// Sets PEFT's `task_type` (bottleneck adapters have none: unchanged).
    pub fn set_task_type(&mut self, task: Option<TaskType>) {
        match self {
            AdapterConfig::Lora(c) => c.header.task_type = task,
            AdapterConfig::Ia3(c) => c.header.task_type = task,
            AdapterConfig::LoHa(c) => c.header.task_type = task,
            AdapterConfig::LoKr(c) => c.header.task_type = task,
            AdapterConfig::Bottleneck(_) => {}
            AdapterConfig::PromptTuning(c) => c.header.task_type = task,
            AdapterConfig::PTuning(c) => c.header.task_type = task,
            AdapterConfig::PrefixTuning(c) => c.header.task_type = task,
        }
    }
}

impl From<PromptTuningConfig> for AdapterConfig {
    fn from(c: PromptTuningConfig) -> Self {
        AdapterConfig::PromptTuning(c)
    }
}

impl From<PromptEncoderConfig> for AdapterConfig {
    fn from(c: PromptEncoderConfig) -> Self {
        AdapterConfig::PTuning(c)
    }
}

impl From<PrefixTuningConfig> for AdapterConfig {
    fn from(c: PrefixTuningConfig) -> Self {
        AdapterConfig::PrefixTuning(c)
    }
}

impl From<Ia3Config> for AdapterConfig {
    fn from(c: Ia3Config) -> Self {
        AdapterConfig::Ia3(c)
    }
}

impl From<LoHaConfig> for AdapterConfig {
    fn from(c: LoHaConfig) -> Self {
        AdapterConfig::LoHa(c)
    }
}

impl From<LoKrConfig> for AdapterConfig {
    fn from(c: LoKrConfig) -> Self {
        AdapterConfig::LoKr(c)
    }
}

impl From<BnConfig> for AdapterConfig {
    fn from(c: BnConfig) -> Self {
        AdapterConfig::Bottleneck(c)
    }
}
