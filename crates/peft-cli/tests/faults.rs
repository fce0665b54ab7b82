//! Fault injection: `peft train` is SIGKILLed at random moments, half of them while a checkpoint
//! is being written, and resumed with `--resume latest` each time. After every kill the output
//! directory is consistent (every visible `checkpoint-N/` is complete, `latest` names one), and the
//! final adapter is bit for bit the one an uninterrupted run writes.
//!
//! The kill schedule comes from a seeded generator; `PEFT_FAULT_SEED` picks another schedule,
//! `PEFT_FAULT_KILLS` another number of kills.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const STEPS: &str = "24";

fn train(out: &Path, resume: bool) -> Command {
    train_steps(out, resume, STEPS)
}

fn train_steps(out: &Path, resume: bool, steps: &str) -> Command {
    let data = root().join("examples/data/complaints");
    let mut c = Command::new(env!("CARGO_BIN_EXE_peft"));
    c.args(["train", "--model", "mt0-tiny", "--tokenizer"])
        .arg(data.join("tokenizer.json"))
        .arg("--data")
        .arg(data.join("train.jsonl"))
        .arg("--output-dir")
        .arg(out)
        .args(["--max-steps", steps, "--save-steps", "1", "--seed", "7"])
        // Dropout and accumulation make the run depend on the RNG and on partial state.
        .args([
            "--lora-dropout",
            "0.1",
            "--gradient-accumulation-steps",
            "2",
        ])
        .args(["--batch-size", "4", "--quiet", "--show-examples", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        c.args(["--resume", "latest"]);
    }
    c
}

/// xorshift64*: a reproducible schedule without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn complete_checkpoints(out: &Path) -> Vec<String> {
    names(out)
        .into_iter()
        .filter(|n| n.starts_with("checkpoint-"))
        .collect()
}

/// A temporary of a checkpoint being written (`.checkpoint-N.tmp-PID`) or of a file being
/// replaced (`.latest.tmp-PID`, `.metrics.jsonl.tmp-PID`).
fn writing(out: &Path, pid: u32) -> bool {
    let own = format!(".tmp-{pid}");
    names(out)
        .iter()
        .any(|n| n.starts_with('.') && n.ends_with(&own))
}

/// What must hold after any kill: a visible checkpoint is complete, `latest` is absent or names
/// a visible checkpoint.
fn assert_consistent(out: &Path, when: &str) {
    for c in complete_checkpoints(out) {
        let files = names(&out.join(&c));
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.mpk",
            "trainer_state.json",
        ] {
            assert!(
                files.iter().any(|x| x == f),
                "{when}: {c} is visible without {f}: {files:?}"
            );
        }
    }
    if let Ok(latest) = std::fs::read_to_string(out.join("latest")) {
        assert!(
            out.join(latest.trim()).join("trainer_state.json").is_file(),
            "{when}: latest is {latest:?}, not a complete checkpoint"
        );
    }
}

fn kill(mut child: Child) -> bool {
    // Child::kill is SIGKILL on Unix. An already finished child is not killed.
    let finished = child.try_wait().unwrap().is_some();
    if !finished {
        child.kill().unwrap();
    }
    let status = child.wait().unwrap();
    if finished {
        assert!(status.success(), "the run failed on its own: {status}");
    }
    !finished
}

