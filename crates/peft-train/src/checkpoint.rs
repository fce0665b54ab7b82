//! The output directory: its lock, checkpoints (`checkpoint-N/`: the adapter, `optimizer.mpk`,
//! `trainer_state.json`), the `latest` pointer, and `metrics.jsonl`.
//!
//! A checkpoint is written into a temporary directory and renamed into place, so a
//! `checkpoint-N/` that exists is complete; `latest` is replaced atomically (temporary file,
//! rename, directory sync). Temporaries left by a killed run are removed by the next run.

use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::tensor::backend::AutodiffBackend;
use peft_core::{AdapterHost, PeftModel};
use serde::{Deserialize, Serialize};

use crate::data::read_small;
use crate::error::{Result, TrainError, file_err};

/// The metrics log in the output directory.
pub const METRICS: &str = "metrics.jsonl";
/// The pointer to the newest checkpoint.
pub const LATEST: &str = "latest";
/// The lock file.
pub const LOCK: &str = ".peft-train.lock";
const STATE: &str = "trainer_state.json";

/// `trainer_state.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: usize,
    /// The epoch the step was in (0-based).
    pub epoch: usize,
    /// The run's seed.
    pub seed: u64,
    /// Steps the run was set to take.
    pub total_steps: usize,
}

/// An exclusive lock on an output directory, held while a run writes into it (an OS file
/// lock: a killed run's lock goes away with its process, so a stale lock never blocks).
#[derive(Debug)]
pub struct OutputDirLock {
    _file: File,
    dir: PathBuf,
}

impl OutputDirLock {
    /// Locks `dir`, or fails naming the process that holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        use std::io::{Seek, Write};
        let path = dir.join(LOCK);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(file_err(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                return Err(TrainError::Locked {
                    dir: dir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "another process".into()
                    } else {
                        format!("process {holder}")
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(file_err(&path)(e)),
        }
        file.set_len(0).map_err(file_err(&path))?;
        file.rewind().map_err(file_err(&path))?;
        write!(file, "{}", std::process::id()).map_err(file_err(&path))?;
        Ok(OutputDirLock {
            _file: file,
            dir: dir.to_path_buf(),
        })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Whether `name` is a temporary this crate or peft-io writes (`.x.tmp-PID`, `.record-PID.mpk`,
/// `.checkpoint-N.tmp-PID`).
fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && (name.contains(".tmp-") || name.starts_with(".record-"))
}

/// Removes the temporaries of earlier runs in `dir` and its checkpoints (the caller holds the
/// lock, so no live writer owns them). Returns what was removed.
pub fn remove_stale_temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let scan = |d: &Path, removed: &mut Vec<PathBuf>| {
        let Ok(entries) = std::fs::read_dir(d) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_temporary(&name) {
                continue;
            }
            let p = e.path();
            let ok = if p.is_dir() {
                std::fs::remove_dir_all(&p).is_ok()
            } else {
                std::fs::remove_file(&p).is_ok()
            };
            if ok {
                removed.push(p);
            }
        }
    };
    scan(dir, &mut removed);
    for c in checkpoints(dir) {
        scan(&c.1, &mut removed);
    }
    removed
}

/// The complete checkpoints in `dir`, oldest first: `(step, path)`.
pub fn checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            let p = e.path();
            p.join(STATE).is_file().then_some((step, p))
        })
        .collect();
    out.sort();
    out
}

/// The checkpoint `resume` names: a directory, or `latest` in `out`. When `latest` is missing,
/// empty or points at no complete checkpoint, the newest complete checkpoint is used and the
/// reason returned.
pub fn resolve(out: &Path, resume: &str) -> Result<(PathBuf, Option<String>)> {
    if resume != LATEST {
        // A path, or a checkpoint name inside the output directory.
        let dir = match PathBuf::from(resume) {
            d if !d.exists() && out.join(resume).exists() => out.join(resume),
            d => d,
        };
        if !dir.join(STATE).is_file() {
            return Err(TrainError::Resume {
                path: dir,
                message: format!("no {STATE}: not a complete checkpoint"),
            });
        }
        return Ok((dir, None));
    }
    let pointer = out.join(LATEST);
    let reason = match std::fs::read_to_string(&pointer) {
        Ok(name) if name.trim().is_empty() => format!("{} is empty", pointer.display()),
        Ok(name) => {
            let dir = out.join(name.trim());
            if dir.join(STATE).is_file() {
                return Ok((dir, None));
            }
            format!(
                "{} names {}, which is not a complete checkpoint",
                pointer.display(),
                name.trim()
            )
        }
        Err(e) => format!("{}: {e}", pointer.display()),
    };
    match checkpoints(out).pop() {
        Some((_, dir)) => Ok((dir, Some(reason))),
        None => Err(TrainError::Resume {
            path: out.to_path_buf(),
            message: format!("{reason}, and there is no checkpoint-N/ with a {STATE}"),
        }),
    }
}

