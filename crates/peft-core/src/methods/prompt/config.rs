//! PEFT's prompt-learning configs, field for field: `PromptTuningConfig`,
//! `PromptEncoderConfig` (P-tuning) and `PrefixTuningConfig`, over the fields of
//! `PromptLearningConfig` they share ([`PromptLearningCommon`]).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{PeftConfigHeader, PeftType, TaskType};
use crate::error::{PeftError, Result};
use crate::prompt_site::PromptGeometry;

/// The fields of PEFT's `PromptLearningConfig`. The model-dependent ones (`token_dim`,
/// `num_layers`, `num_attention_heads`, `num_transformer_submodules`) are filled in from the
/// model when the adapter is added, as PEFT's `_prepare_prompt_learning_config` does.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptLearningCommon {
    /// Number of virtual tokens.
    pub num_virtual_tokens: usize,
    /// The model's hidden size.
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 2 for encoder-decoder models (PEFT trains a prompt per stack; the decoder's is unused
    /// by seq2seq LM), 1 otherwise.
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// The model's attention heads.
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// The model's layers (T5: the encoder's).
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Modules trained and saved whole (`SEQ_CLS` adds the classifier).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

impl PromptLearningCommon {
    /// `num_virtual_tokens` virtual tokens, the rest from the model.
    pub fn new(num_virtual_tokens: usize) -> Self {
        Self {
            num_virtual_tokens,
            ..Default::default()
        }
    }

    /// The model-dependent fields, from the config where set, else from the model (as PEFT
    /// fills them in). A value the file gives that the model contradicts is an error.
    pub fn resolve(&mut self, g: &PromptGeometry, task: Option<TaskType>) -> Result<()> {
        if self.num_virtual_tokens == 0 {
            return Err(PeftError::InvalidConfig(
                "num_virtual_tokens must be at least 1, found 0".into(),
            ));
        }
        let s = if task == Some(TaskType::Seq2SeqLm) {
            2
        } else {
            1
        };
        for (field, slot, model) in [
            ("token_dim", &mut self.token_dim, g.token_dim),
            ("num_layers", &mut self.num_layers, g.num_layers),
            (
                "num_attention_heads",
                &mut self.num_attention_heads,
                g.num_attention_heads,
            ),
            (
                "num_transformer_submodules",
                &mut self.num_transformer_submodules,
                s,
            ),
        ] {
            match slot {
                Some(v) if *v != model => {
                    return Err(PeftError::InvalidConfig(format!(
                        "{field} is {v} in the config, but the model has {model}"
                    )));
                }
                _ => *slot = Some(model),
            }
        }
        Ok(())
    }

    /// Rows of the prompt table: `num_virtual_tokens x num_transformer_submodules`.
    pub fn rows(&self) -> usize {
        self.num_virtual_tokens * self.num_transformer_submodules.unwrap_or(1)
    }
}

macro_rules! peft_type {
    ($marker:ident, $name:literal) => {
        #[doc = concat!("`peft_type = \"", $name, "\"`.")]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $marker;
        impl PeftType for $marker {
            const NAME: &'static str = $name;
        }
    };
}
peft_type!(PromptTuning, "PROMPT_TUNING");
peft_type!(PTuning, "P_TUNING");
peft_type!(PrefixTuning, "PREFIX_TUNING");

/// `prompt_tuning_init`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptTuningInit {
    /// Standard normal (`nn.Embedding`'s init).
    #[default]
    #[serde(rename = "RANDOM")]
    Random,
    /// The word embeddings of `prompt_tuning_init_text`'s tokens, repeated to fill.
    #[serde(rename = "TEXT")]
    Text,
    /// The word embeddings of random vocabulary ids.
    #[serde(rename = "SAMPLE_VOCAB")]
    SampleVocab,
}

/// PEFT's `PromptTuningConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptTuningConfig {
    /// PEFT's shared header.
    #[serde(flatten)]
    pub header: PeftConfigHeader<PromptTuning>,
    /// `PromptLearningConfig`'s fields.
    #[serde(flatten)]
    pub common: PromptLearningCommon,
    /// How the prompt starts.
    #[serde(default)]
    pub prompt_tuning_init: PromptTuningInit,
    /// The text of `TEXT` init.
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// The tokenizer of `TEXT` init.
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    /// Every other field, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `encoder_reparameterization_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncoderReparameterization {
    /// Three linear layers with ReLU between.
    #[default]
    #[serde(rename = "MLP")]
    Mlp,
    /// A bidirectional LSTM, then two linear layers.
    #[serde(rename = "LSTM")]
    Lstm,
}