#[test]
fn sigkill_at_random_moments_then_resume_gives_the_uninterrupted_adapter_bit_for_bit() {
    let base = std::env::temp_dir().join(format!("peft-faults-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let reference = base.join("reference");
    let out = base.join("killed");

    let t0 = Instant::now();
    let r = train(&reference, false).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let run_time = t0.elapsed();

    let seed = std::env::var("PEFT_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f00d_u64);
    let wanted: usize = std::env::var("PEFT_FAULT_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let mut rng = Rng(seed | 1);
    let (mut kills, mut in_checkpoint) = (0usize, 0usize);
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts < 200, "no progress after {attempts} attempts");
        let resume = !complete_checkpoints(&out).is_empty();
        let mut child = train(&out, resume).spawn().unwrap();
        let pid = child.id();
        if kills >= wanted && in_checkpoint >= 1 {
            let o = child.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "the final resume failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            break;
        }
        // Every other kill aims at a write, and all of them once enough kills have landed
        // but none inside a write yet.
        let at_checkpoint = kills % 2 == 1 || kills >= wanted;
        let start = Instant::now();
        // Half the kills land while a checkpoint (or `latest`, or the metrics) is being
        // written; the others at a random moment of the run.
        // A fifth of an uninterrupted run at most, so that most attempts are killed.
        let deadline = Duration::from_millis(rng.below(run_time.as_millis() as u64 / 5 + 1));
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if at_checkpoint {
                if writing(&out, pid) {
                    // Inside the write: at once (on a fast disk a checkpoint takes well under a
                    // millisecond), or every other time up to 200 microseconds on.
                    if rng.below(2) == 1 {
                        std::thread::sleep(Duration::from_micros(rng.below(200)));
                    }
                    break;
                }
                std::thread::sleep(Duration::from_micros(50));
            } else {
                if start.elapsed() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "a run did not end"
            );
        }
        let killed = kill(child);
        // The killed run's temporary is still there: the kill landed inside a write.
        let inside = writing(&out, pid);
        if !killed {
            // It finished first: fewer kills than asked, but never fewer than half.
            assert!(
                kills >= wanted / 2,
                "only {kills} kills before the run finished"
            );
            break;
        }
        kills += 1;
        in_checkpoint += inside as usize;
        eprintln!(
            "kill {kills}: resume {resume}, aimed at a write {at_checkpoint}, inside a write {inside}"
        );
        assert_consistent(&out, &format!("after kill {kills}"));
    }
    assert!(
        in_checkpoint >= 1,
        "no kill landed inside a write ({kills} kills)"
    );

    let a = std::fs::read(reference.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the adapter after {kills} kills ({in_checkpoint} inside a write) differs from the uninterrupted run's"
    );
    // The configs differ only in the base's path (each run saved its preset base in its own
    // output directory).
    let config = |d: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("adapter_config.json")).unwrap()).unwrap();
        let base = v["base_model_name_or_path"].take();
        assert_eq!(
            base.as_str().unwrap(),
            d.join("base_model").display().to_string()
        );
        v
    };
    assert_eq!(config(&reference), config(&out));
    // Nothing left behind, and the metrics log is one clean run: steps 1..=STEPS, once each.
    let mut dirs = vec![out.clone()];
    dirs.extend(complete_checkpoints(&out).iter().map(|c| out.join(c)));
    for d in dirs {
        for n in names(&d) {
            assert!(
                !(n.starts_with('.') && (n.contains(".tmp-") || n.starts_with(".record-"))),
                "temporary {n} left in {}",
                d.display()
            );
        }
    }
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad metrics row {l:?}: {e}"));
            v["step"].as_u64().unwrap()
        })
        .collect();
    let want: Vec<u64> = (1..=STEPS.parse().unwrap()).collect();
    assert_eq!(steps, want, "metrics.jsonl steps");
    std::fs::remove_dir_all(&base).ok();
}

/// Killed after its last checkpoint but before (or during) its final save, a run has no adapter
/// in the output directory: `--resume latest` writes the final checkpoint's, and leaves a
/// complete adapter alone.
#[test]
fn resume_after_the_last_checkpoint_finishes_the_final_save() {
    let out = std::env::temp_dir().join(format!("peft-faults-final-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let r = train_steps(&out, false, "2").output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let adapter = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        adapter,
        std::fs::read(out.join("checkpoint-2/adapter_model.safetensors")).unwrap()
    );
    for f in ["adapter_model.safetensors", "tokenizer.json"] {
        std::fs::remove_file(out.join(f)).unwrap();
    }
    let mut c = train_steps(&out, true, "2");
    c.stdout(Stdio::piped());
    let r = c.output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        adapter
    );
    assert!(out.join("tokenizer.json").is_file());
    // With the adapter there, the same resume trains nothing and touches nothing.
    let before = std::fs::metadata(out.join("adapter_model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let mut c = train_steps(&out, true, "2");
    c.stdout(Stdio::piped());
    let r = c.output().unwrap();
    assert!(String::from_utf8_lossy(&r.stdout).contains("nothing to train"));
    let after = std::fs::metadata(out.join("adapter_model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
    std::fs::remove_dir_all(&out).ok();
}

/// A write that fails half way (here a file size limit, `ulimit -f`; a full disk takes the same
/// path) ends the run with exit 1 and the operating system's reason, naming the file, and leaves
/// no temporary and no incomplete checkpoint behind.
#[test]
fn a_failed_checkpoint_write_is_reported_and_cleaned_up() {
    // 64 KiB stops the adapter's write; 700 KiB lets the adapter (512 KiB) through and stops the
    // optimizer state's (1 MiB), which burn would report as a MessagePack error.
    for (limit_kib, fails_on) in [(64, "adapter_model.safetensors"), (700, "optimizer.mpk")] {
        let out = std::env::temp_dir().join(format!(
            "peft-faults-fsize-{limit_kib}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let model = root().join("tests/fixtures/t5/mt5");
        let data = root().join("examples/data/complaints/train.jsonl");
        let cmd = format!(
            "trap '' XFSZ; ulimit -f {limit_kib}; exec '{}' train --model '{}' --data '{}' \
             --output-dir '{}' --max-steps 3 --save-steps 1 --quiet --show-examples 0 \
             --lora-r 64 --target-modules q,k,v,o",
            env!("CARGO_BIN_EXE_peft"),
            model.display(),
            data.display(),
            out.display()
        );
        let r = Command::new("bash").arg("-c").arg(&cmd).output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{err}");
        assert!(err.contains("File too large"), "{err}");
        assert!(err.contains(fails_on), "{err}");
        assert!(err.contains(&out.display().to_string()), "{err}");
        assert!(
            !err.contains("panicked") && !err.contains("MessagePack"),
            "{err}"
        );
        let left: Vec<String> = names(&out)
            .into_iter()
            .filter(|n| n.starts_with('.') && n != ".peft-train.lock")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        assert!(complete_checkpoints(&out).is_empty(), "{:?}", names(&out));
        std::fs::remove_dir_all(&out).ok();
    }
}
