//! The one error type of this crate.

use thiserror::Error;

/// Everything that can go wrong when configuring, attaching or combining adapters.
#[derive(Debug, Error)]
pub enum PeftError {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid adapter config: {0}")]
    InvalidConfig(String),

    /// A `target_modules`, `exclude_modules`, `layers_pattern`, `rank_pattern` or `alpha_pattern`
    /// entry is not a regular expression this crate can compile.
    #[error("invalid pattern `{pattern}` in `{field}`: {reason}")]
    InvalidPattern {
        /// The config field holding the pattern.
        field: &'static str,
        /// The pattern as written.
        pattern: String,
        /// Why it was refused.
        reason: String,
    },

    /// The config targets nothing in this model.
    #[error(
        "target modules {targets} not found in the base model; \
         the model's linear layers are: {available}"
    )]
    NoTargetMatched {
        /// The targets as written in the config.
        targets: String,
        /// The adaptable layers the model has (possibly abbreviated).
        available: String,
    },

    /// An adapter name is already taken.
    #[error("adapter `{0}` already exists")]
    AdapterExists(String),

    /// An adapter name is unknown.
    #[error("adapter `{name}` not found; existing adapters: [{existing}]")]
    AdapterNotFound {
        /// The requested name.
        name: String,
        /// The adapters that exist.
        existing: String,
    },

    /// The operation is refused while adapters are merged into the base weights.
    #[error("cannot {0} while adapters are merged; unmerge first")]
    Merged(&'static str),

    /// A safe merge found NaN or Inf values and left the base untouched.
    #[error(
        "NaNs detected in the merged weights of `{site}`: adapter `{adapter}` seems to be broken"
    )]
    NonFiniteMerge {
        /// The module path of the layer.
        site: String,
        /// The adapter being merged.
        adapter: String,
    },

    /// A tensor given for an adapter has the wrong shape.
    #[error("shape mismatch for `{key}`: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// The module path and tensor name.
        key: String,
        /// The shape the layer needs.
        expected: Vec<usize>,
        /// The shape given.
        found: Vec<usize>,
    },

    /// A config option this crate does not implement yet.
    #[error("unsupported adapter option: {0}")]
    Unsupported(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, PeftError>;
