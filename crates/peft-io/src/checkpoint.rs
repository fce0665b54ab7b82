//! Training checkpoints besides the adapter itself: optimizer state (burn records, MessagePack)
//! and the trainer's JSON state, written atomically.

use std::path::Path;

use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Record, Recorder};
use burn::tensor::backend::Backend;

use crate::error::{IoError, Result};

/// Saves a burn record (e.g. an optimizer's state) to `path` (`.mpk`), atomically.
///
/// The record is serialised in memory first and written with [`write_atomic`], so a failed
/// write (a full disk, a file size limit) is reported as the I/O error it is, naming `path`, and
/// leaves no temporary behind.
///
/// [`write_atomic`]: crate::tensors::write_atomic
pub fn save_record<B: Backend, R: Record<B>>(record: R, path: &Path) -> Result<()> {
    let bytes = NamedMpkBytesRecorder::<FullPrecisionSettings>::new()
        .record(record, ())
        .map_err(|e| IoError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("serialising the optimizer state failed: {e}"),
        })?;
    crate::tensors::write_atomic(path, &bytes)
}

/// Loads a burn record saved by [`save_record`] (read from `path` with its extension set to
/// `.mpk`, as burn's file recorder does). Only a regular file is read; optimizer state has no
/// size limit.
pub fn load_record<B: Backend, R: Record<B>>(path: &Path, device: &B::Device) -> Result<R> {
    let path = path.with_extension("mpk");
    let bytes = crate::files::read_limited(&path, u64::MAX, "a record")?;
    NamedMpkBytesRecorder::<FullPrecisionSettings>::new()
        .load(bytes, device)
        .map_err(|e| IoError::Checkpoint {
            path: path.clone(),
            reason: e.to_string(),
        })
}
