//! IA3 ("Infused Adapter by Inhibiting and Amplifying Inner Activations"), with PEFT's semantics.
//!
//! Each targeted linear layer gets a learned vector `ia3_l`, initialised to ones:
//! - on an ordinary target the layer's output is scaled, `y = base(x) * l` (`l` is `[out]`, the
//!   bias scaled with it);
//! - on a feed-forward target the layer's input is scaled, `y = base(x * l)` (`l` is `[in]`).
//!
//! Several active IA3 adapters multiply their vectors. Merging folds `l` into the weight (rows for
//! feed-forward targets, columns otherwise, and the bias of ordinary targets).

pub mod config;
pub mod layer;
pub mod model;

pub use config::{Ia3Config, default_ia3_feedforward, default_ia3_targets, is_feedforward};
pub use layer::Ia3Adapter;
