//! Project automation, run as `cargo xtask <command>`.
//!
//! - `fixtures`: regenerate the golden fixtures with the pinned Python reference stack
//!   (transformers + peft from PyPI, installed into `.cache/venv`). CI never runs this: the
//!   outputs are committed.
//! - `ci`: run `.ci/run`, the same steps as CI.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const FIXTURE_SCRIPTS: &[&str] = &["tests/fixtures/lora/make_fixtures.py"];
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

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("fixtures") => fixtures(),
        Some("ci") => run(Command::new("bash").arg(root().join(".ci/run"))),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 fixtures   regenerate golden fixtures with transformers + peft (PEFT_RS_PYTHON to use an existing interpreter)\n  \
                 ci         run the CI steps (.ci/run)"
            );
            bail!("unknown or missing command");
        }
    }
}
