//! `cargo xtask bench --workload lora-train-dp`: data-parallel LoRA training with 1 and 2
//! workers on this machine, the same global batch, interleaved over rounds.
//!
//! ```text
//! cargo xtask bench --workload lora-train-dp [--rounds 3] [--steps 12] [--warmup 2]
//!                   [--model-preset mt0-small] [--json]
//! ```
//!
//! Each run is `peft train` on the complaints data (seq2seq LoRA r=8 on q,v, dropout off so
//! both runs compute the same steps) from a preset with seeded random weights: one process with
//! `--batch-size 8`, then `--nproc 2 --batch-size 4` (16 for `--global-batch 16`). From rank 0's
//! `metrics.jsonl` (steps after the warmup) it takes the median tokens/s and the median seconds
//! spent in the gradient all-reduce (which includes waiting for the slower worker); the bytes
//! exchanged per step are measured on the loopback interface (`/sys/class/net/lo/statistics`,
//! both workers' traffic, heartbeats included) and compared with the ring's theory,
//! `2 (W - 1) / W x payload` per worker.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

pub struct DpOpts {
    pub rounds: usize,
    pub steps: usize,
    pub warmup: usize,
    pub preset: String,
    pub global_batch: usize,
    pub json: bool,
}

fn lo_bytes() -> Option<u64> {
    std::fs::read_to_string("/sys/class/net/lo/statistics/tx_bytes")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The median of the finite values (NaN when there are none).
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    crate::bench::median(v)
}

struct Run {
    tokens_per_s: f64,
    reduce_s: f64,
    payload_bytes: f64,
    lo_bytes_per_step: f64,
    wall_s: f64,
}

fn one_run(root: &Path, peft: &Path, o: &DpOpts, workers: usize, out: &Path) -> Result<Run> {
    let data = root.join("examples/data/complaints");
    let _ = std::fs::remove_dir_all(out);
    let mut c = Command::new(peft);
    c.args(["train", "--model", &o.preset, "--tokenizer"])
        .arg(data.join("tokenizer.json"))
        .arg("--data")
        .arg(data.join("train.jsonl"))
        .arg("--output-dir")
        .arg(out)
        .args(["--max-steps", &(o.steps + o.warmup).to_string()])
        .args(["--lora-r", "8", "--lora-alpha", "32", "--lora-dropout", "0"])
        .args(["--seed", "42", "--quiet", "--show-examples", "0"])
        .args(["--batch-size", &(o.global_batch / workers).to_string()]);
    if workers > 1 {
        c.args(["--nproc", &workers.to_string()]);
    }
    c.stdout(std::process::Stdio::null());
    let before = lo_bytes();
    let t = Instant::now();
    let status = c.status().context("running peft train")?;
    let wall_s = t.elapsed().as_secs_f64();
    let after = lo_bytes();
    if !status.success() {
        bail!("peft train with {workers} worker(s) failed");
    }
    let rows: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &Value| v["step"].as_u64().is_some_and(|s| s as usize > o.warmup))
        .filter(|v: &Value| v.get("loss").is_some())
        .collect();
    let col = |k: &str| -> Vec<f64> { rows.iter().filter_map(|r| r[k].as_f64()).collect() };
    let all_steps = (o.steps + o.warmup) as f64;
    Ok(Run {
        tokens_per_s: median(col("tokens_per_s")),
        reduce_s: median(col("reduce_s")),
        payload_bytes: median(col("reduce_payload_bytes")),
        lo_bytes_per_step: match (before, after, workers > 1) {
            (Some(b), Some(a), true) => a.saturating_sub(b) as f64 / all_steps,
            _ => 0.0,
        },
        wall_s,
    })
}

