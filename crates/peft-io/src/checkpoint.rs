//! Training checkpoints besides the adapter itself: optimizer state (burn records, MessagePack)
//! and the trainer's JSON state, written atomically.

use std::path::Path;

use burn::record::{
    FullPrecisionSettings, NamedMpkBytesRecorder, NamedMpkFileRecorder, Record, Recorder,
};
use burn::tensor::backend::Backend;

use crate::error::{IoError, Result, io_err};

/// Saves a burn record (e.g. an optimizer's state) to `path` (`.mpk`), atomically.
pub fn save_record<B: Backend, R: Record<B>>(record: R, path: &Path) -> Result<()> {
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    let dir = path.parent().unwrap_or(Path::new("."));
    // The recorder replaces the extension with `.mpk`; a dot-file name has none to replace.
    let tmp = dir.join(format!(".record-{}", std::process::id()));
    let written = tmp.with_extension("mpk");
    let result = recorder
        .record(record, tmp.clone())
        .map_err(|e| IoError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("writing the optimizer state failed: {e}"),
        })
        .and_then(|()| std::fs::rename(&written, path).map_err(io_err(path)));
    if result.is_err() {
        // Never leave the temporary behind (a full disk stays full otherwise).
        let _ = std::fs::remove_file(&written);
    }
    result
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
