//! Data-parallel training through the real binary, on loopback.
//!
//! - `peft train --nproc 2 --batch-size 4` writes the adapter `--batch-size 8` in one process
//!   writes (to 1e-5 after several steps with accumulation and evaluation, dropout off), and the
//!   same holds for two workers started by hand with `--world-size 2 --rank R --coordinator`.
//! - A SIGKILLed worker (rank 1, then rank 0) stops the run with an error naming it; the run then
//!   resumes from the last checkpoint in one process and ends where an uninterrupted run ends.
//! - Workers started with different arguments, or with no rank 0, are refused with a clear error.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn data() -> PathBuf {
    root().join("examples/data/complaints")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-dp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The mt0-tiny preset as an HF model dir with dropout off (made once per test process), so that
/// runs are a function of the batches alone.
fn base() -> PathBuf {
    static BASE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let seed_run = tmp("seed-run");
        let out = Command::new(env!("CARGO_BIN_EXE_peft"))
            .args(["train", "--model", "mt0-tiny", "--tokenizer"])
            .arg(data().join("tokenizer.json"))
            .arg("--data")
            .arg(data().join("train.jsonl"))
            .arg("--output-dir")
            .arg(&seed_run)
            .args(["--max-steps", "1", "--quiet", "--show-examples", "0"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let base = tmp("base");
        std::fs::create_dir_all(&base).unwrap();
        for f in ["model.safetensors", "tokenizer.json"] {
            std::fs::copy(seed_run.join("base_model").join(f), base.join(f)).unwrap();
        }
        let mut config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(seed_run.join("base_model/config.json")).unwrap(),
        )
        .unwrap();
        config["dropout_rate"] = 0.0.into();
        std::fs::write(base.join("config.json"), config.to_string()).unwrap();
        std::fs::remove_dir_all(&seed_run).ok();
        base
    })
    .clone()
}

/// `peft train` on the base and the complaints data, without dropout, with `extra` flags.
fn train(out: &Path, extra: &[&str]) -> Command {
    train_on(&data().join("train.jsonl"), out, extra)
}

fn train_on(data_file: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peft"));
    c.args(["train", "--model"])
        .arg(base())
        .arg("--data")
        .arg(data_file)
        .arg("--output-dir")
        .arg(out)
        .args(["--seed", "7", "--lora-dropout", "0", "--quiet"])
        .args(["--show-examples", "0"])
        .args(extra);
    c
}

fn run(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed:\n{}",
        c,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn adapter(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            let f = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (k, f)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Largest |a - b| over two adapters with the same keys; NaN or Inf anywhere fails.
fn max_diff(a: &Path, b: &Path) -> f32 {
    let (a, b) = (adapter(a), adapter(b));
    assert_eq!(
        a.iter().map(|t| &t.0).collect::<Vec<_>>(),
        b.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    let mut worst = 0.0f32;
    for ((k, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x.len(), y.len(), "{k}");
        for (p, q) in x.iter().zip(y) {
            assert!(p.is_finite() && q.is_finite(), "{k}: {p} vs {q}");
            let d = (p - q).abs();
            if d > worst {
                worst = d;
            }
        }
    }
    worst
}

/// The training losses of metrics.jsonl, by step.
fn losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()?, v["loss"].as_f64()?))
        })
        .collect()
}

fn eval_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["eval_loss"].as_f64())
        .collect()
}

const ONE: &[&str] = &["--batch-size", "8"];
const TWO: &[&str] = &["--batch-size", "4", "--nproc", "2"];

