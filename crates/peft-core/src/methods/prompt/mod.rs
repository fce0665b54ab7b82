//! Prompt learning with PEFT's semantics: prompt tuning, P-tuning and prefix tuning. These
//! change a model's inputs or attention rather than a linear layer, so they live on the
//! model's [`PromptSite`](crate::prompt_site::PromptSite):
//!
//! - [`config`]: `PromptTuningConfig`, `PromptEncoderConfig`, `PrefixTuningConfig`, field for
//!   field PEFT's, over `PromptLearningConfig`'s shared fields;
//! - [`layer`]: `PromptAdapter`, the virtual tokens' table and the encoder PEFT trains it
//!   through (MLP, bidirectional LSTM, or the prefix projection);
//! - [`model`]: attaching one to a model, and `TEXT` init.
//!
//! As in PEFT, what is saved is the encoder's output (`prompt_embeddings`), and an adapter
//! loaded for inference is that table alone.

pub mod config;
pub mod layer;
pub mod model;

pub use config::{
    EncoderReparameterization, PrefixTuningConfig, PromptEncoderConfig, PromptLearningCommon,
    PromptTuningConfig, PromptTuningInit,
};
pub use layer::{PromptAdapter, PromptHead, PromptKind, PromptSpec};
