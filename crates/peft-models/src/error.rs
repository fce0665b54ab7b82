//! The one error type of this crate.

use thiserror::Error;

/// Errors building a model from a config.
#[derive(Debug, Error)]
pub enum ModelError {
    /// `config.json` is malformed or has an unsupported value.
    #[error("invalid model config: {0}")]
    Config(String),
    /// The config is for another architecture.
    #[error("wrong model type: expected {expected}, found {found:?}")]
    WrongModelType {
        /// What this model accepts.
        expected: &'static str,
        /// What the config says.
        found: String,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
