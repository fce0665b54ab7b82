//! Errors of the trainer: every failure names what it was working on.

use std::path::PathBuf;

/// Result alias.
pub type Result<T> = std::result::Result<T, TrainError>;

/// What can go wrong while training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file format error (model, adapter, tokenizer, checkpoint).
    #[error(transparent)]
    Io(#[from] peft_io::IoError),
    /// An adapter error (config, targeting, attaching).
    #[error(transparent)]
    Peft(#[from] peft_core::PeftError),
    /// A model error (config, architecture).
    #[error(transparent)]
    Model(#[from] peft_models::ModelError),
    /// A file of our own (metrics, the `latest` pointer, a data file) could not be read or
    /// written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A training data file is malformed.
    #[error("{path}:{line}: {message}")]
    Data {
        /// The file.
        path: PathBuf,
        /// 1-based line (or CSV row) number; 0 for the whole file.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// An argument is out of range.
    #[error("invalid training argument `{name}`: {message}")]
    InvalidArgument {
        /// The argument (HF `TrainingArguments` name).
        name: &'static str,
        /// Expected vs found.
        message: String,
    },
    /// The loss became NaN or infinite.
    #[error(
        "loss became {value} at step {step} (epoch {epoch}); nothing was saved for this step. \
         Lower the learning rate or check the data; the last checkpoint (if any) is in {dir}"
    )]
    NonFiniteLoss {
        /// The loss value.
        value: f64,
        /// Optimizer step.
        step: usize,
        /// Epoch (0-based).
        epoch: usize,
        /// The output directory.
        dir: PathBuf,
    },
    /// A checkpoint cannot be resumed from.
    #[error("cannot resume from {path}: {message}")]
    Resume {
        /// The checkpoint directory.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Another run holds the output directory.
    #[error(
        "{dir} is in use by {holder} (lock file .peft-train.lock); wait for it to finish or \
         choose another output directory"
    )]
    Locked {
        /// The output directory.
        dir: PathBuf,
        /// Who holds it.
        holder: String,
    },
    /// A data-parallel worker died, went silent or failed: the run stops on every worker.
    #[error(
        "data-parallel worker rank {rank} {reason}; the run stopped (resume from the last \
         checkpoint, with the same or another number of workers)"
    )]
    WorkerLost {
        /// The rank that was lost.
        rank: usize,
        /// What happened to it.
        reason: String,
    },
    /// The collective layer (registration, an all-reduce) failed or timed out.
    #[error("data-parallel collective: {0}")]
    Collective(String),
    /// Not supported by this trainer.
    #[error("{0}")]
    Unsupported(String),
}

/// Maps an `std::io::Error` on `path` to [`TrainError::File`].
pub(crate) fn file_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::File { path, source }
}
