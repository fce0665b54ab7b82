//! `peft train --nproc N`: starts N data-parallel workers of this same binary on this machine,
//! as `--world-size N --rank R --coordinator 127.0.0.1:PORT --local-rank R`, and watches them.
//!
//! Rank 0 keeps the terminal's stdout (progress, the parameter line, the summary); the others
//! print only their errors. When a worker fails or dies, the others learn it from rank 0's
//! rendezvous and stop with an error naming it; this launcher then reports the first failure
//! (the rank, its pid, its exit status or signal), stops any worker still running after a grace
//! period, and exits 1. A Ctrl-C reaches every worker (one process group): they agree through
//! the gradient all-reduce to stop after the same step, and rank 0 saves a checkpoint.

use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long the other workers get to stop by themselves after one failed.
const GRACE: Duration = Duration::from_secs(30);

/// The command line of `peft` without `--nproc N` / `--nproc=N`.
fn without_nproc(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        match a.to_str() {
            Some("--nproc") => skip = true,
            Some(s) if s.starts_with("--nproc=") => {}
            _ => out.push(a),
        }
    }
    out
}

/// A free port on the loopback for rank 0's rendezvous.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port for the coordinator")?
        .port())
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = match sig {
                9 => " (SIGKILL)",
                15 => " (SIGTERM)",
                6 => " (SIGABRT)",
                11 => " (SIGSEGV)",
                2 => " (SIGINT)",
                _ => "",
            };
            return format!("was killed by signal {sig}{name}");
        }
    }
    match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => "ended".into(),
    }
}

/// Runs `nproc` workers of the current command line and returns the exit code for `peft`:
/// 0 when all finished, 130 when they stopped on Ctrl-C, 1 when one failed.
pub fn run(nproc: usize, has_local_rank: bool) -> Result<i32> {
    if nproc == 0 {
        bail!("--nproc must be at least 1, found 0");
    }
    let exe = std::env::current_exe().context("locating the peft binary")?;
    let base = without_nproc(std::env::args_os().skip(1));
    let port = free_port()?;
    let coordinator = format!("127.0.0.1:{port}");
    let mut children: Vec<(usize, Child)> = Vec::new();
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(&base)
            .arg("--world-size")
            .arg(nproc.to_string())
            .arg("--rank")
            .arg(rank.to_string())
            .arg("--coordinator")
            .arg(&coordinator);
        if !has_local_rank {
            cmd.arg("--local-rank").arg(rank.to_string());
        }
        if rank != 0 {
            cmd.stdout(Stdio::null());
        }
        match cmd.spawn() {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                for (_, c) in &mut children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                bail!("starting worker rank {rank} ({}): {e}", exe.display());
            }
        }
    }

    // Failures in the order seen; the one reported is the first death by a signal (the others
    // then failed because they lost it), else the first failure.
    let mut failures: Vec<(usize, u32, ExitStatus)> = Vec::new();
    let mut interrupted = false;
    let mut failed_at: Option<Instant> = None;
    let mut running: Vec<(usize, Child)> = children;
    while !running.is_empty() {
        let mut still = Vec::new();
        for (rank, mut child) in running {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => {}
                Ok(Some(status)) => {
                    if status.code() == Some(130) {
                        interrupted = true;
                    } else {
                        failures.push((rank, child.id(), status));
                        failed_at.get_or_insert_with(Instant::now);
                    }
                }
                Ok(None) => still.push((rank, child)),
                Err(e) => {
                    eprintln!("error: waiting for worker rank {rank}: {e}");
                    let _ = child.kill();
                }
            }
        }
        running = still;
        if let Some(t) = failed_at
            && t.elapsed() > GRACE
        {
            for (rank, c) in &mut running {
                eprintln!(
                    "worker rank {rank} (pid {}) did not stop within {} s of the failure: killed",
                    c.id(),
                    GRACE.as_secs()
                );
                let _ = c.kill();
                let _ = c.wait();
            }
            running.clear();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let signalled = |s: &ExitStatus| s.code().is_none();
    let root = failures
        .iter()
        .find(|f| signalled(&f.2))
        .or(failures.first())
        .copied();
    if let Some((rank, pid, status)) = root {
        eprintln!(
            "error: worker rank {rank} (pid {pid}) {}; the data-parallel run stopped. Resume with \
             --resume latest, with any --nproc (keep --nproc x --batch-size to repeat the same \
             global batches)",
            describe(status)
        );
        return Ok(1);
    }
    Ok(if interrupted { 130 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nproc_is_removed_in_both_spellings() {
        let args = [
            "train",
            "--nproc",
            "2",
            "--data",
            "d",
            "--nproc=3",
            "--quiet",
        ]
        .map(OsString::from);
        let out = without_nproc(args.into_iter());
        assert_eq!(out, ["train", "--data", "d", "--quiet"].map(OsString::from));
    }
}
