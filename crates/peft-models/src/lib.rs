//! # peft-models
//!
//! Transformer architectures whose linear layers are [`peft_core::AdaptedLinear`] sites and whose
//! sub-layer outputs are [`peft_core::SublayerAdapters`] sites (where bottleneck adapters sit),
//! with module paths equal to Hugging Face's (`encoder.block.0.layer.0.SelfAttention.q`,
//! `encoder.layer.3.output`), so that PEFT target names and PEFT/AdapterHub checkpoint keys line
//! up without per-model glue.
//!
//! This crate owns the architectures (one file each: [`t5`], [`bert`]) and their
//! [`peft_core::AdapterHost`] walks and [`hf::HfParams`] name tables; generation (greedy, beam)
//! lives apart from them in [`generation`], over any [`generation::Seq2SeqGenerate`] model. It knows no adapter method
//! and reads no file (peft-io does).
#![deny(missing_docs)]

pub mod bert;
mod error;
pub mod generation;
pub mod hf;
pub mod t5;

pub use bert::{BertConfig, BertForSequenceClassification, BertModel};
pub use error::{ModelError, Result};
pub use hf::{HfParamMut, HfParams};
pub use t5::{T5Config, T5ForConditionalGeneration};
