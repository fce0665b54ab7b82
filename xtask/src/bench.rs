//! `cargo xtask bench`: peft and PyTorch + PEFT side by side, interleaved, one process per
//! workload and implementation (so peak RSS figures do not mix), medians and ratios.
//!
//! ```text
//! cargo xtask bench [--workload NAME]... [--json] [--rounds 3] [--steps 5] [--warmup 2]
//!                   [--threads N] [--device cpu|flex|cuda] [--dtype f32|bf16]
//!                   [--model-preset small|large] [--no-torch] [--compare-kernels]
//!                   [--compare-allocators] [--compare-host-ops]
//! ```
//!
//! The PyTorch side (`xtask/bench/bench_torch.py`, pinned in `xtask/bench/requirements.txt`) runs
//! when a Python with torch, transformers and peft is found: `PEFT_RS_PYTHON`, then
//! `.cache/venv/bin/python`, then `python3`. Both sides get the same thread count (default: the
//! machine's cores): `torch.set_num_threads` there, `RAYON_NUM_THREADS` and
//! `MATMUL_NUM_THREADS` here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const WORKLOADS: &[&str] = &[
    "lora-train",
    "full-train",
    "generate",
    "infer-base",
    "infer-merged",
    "infer-unmerged",
];

struct Opts {
    workloads: Vec<String>,
    json: bool,
    rounds: usize,
    steps: usize,
    warmup: usize,
    threads: usize,
    device: String,
    dtype: String,
    preset: String,
    /// Batch size and source length of the model workloads (both sides).
    batch: usize,
    src_len: usize,
    torch: bool,
    /// Also run peft with `PEFT_GEMM_KERNEL=matrixmultiply` (ndarray's own kernel), as `peft-mm`.
    kernels: bool,
    /// Run peft with `PEFT_ALLOCATOR=mimalloc` and with `PEFT_ALLOCATOR=system` (as
    /// `peft-sys`), whatever the command would choose.
    allocators: bool,
    /// Also run peft with `PEFT_HOST_OPS=burn` (burn-ndarray's own copying product and
    /// reshape instead of `peft_core::ops`), as `peft-burn`.
    host_ops: bool,
    /// `--workload serve`: the load test's requests, clients and adapters.
    serve: crate::serve_bench::ServeOpts,
    /// `--workload lora-train-dp`: examples per optimizer step, split over the workers.
    global_batch: usize,
    steps_given: bool,
    /// `--help`: print the usage and stop.
    help: bool,
}

/// What `cargo xtask bench --help` prints, and an unknown option's error ends with.
const USAGE: &str = "usage: cargo xtask bench [--workload NAME]... [--json] [--rounds N] \
    [--steps N] [--warmup N] [--threads N] [--device cpu|flex|cuda] [--dtype f32|bf16] \
    [--model-preset small|large] [--batch N] [--src-len N] [--no-torch] [--compare-kernels] \
    [--compare-allocators] [--compare-host-ops] [--requests N --clients N --adapters N (serve)] \
    [--global-batch N (lora-train-dp)]";

