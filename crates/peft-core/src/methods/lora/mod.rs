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

/// A tensor's values on the host, row-major, as f32 (for the host-side linear algebra of
/// `convert`, `init` and `weighted`).
pub(crate) fn host_values<B: burn::tensor::backend::Backend, const D: usize>(
    t: burn::tensor::Tensor<B, D>,
) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

pub use config::{Bias, InitLoraWeights, Lora, LoraConfig, lora_scaling};
pub use layer::{LoraAdapter, LoraSpec};
