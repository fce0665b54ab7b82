//! `cargo xtask bench --workload serve`: a bounded load test of `peft serve` on loopback.
//!
//! ```text
//! cargo xtask bench --workload serve [--requests 400] [--clients 32] [--adapters 8]
//!                   [--model-preset mt0-small] [--json]
//! ```
//!
//! It makes a base (a preset with seeded random weights, saved by `peft train`) and N LoRA
//! adapters (the layout `peft train` writes, with seeded random values, so that they answer
//! differently), then
//! runs the same requests (adapter `i % N`, one of four prompts, 8 new tokens, greedy) through
//! three servers in turn: one request at a time (`--max-batch-size 1`), one batch per adapter
//! (`--batching per-adapter`) and mixed-adapter batches. Every answer is checked against the
//! one-at-a-time run. It reports throughput, p50/p99 latency and the batch sizes, and the peak
//! RSS of the server holding N adapters against N servers of a merged model (a merged model's
//! process is measured once, with the base alone, and counted N times).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

pub struct ServeOpts {
    pub requests: usize,
    pub clients: usize,
    pub adapters: usize,
    pub preset: String,
    pub json: bool,
}

const PROMPTS: [&str; 4] = [
    "Tweet text : @HondaCustSvc Your customer service has been horrible. Label :",
    "Tweet text : Loving the new phone, thanks! Label :",
    "Tweet text : my order never arrived and nobody answers Label :",
    "Tweet text : the train was late again this morning Label :",
];

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(peft: &Path, model: &Path, args: &[String]) -> Result<Server> {
        let mut child = Command::new(peft)
            .args(["serve", "--model"])
            .arg(model)
            .args(["--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting peft serve")?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
            &mut line,
        )?;
        let Some(url) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!("peft serve did not start: {line:?}");
        };
        Ok(Server {
            url: url.to_string(),
            child,
        })
    }

    /// Peak resident memory (VmHWM), MiB.
    fn peak_rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .map_or(f64::NAN, |kib| kib / 1024.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn generate(agent: &ureq::Agent, url: &str, adapter: &str, prompt: &str) -> Result<String> {
    let body = json!({"inputs": [prompt], "adapter": adapter, "max_new_tokens": 8});
    let mut r = agent
        .post(format!("{url}/v1/generate"))
        .header("content-type", "application/json")
        .send(body.to_string())?;
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string()?)?;
    v["outputs"][0]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("unexpected answer {v}"))
}

struct Run {
    seconds: f64,
    latencies: Vec<f64>,
    answers: Vec<String>,
    batches: f64,
    rows: f64,
}

