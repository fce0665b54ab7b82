//! The one error type of this crate. Every variant names the file it concerns.

use std::path::PathBuf;

use thiserror::Error;

/// Errors reading or writing model and adapter files.
#[derive(Debug, Error)]
pub enum IoError {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The JSON file is malformed.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A JSON file is well formed, but a field has the wrong type or value.
    #[error("{}: field `{field}`: {source}", path.display())]
    JsonField {
        /// The file.
        path: PathBuf,
        /// The field's path (`target_modules[2]`, `layers_pattern`).
        field: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A safetensors file is truncated, malformed or hostile.
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A PyTorch `.bin` checkpoint could not be read safely.
    #[error("{}: cannot read PyTorch checkpoint: {reason}", path.display())]
    Pickle {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The pickle gate refused a pickle inside a PyTorch checkpoint (nothing of it was executed,
    /// and nothing it describes was allocated).
    #[error("{}: cannot read PyTorch checkpoint: {member}: {source}", path.display())]
    PickleRefused {
        /// The file.
        path: PathBuf,
        /// The pickle's name inside the zip (`archive/data.pkl`).
        member: String,
        /// Why the gate refused it.
        source: Box<crate::pickle::GateError>,
    },
    /// The path is not a regular file (a directory, FIFO, device or socket).
    #[error("{}: {}", path.display(), describe_kind(kind))]
    NotRegularFile {
        /// The path.
        path: PathBuf,
        /// What was found there: `directory`, `FIFO`, `character device`, `block device`,
        /// `socket` or `unknown file type`.
        kind: &'static str,
    },
    /// A file read whole into memory is larger than its limit.
    #[error("{}: {size} bytes, more than the {limit}-byte limit for {what}", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// What kind of file it was read as.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// `tokenizer.json` is malformed, or encoding failed.
    #[error("{}: tokenizer error: {reason}", path.display())]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A training checkpoint could not be written or read.
    #[error("{}: checkpoint error: {reason}", path.display())]
    Checkpoint {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A tensor has a dtype that cannot hold weights.
    #[error("{}: tensor `{key}` has dtype {dtype}, expected F32, F16, BF16 or F64", path.display())]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// Its dtype.
        dtype: String,
    },
    /// A tensor's shape differs from the model's parameter.
    #[error("{}: shape mismatch for `{key}`: expected {expected:?}, found {found:?}", path.display())]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// What the model needs.
        expected: Vec<usize>,
        /// What the file has.
        found: Vec<usize>,
    },
    /// Tensors the model needs are absent.
    #[error("{}: missing {} tensor(s): {}", path.display(), keys.len(), abbreviate(keys))]
    MissingKeys {
        /// The file (or directory).
        path: PathBuf,
        /// The missing names.
        keys: Vec<String>,
    },
    /// A model directory holds no weights file.
    #[error("{}: no weights found (looked for {looked})", dir.display())]
    NoWeights {
        /// The directory.
        dir: PathBuf,
        /// The file names tried.
        looked: String,
    },
    /// The model config is invalid or for another architecture.
    #[error("{}: {source}", path.display())]
    Model {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: peft_models::ModelError,
    },
    /// The adapter config is invalid or does not fit the model.
    #[error("{}: {source}", path.display())]
    Peft {
        /// The adapter file or directory.
        path: PathBuf,
        /// Why.
        source: peft_core::PeftError,
    },
}

fn describe_kind(kind: &str) -> String {
    if kind == "directory" {
        "is a directory".to_string()
    } else {
        format!("is not a regular file ({kind})")
    }
}

fn abbreviate(keys: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = keys
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(", ... ({} more)", keys.len() - SHOWN));
    }
    s
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, IoError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> IoError {
    let path = path.into();
    move |source| IoError::Io { path, source }
}
