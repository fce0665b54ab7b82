//! # peft
//!
//! Parameter-efficient fine-tuning for [Burn](https://burn.dev), file-compatible with Hugging
//! Face PEFT. This facade re-exports the workspace crates:
//!
//! - [`core`] (`peft-core`): adapter methods (LoRA, IA3, bottleneck adapters), configs, targeting, `PeftModel`;
//! - [`models`] (`peft-models`): model architectures with adapter sites;
//! - [`io`] (`peft-io`): PEFT and Hugging Face file formats;
//! - [`train`] (`peft-train`): `TrainingArguments`, tasks, collators, the training loop, and
//!   data parallelism (`train::distributed`; the multi-process `WorkerGroup` with the
//!   `distributed` feature).
//!
//! The backend is chosen by features: `ndarray` (default, CPU), `wgpu`, `cuda`.

/// The Burn version this crate is built on (backends: `peft::burn::backend::{NdArray, Autodiff}`),
/// so that a user depends on `peft` alone.
pub use burn;
pub use peft_core as core;
pub use peft_io as io;
pub use peft_models as models;
pub use peft_train as train;

pub use peft_core::{
    AdaptedLinear, AdapterHost, LoraConfig, PeftError, PeftModel, TargetModules, TaskType,
};

/// The README's Rust snippet, compiled as a doctest so that it stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
