//! LoRA with PEFT's semantics, computed in activation space:
//! `y = base(x) + B(A(dropout(x))) * scaling`, the base weight frozen and never rebuilt.
//!
//! - [`config`]: `LoraConfig`, field for field PEFT's;
//! - [`layer`]: `LoraAdapter`, one adapter on one linear layer;
//! - [`model`]: attaching an adapter to every targeted layer of a model;
//! - `convert` (feature `svd`): a DoRA adapter as a plain LoRA of a chosen rank;
//! - [`weighted`]: PEFT's `add_weighted_adapter`, one adapter from several;
//! - [`init`]: PEFT's `pissa`, `olora` and `orthogonal` inits, and the conversion of a PiSSA or
//!   OLoRA adapter to a plain LoRA of the original base.

pub mod config;
#[cfg(feature = "svd")]
pub mod convert;
pub mod init;
pub mod layer;
pub mod model;
pub mod weighted;

pub use config::{Bias, InitLoraWeights, Lora, LoraConfig, lora_scaling};
pub use layer::{LoraAdapter, LoraSpec};