/// PEFT's `PromptEncoderConfig` (P-tuning).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptEncoderConfig {
    /// PEFT's shared header.
    #[serde(flatten)]
    pub header: PeftConfigHeader<PTuning>,
    /// `PromptLearningConfig`'s fields.
    #[serde(flatten)]
    pub common: PromptLearningCommon,
    /// MLP or LSTM.
    #[serde(default)]
    pub encoder_reparameterization_type: EncoderReparameterization,
    /// The encoder's hidden size (default: `token_dim`).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// LSTM layers.
    #[serde(default = "two")]
    pub encoder_num_layers: usize,
    /// Dropout between LSTM layers.
    #[serde(default)]
    pub encoder_dropout: f64,
    /// Every other field, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn two() -> usize {
    2
}

/// PEFT's `PrefixTuningConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrefixTuningConfig {
    /// PEFT's shared header.
    #[serde(flatten)]
    pub header: PeftConfigHeader<PrefixTuning>,
    /// `PromptLearningConfig`'s fields.
    #[serde(flatten)]
    pub common: PromptLearningCommon,
    /// The projection's hidden size (default: `token_dim`).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// Reparameterise the prefix through a two-layer tanh MLP while training.
    #[serde(default)]
    pub prefix_projection: bool,
    /// Every other field, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

macro_rules! prompt_config_impl {
    ($t:ident { $($field:ident : $value:expr),* $(,)? }) => {
        impl $t {
            /// A config with `num_virtual_tokens`, PEFT's defaults elsewhere.
            pub fn new(num_virtual_tokens: usize) -> Self {
                $t {
                    header: PeftConfigHeader::default(),
                    common: PromptLearningCommon::new(num_virtual_tokens),
                    $($field: $value,)*
                    extra: Map::new(),
                }
            }

            /// Parses an `adapter_config.json` body.
            pub fn from_json(text: &str) -> std::result::Result<Self, serde_json::Error> {
                serde_json::from_str(text)
            }

            /// The `adapter_config.json` body.
            pub fn to_json(&self) -> String {
                serde_json::to_string_pretty(self).expect("configs serialise")
            }
        }
    };
}
prompt_config_impl!(PromptTuningConfig {
    prompt_tuning_init: PromptTuningInit::Random,
    prompt_tuning_init_text: None,
    tokenizer_name_or_path: None,
});
prompt_config_impl!(PromptEncoderConfig {
    encoder_reparameterization_type: EncoderReparameterization::Mlp,
    encoder_hidden_size: None,
    encoder_num_layers: 2,
    encoder_dropout: 0.0,
});
prompt_config_impl!(PrefixTuningConfig {
    encoder_hidden_size: None,
    prefix_projection: false,
});

impl PromptTuningConfig {
    /// PEFT's `__post_init__` checks.
    pub fn validate(&self) -> Result<()> {
        if self.prompt_tuning_init == PromptTuningInit::Text
            && (self.prompt_tuning_init_text.is_none() || self.tokenizer_name_or_path.is_none())
        {
            return Err(PeftError::InvalidConfig(
                "prompt_tuning_init TEXT needs prompt_tuning_init_text and tokenizer_name_or_path"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl PromptEncoderConfig {
    /// Checks the encoder's options.
    pub fn validate(&self) -> Result<()> {
        if self.encoder_reparameterization_type == EncoderReparameterization::Lstm
            && !(1..=crate::methods::prompt::layer::MAX_LSTM_LAYERS)
                .contains(&self.encoder_num_layers)
        {
            return Err(PeftError::Unsupported(format!(
                "encoder_num_layers {} for the LSTM encoder (1 to {} are implemented)",
                self.encoder_num_layers,
                crate::methods::prompt::layer::MAX_LSTM_LAYERS
            )));
        }
        if !(0.0..1.0).contains(&self.encoder_dropout) {
            return Err(PeftError::InvalidConfig(format!(
                "encoder_dropout must be in [0, 1), found {}",
                self.encoder_dropout
            )));
        }
        if self.encoder_hidden_size == Some(0) {
            return Err(PeftError::InvalidConfig(
                "encoder_hidden_size must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl PrefixTuningConfig {
    /// Checks the projection's options.
    pub fn validate(&self) -> Result<()> {
        if self.encoder_hidden_size == Some(0) {
            return Err(PeftError::InvalidConfig(
                "encoder_hidden_size must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