#[test]
fn two_workers_write_the_adapter_one_process_writes() {
    // 61 examples: the last global batch of each epoch is uneven (5 rows: 4 + 1), and with
    // accumulation of 2 the step mixes a full and a partial micro-batch.
    let small = tmp("small-data");
    std::fs::create_dir_all(&small).unwrap();
    let lines: Vec<String> = std::fs::read_to_string(data().join("train.jsonl"))
        .unwrap()
        .lines()
        .take(61)
        .map(str::to_string)
        .collect();
    std::fs::write(small.join("train.jsonl"), lines.join("\n")).unwrap();
    std::fs::write(small.join("eval.jsonl"), lines[..13].join("\n")).unwrap();
    let common = |out: &Path, extra: &[&str]| {
        let mut c = train_on(&small.join("train.jsonl"), out, extra);
        c.arg("--eval-data").arg(small.join("eval.jsonl")).args([
            "--epochs",
            "2",
            "--gradient-accumulation-steps",
            "2",
        ]);
        c
    };
    let (one, two) = (tmp("one"), tmp("two"));
    run(common(&one, ONE));
    let out = run(common(&two, TWO));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Rank 0 alone speaks: one parameter line, one line per evaluation.
    assert_eq!(stdout.matches("trainable params").count(), 1, "{stdout}");
    assert_eq!(stdout.matches("eval loss").count(), 2, "{stdout}");

    let d = max_diff(&one, &two);
    eprintln!("--nproc 2: adapters differ by {d}");
    assert!(d < 1e-5, "adapters differ by {d}");
    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 8, "{l1:?}"); // 61 / 8 = 8 micro-batches = 4 steps per epoch
    assert_eq!(l1.len(), l2.len());
    for ((s1, a), (s2, b)) in l1.iter().zip(&l2) {
        assert_eq!(s1, s2);
        assert!((a - b).abs() < 1e-5, "step {s1}: loss {a} vs {b}");
    }
    let (e1, e2) = (eval_losses(&one), eval_losses(&two));
    assert_eq!(e1.len(), 2);
    assert_eq!(e1.len(), e2.len());
    for (a, b) in e1.iter().zip(&e2) {
        assert!((a - b).abs() < 1e-5, "eval loss {a} vs {b}");
    }
    // The run's metrics say what the reduce moved and cost.
    let row: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(two.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(row["world_size"], 2);
    assert!(row["reduce_payload_bytes"].as_u64().unwrap() > 24_576 * 4);
    assert!(row["reduce_s"].as_f64().unwrap() >= 0.0);
    for d in [&one, &two, &small] {
        std::fs::remove_dir_all(d).ok();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn workers_started_by_hand_on_loopback_meet_at_the_coordinator() {
    let (one, two) = (tmp("hand-one"), tmp("hand-two"));
    let steps = ["--max-steps", "5"];
    run(train(&one, &[ONE, &steps].concat()));
    let coordinator = format!("127.0.0.1:{}", free_port());
    // Rank 1 first: it waits for rank 0.
    let spawn = |rank: &str| {
        train(&two, &["--batch-size", "4"])
            .args(steps)
            .args([
                "--world-size",
                "2",
                "--rank",
                rank,
                "--coordinator",
                &coordinator,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let r1 = spawn("1");
    std::thread::sleep(Duration::from_millis(500));
    let r0 = spawn("0");
    let (o0, o1) = (
        r0.wait_with_output().unwrap(),
        r1.wait_with_output().unwrap(),
    );
    assert!(
        o0.status.success(),
        "{}",
        String::from_utf8_lossy(&o0.stderr)
    );
    assert!(
        o1.status.success(),
        "{}",
        String::from_utf8_lossy(&o1.stderr)
    );
    assert!(o1.stdout.is_empty(), "rank 1 printed to stdout");
    let d = max_diff(&one, &two);
    eprintln!("by hand: adapters differ by {d}");
    assert!(d < 1e-5, "adapters differ by {d}");
    for d in [&one, &two] {
        std::fs::remove_dir_all(d).ok();
    }
}

/// The pid of the launcher's child with `--rank R`.
fn worker_pid(launcher: u32, rank: usize) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid != Some(launcher) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args
            .windows(2)
            .any(|w| w[0] == b"--rank" && w[1] == rank.to_string().as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

/// Sends `signal` (`-9`, `-INT`) to the launcher's worker of rank `rank`; returns its pid.
fn signal_worker(launcher: &Child, rank: usize, signal: &str) -> u32 {
    let pid = worker_pid(launcher.id(), rank).expect("worker pid");
    assert!(
        Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    pid
}

/// `peft train --nproc 2` into `out`, its stderr captured.
fn launch_two(out: &Path, steps: &[&str]) -> Child {
    train(out, &[TWO, steps].concat())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for(path: &Path, limit: Duration) {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < limit, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn finish(mut child: Child, limit: Duration) -> Output {
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("the run did not stop within {limit:?} of the kill");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_killed_worker_stops_the_run_which_resumes_in_one_process() {
    let steps = ["--max-steps", "14", "--save-steps", "1"];
    let reference = tmp("kill-ref");
    run(train(&reference, &[ONE, &steps].concat()));
    for victim in [1usize, 0] {
        let out = tmp(&format!("kill-{victim}"));
        let launcher = launch_two(&out, &steps);
        wait_for(&out.join("checkpoint-3"), Duration::from_secs(120));
        let started = Instant::now();
        let pid = signal_worker(&launcher, victim, "-9");
        let o = finish(launcher, Duration::from_secs(60));
        let stopped_in = started.elapsed();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!(
                "worker rank {victim} (pid {pid}) was killed by signal 9"
            )),
            "{err}"
        );
        // The survivor names the lost rank itself (it does not wait for a timeout).
        assert!(
            err.contains(&format!("data-parallel worker rank {victim} ")),
            "{err}"
        );
        assert!(stopped_in < Duration::from_secs(30), "{stopped_in:?}");
        assert!(!err.contains("panicked"), "{err}");
        // Resume in one process with the same global batch: the run ends where an uninterrupted
        // one does.
        let resumed = run(train(
            &out,
            &[ONE, &steps, &["--resume", "latest"]].concat(),
        ));
        let rerr = String::from_utf8_lossy(&resumed.stderr);
        assert!(rerr.contains("resumed from"), "{rerr}");
        let d = max_diff(&reference, &out);
        eprintln!("victim {victim}: adapters differ by {d}");
        assert!(d < 1e-5, "victim {victim}: adapters differ by {d}");
        std::fs::remove_dir_all(&out).ok();
    }
    std::fs::remove_dir_all(&reference).ok();
}

#[test]
fn workers_with_different_arguments_or_no_rank_0_are_refused() {
    let out = tmp("mismatch");
    let coordinator = format!("127.0.0.1:{}", free_port());
    let spawn = |rank: &str, weight_decay: &str| {
        train(&out, &["--batch-size", "4", "--max-steps", "2"])
            .args(["--weight-decay", weight_decay])
            .args([
                "--world-size",
                "2",
                "--rank",
                rank,
                "--coordinator",
                &coordinator,
            ])
            .args(["--collective-timeout", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let r0 = spawn("0", "0");
    let r1 = spawn("1", "0.01");
    let (o0, o1) = (
        finish(r0, Duration::from_secs(120)),
        finish(r1, Duration::from_secs(120)),
    );
    let (e0, e1) = (
        String::from_utf8_lossy(&o0.stderr),
        String::from_utf8_lossy(&o1.stderr),
    );
    assert_eq!(o0.status.code(), Some(1), "{e0}");
    assert_eq!(o1.status.code(), Some(1), "{e1}");
    // Both see that the workers' arguments differ.
    for (rank, e) in [&e0, &e1].into_iter().enumerate() {
        assert!(
            e.contains(&format!(
                "rank {rank}'s training arguments, resume step or data differ from another worker's"
            )),
            "{e}"
        );
    }
    assert!(!out.join("adapter_model.safetensors").exists());

    // A worker whose rank 0 never comes gives up after --collective-timeout, saying so.
    let t = Instant::now();
    let o = train(&out, &["--batch-size", "4", "--max-steps", "2"])
        .args(["--world-size", "2", "--rank", "1"])
        .args(["--coordinator", &format!("127.0.0.1:{}", free_port())])
        .args(["--collective-timeout", "2"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("could not reach rank 0"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30));

    // Flags that cannot describe a group are named.
    let o = train(
        &out,
        &["--world-size", "2", "--rank", "2", "--coordinator", "x:1"],
    )
    .output()
    .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("--rank must be below --world-size 2"), "{e}");
    std::fs::remove_dir_all(&out).ok();
}

mod common;

#[test]
fn seq_cls_on_real_minilm_two_workers_train_lora_and_the_head_as_one_process() {
    // all-MiniLM-L6-v2 with its dropout off (weights copied: peft-io opens regular files only).
    let src = common::minilm_dir();
    let model = tmp("minilm");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    config["hidden_dropout_prob"] = 0.0.into();
    config["attention_probs_dropout_prob"] = 0.0.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let cls = |out: &Path, extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_peft"));
        c.args(["train", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(data().join("train.jsonl"))
            .arg("--output-dir")
            .arg(out)
            .args(["--task-type", "SEQ_CLS", "--max-steps", "6", "--seed", "7"])
            .args(["--lora-dropout", "0", "--max-source-length", "32"])
            .args(["--quiet", "--show-examples", "0", "--learning-rate", "2e-3"])
            .args(extra);
        c
    };
    let (one, two) = (tmp("cls-one"), tmp("cls-two"));
    run(cls(&one, ONE));
    run(cls(&two, TWO));
    // LoRA on query/value and the classifier (`modules_to_save`) both travel in the reduce.
    let keys: Vec<String> = adapter(&two).into_iter().map(|t| t.0).collect();
    assert!(keys.iter().any(|k| k.contains("classifier")), "{keys:?}");
    let d = max_diff(&one, &two);
    eprintln!("SEQ_CLS --nproc 2: adapters differ by {d}");
    assert!(d < 1e-5, "adapters differ by {d}");
    for d in [&one, &two, &model] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn ctrl_c_on_one_worker_stops_every_worker_after_the_same_step_and_the_run_resumes() {
    let steps = ["--max-steps", "40"];
    let reference = tmp("int-ref");
    run(train(&reference, &[ONE, &steps].concat()));
    let out = tmp("int");
    let launcher = launch_two(&out, &steps);
    // Wait for a few steps, then interrupt rank 1 alone (as a terminal's Ctrl-C would reach it).
    let metrics = out.join("metrics.jsonl");
    let t = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(t.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal_worker(&launcher, 1, "-INT");
    let o = finish(launcher, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    // Rank 0 saved the step both stopped at: the checkpoint is the last logged step.
    let latest = std::fs::read_to_string(out.join("latest")).unwrap();
    let last = losses(&out).last().unwrap().0;
    assert!(last < 40, "stopped early: {last}");
    assert_eq!(latest.trim(), format!("checkpoint-{last}"));
    assert!(!out.join("adapter_model.safetensors").exists());
    run(train(
        &out,
        &[TWO, &steps, &["--resume", "latest"]].concat(),
    ));
    let d = max_diff(&reference, &out);
    eprintln!("interrupted and resumed: adapters differ by {d}");
    assert!(d < 1e-5, "adapters differ by {d}");
    for d in [&reference, &out] {
        std::fs::remove_dir_all(d).ok();
    }
}
