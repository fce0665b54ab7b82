//! LoRA: low-rank adapters on linear layers, computed in activation space.

mod linear;

pub use linear::{AdaptedLinear, LoraAdapter, LoraSpec, MergeBackup, SavedLinear, linear};