/// Every workload `--workload` takes, comma-separated (the usage and its error list them).
fn workload_names() -> String {
    format!("{}, serve, lora-train-dp", WORKLOADS.join(", "))
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        workloads: Vec::new(),
        json: false,
        rounds: 3,
        steps: 5,
        warmup: 2,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        device: "cpu".into(),
        dtype: "f32".into(),
        preset: "small".into(),
        batch: 8,
        src_len: 128,
        torch: true,
        kernels: false,
        allocators: false,
        host_ops: false,
        serve: crate::serve_bench::ServeOpts {
            requests: 400,
            clients: 32,
            adapters: 8,
            preset: "mt0-small".into(),
            json: false,
        },
        global_batch: 8,
        steps_given: false,
        help: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .with_context(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--workload" => {
                let w = val()?;
                if !WORKLOADS.contains(&w.as_str()) && w != "serve" && w != "lora-train-dp" {
                    bail!("unknown workload {w:?} ({})", workload_names());
                }
                o.workloads.push(w);
            }
            "--json" => o.json = true,
            "--no-torch" => o.torch = false,
            "--compare-kernels" => o.kernels = true,
            "--compare-allocators" => o.allocators = true,
            "--compare-host-ops" => o.host_ops = true,
            "--rounds" => o.rounds = val()?.parse()?,
            "--steps" => {
                o.steps = val()?.parse()?;
                o.steps_given = true;
            }
            "--warmup" => o.warmup = val()?.parse()?,
            "--threads" => o.threads = val()?.parse()?,
            "--device" => o.device = val()?,
            "--dtype" => o.dtype = val()?,
            "--model-preset" => o.preset = val()?,
            "--batch" => o.batch = val()?.parse()?,
            "--src-len" => o.src_len = val()?.parse()?,
            "--requests" => o.serve.requests = val()?.parse()?,
            "--clients" => o.serve.clients = val()?.parse()?,
            "--adapters" => o.serve.adapters = val()?.parse()?,
            "--global-batch" => o.global_batch = val()?.parse()?,
            "-h" | "--help" => o.help = true,
            other => bail!("unknown option {other:?}; {USAGE}"),
        }
    }
    if o.workloads.is_empty() {
        o.workloads = WORKLOADS.iter().map(|s| s.to_string()).collect();
    }
    o.serve.json = o.json;
    for alone in ["serve", "lora-train-dp"] {
        if o.workloads.iter().any(|w| w == alone) && o.workloads.len() > 1 {
            bail!("--workload {alone} is a test of its own: run it alone");
        }
    }
    if o.batch == 0 || o.src_len == 0 {
        bail!("--batch and --src-len must be at least 1");
    }
    if o.rounds == 0 || o.steps == 0 {
        bail!("--rounds and --steps must be at least 1");
    }
    Ok(o)
}

