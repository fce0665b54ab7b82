//! Bottleneck adapters (Houlsby, Pfeiffer, and every `BnConfig` variant) with the exact
//! semantics of AdapterHub's `adapters` library (1.3).
//!
//! A bottleneck adapter sits on a sub-layer's output, where the transformer adds the residual
//! (and, in BERT, applies the post-LayerNorm). The model hands its sub-layer output `h`, the
//! residual input `r` and its LayerNorm (if the sub-layer has one there) to
//! [`SublayerAdapters::forward`](crate::SublayerAdapters::forward), which computes, for the
//! active adapter:
//!
//! ```text
//! pre:   residual = h                      (residual_before_ln = true)
//!        if original_ln_before: h = h + r; (residual = h if "post_add"); h = LN(h)  [LN if given]
//!        residual = h                      (residual_before_ln = false)
//! core:  up = W_up(act(W_down(LN_before?(h)))) * scaling      (dropout in training)
//!        out = up + residual, LN_after?    (order set by adapter_residual_before_ln)
//! post:  if original_ln_after: out = LN(out + r)                             [LN if given]
//! ```
//!
//! With no active adapter the site is exactly the model's own `LN(h + r)` (or `h + r`).
//! Several active adapters are applied in order, as AdapterHub's `Stack`.

pub mod config;
pub mod layer;
pub mod model;

pub use config::{BnConfig, ReductionFactor, ResidualBeforeLn, Scaling};
pub use layer::{Activation, BottleneckAdapter};