/// Copies the adapter files of the final checkpoint `ckpt` into `out` when any of them is
/// missing there (the run was killed between its last checkpoint and its final save). Returns
/// whether it copied; an output directory that has all of them is left alone.
pub fn complete_final_save(ckpt: &Path, out: &Path) -> Result<bool> {
    let files: Vec<PathBuf> = std::fs::read_dir(ckpt)
        .map_err(file_err(ckpt))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            p.is_file() && !name.starts_with('.') && name != STATE && name != "optimizer.mpk"
        })
        .collect();
    let missing = files
        .iter()
        .any(|f| f.file_name().is_some_and(|n| !out.join(n).exists()));
    if !missing {
        return Ok(false);
    }
    for f in &files {
        let name = f.file_name().expect("a file name");
        let bytes = std::fs::read(f).map_err(file_err(f))?;
        peft_io::tensors::write_atomic(&out.join(name), &bytes)?;
    }
    sync_dir(out);
    Ok(true)
}

/// Reads a checkpoint's `trainer_state.json`.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE);
    let text = read_small(&path)?;
    serde_json::from_str(&text).map_err(|e| TrainError::Resume {
        path: dir.to_path_buf(),
        message: format!("{STATE}: {e}"),
    })
}

/// Keeps the rows of `metrics.jsonl` up to `step` (all rows are dropped for a fresh run, step
/// 0), so that a resumed run does not keep the killed run's rows past its checkpoint and a new
/// run does not append to an old one's log.
pub fn truncate_metrics(out: &Path, step: usize) -> Result<()> {
    let path = out.join(METRICS);
    let kept = if step == 0 {
        String::new()
    } else {
        match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(file_err(&path)(e)),
        }
    };
    peft_io::tensors::write_atomic(&path, kept.as_bytes())?;
    Ok(())
}

/// Writes `checkpoint-<step>/` (adapter, optimizer state, trainer state) into a temporary
/// directory, renames it into place, then points `latest` at it. On error the temporary is
/// removed and `latest` is unchanged.
pub fn save<B, M, O>(
    peft: &PeftModel<B, M>,
    optim: &O,
    out: &Path,
    state: &TrainerState,
) -> Result<PathBuf>
where
    B: AutodiffBackend,
    M: AdapterHost<B> + AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    let name = format!("checkpoint-{}", state.global_step);
    let dir = out.join(&name);
    let tmp = out.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> Result<()> {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(file_err(&tmp))?;
        }
        peft_io::save_pretrained(peft, &tmp)?;
        peft_io::checkpoint::save_record::<B, _>(optim.to_record(), &tmp.join("optimizer.mpk"))?;
        let json = serde_json::to_string_pretty(state).expect("state serialises");
        peft_io::tensors::write_atomic(&tmp.join(STATE), json.as_bytes())?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(file_err(&dir))?;
        }
        std::fs::rename(&tmp, &dir).map_err(file_err(&dir))?;
        peft_io::tensors::write_atomic(&out.join(LATEST), name.as_bytes())?;
        sync_dir(out);
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&tmp);
    })?;
    Ok(dir)
}

/// Flushes a directory's entries (renames) to disk, where the platform allows.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("peft-train-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn second_lock_is_refused_naming_the_holder_and_released_on_drop() {
        let d = tmpdir("lock");
        let lock = OutputDirLock::acquire(&d).unwrap();
        let e = OutputDirLock::acquire(&d).unwrap_err().to_string();
        assert!(
            e.contains(&format!("process {}", std::process::id())),
            "{e}"
        );
        assert!(e.contains(&d.display().to_string()), "{e}");
        drop(lock);
        OutputDirLock::acquire(&d).unwrap();
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn latest_falls_back_to_the_newest_complete_checkpoint() {
        let d = tmpdir("latest");
        for (step, complete) in [(2, true), (4, true), (6, false)] {
            let c = d.join(format!("checkpoint-{step}"));
            std::fs::create_dir_all(&c).unwrap();
            if complete {
                std::fs::write(c.join(STATE), "{}").unwrap();
            }
        }
        std::fs::write(d.join(LATEST), "").unwrap();
        let (dir, why) = resolve(&d, LATEST).unwrap();
        assert!(dir.ends_with("checkpoint-4"), "{dir:?}");
        assert!(why.unwrap().contains("is empty"));
        std::fs::write(d.join(LATEST), "checkpoint-6").unwrap();
        let (dir, why) = resolve(&d, LATEST).unwrap();
        assert!(dir.ends_with("checkpoint-4"));
        assert!(why.unwrap().contains("not a complete checkpoint"));
        std::fs::write(d.join(LATEST), "checkpoint-2").unwrap();
        assert_eq!(resolve(&d, LATEST).unwrap(), (d.join("checkpoint-2"), None));
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn metrics_are_cut_at_the_checkpoint_and_temporaries_removed() {
        let d = tmpdir("metrics");
        std::fs::write(
            d.join(METRICS),
            "{\"step\":1}\n{\"step\":2}\n{\"step\":2,\"eval_loss\":1}\n{\"step\":3}\n",
        )
        .unwrap();
        truncate_metrics(&d, 2).unwrap();
        let kept = std::fs::read_to_string(d.join(METRICS)).unwrap();
        assert_eq!(kept.lines().count(), 3, "{kept}");
        truncate_metrics(&d, 0).unwrap();
        assert_eq!(std::fs::read_to_string(d.join(METRICS)).unwrap(), "");
        std::fs::create_dir_all(d.join(".checkpoint-3.tmp-999")).unwrap();
        std::fs::write(d.join(".adapter_model.safetensors.tmp-999"), "x").unwrap();
        std::fs::write(d.join("keep.txt"), "x").unwrap();
        let removed = remove_stale_temporaries(&d);
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(d.join("keep.txt").exists());
        std::fs::remove_dir_all(&d).ok();
    }
}
