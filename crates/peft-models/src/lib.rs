//! # peft-models
//!
//! Transformer architectures whose linear layers are `peft_core::AdaptedLinear` sites, with
//! module paths equal to Hugging Face's (`encoder.block.0.layer.0.SelfAttention.q`,
//! `bert.encoder.layer.0.attention.self.query`), so that PEFT target names and checkpoint keys
//! line up without per-model glue.
//!
//! This crate owns the architectures (T5 / mT5 / mt0 and BERT, tracked in the models issue) and
//! their `peft_core::AdapterHost` walks. It knows no adapter method and reads no file.
#![deny(missing_docs)]