/// `requests` requests from `clients` threads; request `i` goes to adapter `i % n` with prompt
/// `(i / n) % 4`.
fn load(url: &str, o: &ServeOpts, names: &[String]) -> Result<Run> {
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(vec![(0.0f64, String::new()); o.requests]));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..o.clients)
        .map(|_| {
            let (next, results, url, names) = (
                next.clone(),
                results.clone(),
                url.to_string(),
                names.to_vec(),
            );
            let total = o.requests;
            std::thread::spawn(move || -> Result<()> {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_secs(600)))
                    .build()
                    .into();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok(());
                    }
                    let a = &names[i % names.len()];
                    let p = PROMPTS[(i / names.len()) % PROMPTS.len()];
                    let t = Instant::now();
                    let answer = generate(&agent, &url, a, p)?;
                    results.lock().expect("results")[i] = (t.elapsed().as_secs_f64(), answer);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread")?;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let results = Arc::try_unwrap(results)
        .expect("threads done")
        .into_inner()
        .expect("results");
    let metrics = ureq::get(format!("{url}/metrics"))
        .call()?
        .body_mut()
        .read_to_string()?;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    Ok(Run {
        seconds,
        latencies: results.iter().map(|r| r.0).collect(),
        answers: results.into_iter().map(|r| r.1).collect(),
        batches: value("peft_batch_size_count"),
        rows: value("peft_batch_size_sum"),
    })
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

pub fn run(root: &Path, peft: &Path, o: &ServeOpts) -> Result<()> {
    if o.adapters == 0 || o.clients == 0 || o.requests == 0 {
        bail!("--adapters, --clients and --requests must be at least 1");
    }
    let work = root.join("target/serve-bench");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let data = root.join("examples/data/complaints");
    // One short LoRA run gives the base (a seeded preset, saved next to the adapter) and an
    // adapter layout; the N adapters are that layout with seeded random values, so that they
    // answer differently from each other and from the base.
    let first = work.join("adapter-0");
    eprintln!(
        "[serve bench] making the base and an adapter layout ({})",
        first.display()
    );
    let status = Command::new(peft)
        .args(["train", "--model", &o.preset, "--tokenizer"])
        .arg(data.join("tokenizer.json"))
        .arg("--data")
        .arg(data.join("train.jsonl"))
        .arg("--output-dir")
        .arg(&first)
        .args(["--max-steps", "1", "--seed", "42", "--lora-r", "8"])
        .args(["--quiet", "--show-examples", "0", "--save-steps", "1000"])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("making the base failed");
    }
    let layout = std::fs::read(first.join("adapter_model.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&layout)?;
    let mut names = Vec::new();
    for i in 0..o.adapters {
        let dir = work.join(format!("adapter-{i}"));
        std::fs::create_dir_all(&dir)?;
        if i > 0 {
            std::fs::copy(
                first.join("adapter_config.json"),
                dir.join("adapter_config.json"),
            )?;
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Uniform in [-0.05, 0.05): deltas of the size trained adapters have.
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        };
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(k, t)| {
                let n: usize = t.shape().iter().product();
                let bytes = (0..n).flat_map(|_| next().to_le_bytes()).collect();
                (k, t.shape().to_vec(), bytes)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(k, s, b)| {
                Ok((
                    k.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
                ))
            })
            .collect::<Result<_>>()?;
        safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))?;
        names.push(format!("a{i}"));
    }
    let base = first.join("base_model");
    let adapter_args: Vec<String> = names
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            [
                "--adapter".to_string(),
                format!("{n}={}", work.join(format!("adapter-{i}")).display()),
            ]
        })
        .collect();
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v = adapter_args.clone();
        v.extend(["--max-loaded".into(), o.adapters.to_string()]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let modes: [(&str, Vec<String>); 3] = [
        (
            "one at a time",
            common(&["--max-batch-size", "1", "--batch-wait-ms", "0"]),
        ),
        (
            "per adapter",
            common(&[
                "--batching",
                "per-adapter",
                "--max-batch-size",
                "32",
                "--batch-wait-ms",
                "10",
            ]),
        ),
        (
            "mixed",
            common(&[
                "--batching",
                "mixed",
                "--max-batch-size",
                "32",
                "--batch-wait-ms",
                "10",
            ]),
        ),
    ];
    let mut rows = Vec::new();
    let mut reference: Option<Vec<String>> = None;
    let mut rss_adapters = f64::NAN;
    for (mode, args) in &modes {
        eprintln!(
            "[serve bench] {mode}: {} requests from {} clients",
            o.requests, o.clients
        );
        let server = Server::start(peft, &base, args)?;
        // Warm-up: every adapter once.
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        for n in &names {
            generate(&agent, &server.url, n, PROMPTS[0])?;
        }
        let r = load(&server.url, o, &names)?;
        rss_adapters = server.peak_rss_mib();
        let correct = match &reference {
            None => {
                reference = Some(r.answers.clone());
                r.answers.len()
            }
            Some(want) => {
                for (i, (a, b)) in want.iter().zip(&r.answers).enumerate() {
                    if a != b {
                        eprintln!(
                            "[serve bench] {mode}: request {i} (adapter {}, prompt {}): {b:?}, alone {a:?}",
                            names[i % names.len()],
                            (i / names.len()) % PROMPTS.len()
                        );
                    }
                }
                want.iter().zip(&r.answers).filter(|(a, b)| a == b).count()
            }
        };
        rows.push(json!({
            "mode": mode,
            "requests": o.requests,
            "clients": o.clients,
            "adapters": o.adapters,
            "seconds": r.seconds,
            "requests_per_s": o.requests as f64 / r.seconds,
            "p50_ms": percentile(&r.latencies, 0.5) * 1e3,
            "p99_ms": percentile(&r.latencies, 0.99) * 1e3,
            "mean_batch_rows": r.rows / r.batches,
            "correct": correct,
            "peak_rss_mib": rss_adapters,
        }));
    }
    // Distinct answers across adapters: the adapters really differ.
    let want = reference.unwrap_or_default();
    let distinct = {
        let mut per_prompt0: Vec<&String> =
            (0..o.adapters.min(want.len())).map(|i| &want[i]).collect();
        per_prompt0.sort();
        per_prompt0.dedup();
        per_prompt0.len()
    };
    // A merged model's server: the base alone (a merged adapter adds no memory).
    let merged = Server::start(peft, &base, &["--max-batch-size".into(), "1".into()])?;
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    for p in PROMPTS {
        let body = json!({"inputs": [p], "max_new_tokens": 8});
        agent
            .post(format!("{}/v1/generate", merged.url))
            .header("content-type", "application/json")
            .send(body.to_string())?;
    }
    let rss_merged = merged.peak_rss_mib();
    drop(merged);

    if o.json {
        for r in &rows {
            println!("{r}");
        }
        println!(
            "{}",
            json!({"memory": {"adapters": o.adapters, "one_server_mib": rss_adapters,
                   "merged_server_mib": rss_merged, "merged_servers_mib": rss_merged * o.adapters as f64}})
        );
        return Ok(());
    }
    let base_rps = rows[0]["requests_per_s"].as_f64().unwrap_or(f64::NAN);
    println!(
        "\n`peft serve` load test: {} requests, {} clients, {} adapters (model {}), 8 new tokens, greedy",
        o.requests, o.clients, o.adapters, o.preset
    );
    println!(
        "| batching | req/s | vs one at a time | p50 ms | p99 ms | rows per batch | correct | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.2}x | {:.0} | {:.0} | {:.1} | {}/{} | {:.0} |",
            r["mode"].as_str().unwrap_or(""),
            r["requests_per_s"].as_f64().unwrap_or(f64::NAN),
            r["requests_per_s"].as_f64().unwrap_or(f64::NAN) / base_rps,
            r["p50_ms"].as_f64().unwrap_or(f64::NAN),
            r["p99_ms"].as_f64().unwrap_or(f64::NAN),
            r["mean_batch_rows"].as_f64().unwrap_or(f64::NAN),
            r["correct"],
            o.requests,
            r["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!(
        "\nmemory: one server with {} adapters peaks at {:.0} MiB; {} servers of merged models \
         would take {} x {:.0} = {:.0} MiB ({:.1}x)",
        o.adapters,
        rss_adapters,
        o.adapters,
        o.adapters,
        rss_merged,
        rss_merged * o.adapters as f64,
        rss_merged * o.adapters as f64 / rss_adapters
    );
    println!(
        "the {} adapters give {distinct} different answers to the first prompt",
        o.adapters
    );
    let wrong: Vec<String> = rows
        .iter()
        .filter(|r| r["correct"].as_u64() != Some(o.requests as u64))
        .map(|r| r["mode"].to_string())
        .collect();
    if !wrong.is_empty() {
        bail!("answers differ from one-at-a-time in: {}", wrong.join(", "));
    }
    Ok(())
}