/// The all-reduce alone, two processes on loopback, for the LoRA payloads of mT5-small,
/// mt0-large and mt0-xxl (`crates/peft-train/examples/allreduce_bench.rs`).
fn transport(root: &Path, cargo: impl Fn() -> Command) -> Result<Vec<Value>> {
    let status = cargo()
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "peft-train",
            "--features",
            "collective",
        ])
        .args(["--example", "allreduce_bench"])
        .status()
        .context("building allreduce_bench")?;
    if !status.success() {
        bail!("building allreduce_bench failed");
    }
    let exe = crate::bench::release_dir(root).join("examples/allreduce_bench");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let coord = format!("127.0.0.1:{port}");
    let r0 = Command::new(&exe)
        .args(["2", "0", &coord])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let r1 = Command::new(&exe)
        .args(["2", "1", &coord])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let (o0, o1) = (r0.wait_with_output()?, r1.wait_with_output()?);
    if !o0.status.success() || !o1.status.success() {
        bail!("allreduce_bench failed");
    }
    Ok(String::from_utf8_lossy(&o0.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

pub fn run(root: &Path, peft: &Path, cargo: impl Fn() -> Command, o: &DpOpts) -> Result<()> {
    if !o.global_batch.is_multiple_of(2) {
        bail!("--global-batch must be even (it is split over 2 workers)");
    }
    let dir = std::env::temp_dir().join(format!("peft-dp-bench-{}", std::process::id()));
    let mut runs: Vec<(usize, Run)> = Vec::new();
    for round in 0..o.rounds {
        // Alternate which goes first, so slow phases of a noisy machine hit both.
        let order = if round % 2 == 0 { [1, 2] } else { [2, 1] };
        for w in order {
            let r = one_run(root, peft, o, w, &dir.join(format!("w{w}")))?;
            eprintln!(
                "round {}: {w} worker(s): {:.0} tok/s, reduce {:.4} s, wall {:.1} s",
                round + 1,
                r.tokens_per_s,
                r.reduce_s,
                r.wall_s
            );
            runs.push((w, r));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let transport = transport(root, cargo)?;
    let pick = |w: usize, f: fn(&Run) -> f64| {
        median(
            runs.iter()
                .filter(|(x, _)| *x == w)
                .map(|(_, r)| f(r))
                .collect(),
        )
    };
    let (t1, t2) = (pick(1, |r| r.tokens_per_s), pick(2, |r| r.tokens_per_s));
    let payload = pick(2, |r| r.payload_bytes);
    let reduce = pick(2, |r| r.reduce_s);
    let measured = pick(2, |r| r.lo_bytes_per_step);
    // Ring all-reduce, W = 2: each worker sends 2 (W - 1) / W x payload = payload per step.
    let theory = 2.0 * payload;
    let v = json!({
        "workload": "lora-train-dp",
        "preset": o.preset,
        "global_batch": o.global_batch,
        "steps": o.steps,
        "rounds": o.rounds,
        "tokens_per_s_1": t1,
        "tokens_per_s_2": t2,
        "speedup_2_over_1": t2 / t1,
        "reduce_s_2": reduce,
        "reduce_payload_bytes": payload,
        "loopback_bytes_per_step": measured,
        "ring_theory_bytes_per_step": theory,
        "wall_s_1": pick(1, |r| r.wall_s),
        "wall_s_2": pick(2, |r| r.wall_s),
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "transport": transport,
    });
    if o.json {
        println!("{v}");
        return Ok(());
    }
    println!(
        "| workers | tokens/s | speed-up | reduce s/step | payload MB | exchanged MB/step (loopback) | ring theory MB/step |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!("| 1 | {t1:.0} | 1.00 | - | - | - | - |");
    println!(
        "| 2 | {t2:.0} | {:.2} | {reduce:.4} | {:.2} | {:.2} | {:.2} |",
        t2 / t1,
        payload / 1e6,
        measured / 1e6,
        theory / 1e6
    );
    println!();
    println!(
        "| payload (LoRA r=8, q,v) | floats | MB | all-reduce s, 2 workers, loopback | MB/s sent per worker |"
    );
    println!("|---|---|---|---|---|");
    for t in &transport {
        let s = t["median_s"].as_f64().unwrap_or(f64::NAN);
        let sent = t["sent_bytes_per_worker"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {:.2} | {s:.4} | {:.0} |",
            t["payload"].as_str().unwrap_or("?"),
            t["floats"],
            t["payload_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
            sent / s / 1e6
        );
    }
    Ok(())
}
