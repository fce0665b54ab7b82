//! LoHa (PEFT's `LoHaConfig`, from LyCORIS) on linear layers: the weight change is a Hadamard
//! product of two low-rank products, `dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r`, applied as
//! `x dW^T` next to the frozen base. In training, `rank_dropout` drops rows of `dW` (rescaled by
//! the share kept) and `module_dropout` skips the whole adapter, as PEFT does.
//!
//! - [`config`]: `LoHaConfig`, field for field PEFT's;
//! - [`layer`]: `LohaAdapter`, one adapter on one linear layer;
//! - [`model`]: attaching it to every targeted layer of a model.

pub mod config;
pub mod layer;
pub mod model;

pub use config::{LoHa, LoHaConfig};
pub use layer::LohaAdapter;