/// A Python that imports torch, transformers and peft, if there is one.
fn find_python(root: &Path) -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("PEFT_RS_PYTHON").map(PathBuf::from),
        Some(root.join(".cache/venv/bin/python")),
        Some(PathBuf::from("python3")),
    ];
    candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .args(["-c", "import torch, transformers, peft"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn last_json_line(out: &std::process::Output, what: &str) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{what} printed no JSON line"))?;
    serde_json::from_str(line).with_context(|| format!("{what}: bad JSON {line}"))
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Runs the benchmark as `cargo xtask bench` does.
/// Where cargo puts release builds, wherever `CARGO_TARGET_DIR` says.
pub(crate) fn release_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"))
        .join("release")
}

pub fn bench(root: &Path, cargo: impl Fn() -> Command, args: &[String]) -> Result<()> {
    let o = parse(args)?;
    if o.help {
        println!("{USAGE}\n\nworkloads: {}", workload_names());
        return Ok(());
    }
    let features = match o.device.as_str() {
        "cpu" => None,
        "flex" => Some("flex"),
        "cuda" => Some("cuda"),
        "wgpu" => Some("wgpu"),
        d => bail!("unknown --device {d:?} (cpu, flex, cuda, wgpu)"),
    };
    let mut build = cargo();
    build
        .current_dir(root)
        .args(["build", "--release", "-p", "peft-cli"]);
    if let Some(f) = features {
        build.args(["--features", f]);
    }
    let status = build.status().context("building peft-cli")?;
    if !status.success() {
        bail!("cargo build --release -p peft-cli failed");
    }
    let peft = release_dir(root).join("peft");
    if o.workloads == ["serve"] {
        let mut so = crate::serve_bench::ServeOpts { ..o.serve };
        if o.preset != "small" {
            so.preset = o.preset.clone();
        }
        return crate::serve_bench::run(root, &peft, &so);
    }
    if o.workloads == ["lora-train-dp"] {
        let dp = crate::dp_bench::DpOpts {
            rounds: o.rounds,
            steps: if o.steps_given { o.steps } else { 12 },
            warmup: o.warmup,
            preset: if o.preset == "small" {
                "mt0-small".into()
            } else {
                o.preset.clone()
            },
            global_batch: o.global_batch,
            json: o.json,
        };
        return crate::dp_bench::run(root, &peft, cargo, &dp);
    }
    let python = if o.torch { find_python(root) } else { None };
    if o.torch && python.is_none() {
        eprintln!(
            "note: no Python with torch + transformers + peft found (PEFT_RS_PYTHON, \
             .cache/venv, python3): timing peft only"
        );
    }
    let torch_device = if o.device == "cuda" { "cuda" } else { "cpu" };
    let common = |c: &mut Command, w: &str| {
        c.args(["--workload", w])
            .args(["--steps", &o.steps.to_string()])
            .args(["--warmup", &o.warmup.to_string()])
            .args(["--model-preset", &o.preset])
            .args(["--batch", &o.batch.to_string()])
            .args(["--src-len", &o.src_len.to_string()]);
    };
    // (workload, impl) -> per-round results.
    let mut results: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for round in 0..o.rounds {
        for w in &o.workloads {
            // Alternate which side goes first, so slow phases of a noisy machine hit both.
            let mut order = vec!["peft", "torch"];
            if o.kernels {
                order.insert(1, "peft-mm");
            }
            if o.allocators {
                order.insert(1, "peft-sys");
            }
            if o.host_ops {
                order.insert(1, "peft-burn");
            }
            if round % 2 == 1 {
                order.reverse();
            }
            for imp in order {
                let out = match (imp, &python) {
                    ("peft" | "peft-mm" | "peft-sys" | "peft-burn", _) => {
                        let mut c = Command::new(&peft);
                        c.args(["--device", &o.device, "bench"])
                            .env("RAYON_NUM_THREADS", o.threads.to_string())
                            .env("MATMUL_NUM_THREADS", o.threads.to_string());
                        if imp == "peft-mm" {
                            c.env("PEFT_GEMM_KERNEL", "matrixmultiply");
                        }
                        if imp == "peft-burn" {
                            c.env("PEFT_HOST_OPS", "burn");
                        }
                        if imp == "peft-sys" {
                            c.env("PEFT_ALLOCATOR", "system");
                        } else if o.allocators {
                            c.env("PEFT_ALLOCATOR", "mimalloc");
                        }
                        common(&mut c, w);
                        // The adapter against the bare base, paired inside the process (the
                        // 5% lines below; process medians spread wider than that on a VM).
                        if imp == "peft" && (w == "infer-merged" || w == "infer-unmerged") {
                            c.arg("--paired-base");
                        }
                        c.output().context("running peft bench")?
                    }
                    ("torch", Some(py)) => {
                        let mut c = Command::new(py);
                        c.arg(root.join("xtask/bench/bench_torch.py"))
                            .args(["--threads", &o.threads.to_string()])
                            .args(["--device", torch_device, "--dtype", &o.dtype]);
                        common(&mut c, w);
                        c.output().context("running bench_torch.py")?
                    }
                    _ => continue,
                };
                let v = last_json_line(&out, &format!("{imp} {w}"))?;
                eprintln!(
                    "round {}/{}: {w:<15} {imp:<8} {:>8.3} s",
                    round + 1,
                    o.rounds,
                    v["median_s"].as_f64().unwrap_or(f64::NAN)
                );
                results
                    .entry((w.clone(), imp.to_string()))
                    .or_default()
                    .push(v);
            }
        }
    }

    // One line per workload and implementation: median over rounds of the per-run medians.
    let mut summary: BTreeMap<(String, String), Value> = BTreeMap::new();
    for ((w, imp), runs) in &results {
        let med = median(runs.iter().filter_map(|r| r["median_s"].as_f64()).collect());
        let rss = runs
            .iter()
            .filter_map(|r| r["peak_rss_mib"].as_f64())
            .fold(0.0f64, f64::max);
        let tokens = runs[0]["tokens_per_s"].as_f64().unwrap_or(0.0)
            * runs[0]["median_s"].as_f64().unwrap_or(0.0);
        let flops = runs[0]["flops_per_step"].as_f64();
        let mut line = json!({
            "workload": w,
            "impl": imp,
            "median_s": med,
            "tokens_per_s": tokens / med,
            "peak_rss_mib": rss,
            "gflop_per_s": flops.map(|f| f / med / 1e9),
            "rounds": runs.len(),
            "steps": o.steps,
            "threads": runs[0]["threads"],
            "device": runs[0]["device"],
            "dtype": runs[0]["dtype"],
            "params": runs[0]["params"],
            "trainable_params": runs[0]["trainable_params"],
            "round_medians_s": runs.iter().map(|r| r["median_s"].clone()).collect::<Vec<_>>(),
        });
        let paired: Vec<f64> = runs.iter().filter_map(|r| r["vs_base"].as_f64()).collect();
        if !paired.is_empty() {
            line["round_vs_base"] = json!(paired);
            line["vs_base"] = json!(median(paired));
        }
        if let Some(g) = runs[0].get("peak_gpu_mib") {
            line["peak_gpu_mib"] = g.clone();
        }
        summary.insert((w.clone(), imp.clone()), line);
    }
    if o.json {
        for w in &o.workloads {
            for imp in ["peft", "peft-mm", "peft-sys", "peft-burn", "torch"] {
                if let Some(l) = summary.get(&(w.clone(), imp.to_string())) {
                    println!("{l}");
                }
            }
        }
        return Ok(());
    }
    let get = |w: &str, imp: &str, k: &str| {
        summary
            .get(&(w.to_string(), imp.to_string()))
            .and_then(|l| l[k].as_f64())
    };
    println!(
        "\npeft vs PyTorch + PEFT: {} threads, {}, device {}, {} rounds x {} steps (medians)\n",
        o.threads,
        cpu_model(),
        o.device,
        o.rounds,
        o.steps
    );
    println!(
        "| workload | peft s | torch s | speed-up | peft tok/s | torch tok/s | peft GFLOP/s | torch GFLOP/s | peft RSS MiB | torch RSS MiB | RSS ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let f = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
    for w in &o.workloads {
        let (ours, theirs) = (get(w, "peft", "median_s"), get(w, "torch", "median_s"));
        let speed = ours.zip(theirs).map(|(a, b)| b / a);
        let rss = get(w, "peft", "peak_rss_mib").zip(get(w, "torch", "peak_rss_mib"));
        println!(
            "| {w} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            f(ours, 3),
            f(theirs, 3),
            speed.map_or("-".into(), |s| format!("{s:.2}x")),
            f(get(w, "peft", "tokens_per_s"), 0),
            f(get(w, "torch", "tokens_per_s"), 0),
            f(get(w, "peft", "gflop_per_s"), 1),
            f(get(w, "torch", "gflop_per_s"), 1),
            f(rss.map(|r| r.0), 0),
            f(rss.map(|r| r.1), 0),
            rss.map_or("-".into(), |(a, b)| format!("{:.2}", a / b)),
        );
    }
    // Same binary, one setting changed: (asked, variant's impl, title, variant's label, default's label).
    let comparisons = [
        (
            o.kernels,
            "peft-mm",
            "the CPU matrix product: gemm (peft-gemm, the default) vs matrixmultiply \
             (PEFT_GEMM_KERNEL=matrixmultiply, ndarray's own kernel)",
            "matrixmultiply",
            "gemm",
        ),
        (
            o.allocators,
            "peft-sys",
            "the allocator: mimalloc (PEFT_ALLOCATOR=mimalloc) vs the system allocator \
             (PEFT_ALLOCATOR=system); without the variable, training uses the system \
             allocator and inference mimalloc",
            "system",
            "mimalloc",
        ),
        (
            o.host_ops,
            "peft-burn",
            "products and reshapes: peft_core::ops (copy-free, the default) vs burn-ndarray's \
             own (PEFT_HOST_OPS=burn)",
            "burn ops",
            "peft ops",
        ),
    ];
    for (asked, variant, title, vl, dl) in comparisons {
        if !asked {
            continue;
        }
        println!("\n{title}, same binary\n");
        println!(
            "| workload | {vl} s | {dl} s | speed-up | {vl} GFLOP/s | {dl} GFLOP/s | {vl} RSS MiB | {dl} RSS MiB |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for w in &o.workloads {
            let (v, d) = (get(w, variant, "median_s"), get(w, "peft", "median_s"));
            println!(
                "| {w} | {} | {} | {} | {} | {} | {} | {} |",
                f(v, 3),
                f(d, 3),
                v.zip(d)
                    .map_or("-".into(), |(a, b)| format!("{:.2}x", a / b)),
                f(get(w, variant, "gflop_per_s"), 1),
                f(get(w, "peft", "gflop_per_s"), 1),
                f(get(w, variant, "peak_rss_mib"), 0),
                f(get(w, "peft", "peak_rss_mib"), 0),
            );
        }
    }
    // The targets (BENCHMARKS.md), where the workloads they need were run.
    println!("\ntargets:");
    let target = |name: &str, value: Option<f64>, ok: &dyn Fn(f64) -> bool, fmt: &str| {
        if let Some(v) = value {
            println!(
                "  {} {name}: {}",
                if ok(v) { "met    " } else { "NOT met" },
                fmt.replace("{}", &format!("{v:.2}"))
            );
        }
    };
    let t = |w: &str, imp: &str| get(w, imp, "median_s");
    let vs_torch = |w: &str| t(w, "torch").zip(t(w, "peft")).map(|(a, b)| a / b);
    target(
        "LoRA step throughput >= 1.5x PyTorch",
        vs_torch("lora-train"),
        &|v| v >= 1.5,
        "{}x",
    );
    target(
        "LoRA step peak RSS <= 0.6x PyTorch",
        get("lora-train", "peft", "peak_rss_mib")
            .zip(get("lora-train", "torch", "peak_rss_mib"))
            .map(|(a, b)| a / b),
        &|v| v <= 0.6,
        "{}x",
    );
    target(
        "full fine-tuning step >= 1.2x PyTorch",
        vs_torch("full-train"),
        &|v| v >= 1.2,
        "{}x",
    );
    target(
        "greedy generation >= 2x PyTorch",
        vs_torch("generate"),
        &|v| v >= 2.0,
        "{}x",
    );
    for w in ["infer-base", "infer-merged", "infer-unmerged"] {
        target(
            &format!("{w} >= 1.2x PyTorch"),
            vs_torch(w),
            &|v| v >= 1.2,
            "{}x",
        );
    }
    // Against the base: the paired in-process ratio (median over rounds of each run's median
    // of step ratios) where the runs report one, else the ratio of the separate medians.
    let vs_base = |w: &str| -> (Option<f64>, &'static str) {
        match get(w, "peft", "vs_base") {
            Some(v) => (Some(v), "{}x the base's time (paired steps)"),
            None => (
                t(w, "peft")
                    .zip(t("infer-base", "peft"))
                    .map(|(a, b)| a / b),
                "{}x the base's time",
            ),
        }
    };
    let (merged, fmt) = vs_base("infer-merged");
    target(
        "merged adapter as fast as the bare base (<= 1.05x its time)",
        merged,
        &|v| v <= 1.05,
        fmt,
    );
    let (unmerged, fmt) = vs_base("infer-unmerged");
    target(
        "unmerged adapter within 5% of the bare base",
        unmerged,
        &|v| v <= 1.05,
        fmt,
    );
    Ok(())
}
