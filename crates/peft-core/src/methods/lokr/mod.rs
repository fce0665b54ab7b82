//! LoKr (PEFT's `LoKrConfig`, from LyCORIS) on linear layers: the weight change is a Kronecker
//! product `dW = kron(w1, w2) * alpha / r`, with `out = a c` and `in = b d` factorised as PEFT's
//! `factorization` does, and `w1` (`decompose_both`) or `w2` (rank below half the factor sizes)
//! themselves low-rank products. In training, `rank_dropout` drops output rows of `dW` (rescaled
//! with `rank_dropout_scale`) and `module_dropout` skips the adapter, as PEFT does.
//!
//! - [`config`]: `LoKrConfig`, field for field PEFT's;
//! - [`layer`]: `LokrAdapter`, one adapter on one linear layer, and [`layer::factorization`];
//! - [`model`]: attaching it to every targeted layer of a model.

pub mod config;
pub mod layer;
pub mod model;

pub use config::{LoKr, LoKrConfig, LokrInit};
pub use layer::LokrAdapter;
