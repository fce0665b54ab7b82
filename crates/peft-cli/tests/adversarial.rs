//! The adversarial suite: hostile and broken inputs generated here (pickles that would run a
//! shell command, memo-clone bombs, deep nesting, tensors larger than their storage, oversize
//! shapes and sizes, FIFOs and devices in place of files, broken data, bad flags), each given to
//! the real `peft` binary as a user would. Every case must end with exit status 1 and a message
//! naming the problem: no panic, no abort, no hang, no temporary file left behind, and no marker
//! file created by a payload.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "../../peft-io/tests/support/pickle.rs"]
mod pickle;
use pickle::{P, torch_zip};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn mt5() -> PathBuf {
    root().join("tests/fixtures/t5/mt5")
}

fn lora_fixture() -> PathBuf {
    root().join("tests/fixtures/t5/mt5_lora")
}

fn complaints() -> PathBuf {
    root().join("examples/data/complaints")
}

const KEY: &str = "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight";

/// One case: what to build, what to run, what the message must say.
struct Case {
    name: &'static str,
    args: Vec<String>,
    expect: &'static [&'static str],
}

/// Runs the binary with a time limit (a hang fails the case instead of the suite).
fn run(args: &[String]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            let _ = child.wait();
            return (None, format!("hung: {args:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    (out.status.code(), text)
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// An adapter directory: the fixture's config with `weights` as `file`.
fn adapter(dir: &Path, file: &str, weights: &[u8]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        lora_fixture().join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(dir.join(file), weights).unwrap();
    dir.to_path_buf()
}

fn generate_with(adapter: &Path) -> Vec<String> {
    s(&[
        "generate",
        "--model",
        &path(&mt5()),
        "--adapter",
        &path(adapter),
        "--max-new-tokens",
        "2",
        "the bus is late",
    ])
}

/// A zip checkpoint in `dir/adapter_model.bin` with `pickle` as `data.pkl`.
fn bin_adapter(dir: &Path, pickle: &[u8], storages: &[(&str, Vec<u8>)]) -> PathBuf {
    let d = adapter(dir, "adapter_model.bin", b"");
    torch_zip(&d.join("adapter_model.bin"), pickle, storages);
    d
}

/// `os.system(cmd)` with the module and name fetched back from the memo for STACK_GLOBAL
/// (a gate that only looks at the last two literal strings sees `collections.OrderedDict`).
fn memo_global(cmd: &str) -> Vec<u8> {
    P::proto(4)
        .short_str("os")
        .put(0)
        .short_str("system")
        .put(1)
        .op(b"00")
        .short_str("collections")
        .short_str("OrderedDict")
        .get(0)
        .get(1)
        .op(&[0x93])
        .str(cmd)
        .op(&[0x85, b'R'])
        .stop()
}

/// A safetensors header declaring one tensor, with any shape and offsets, and no data.
fn safetensors_header(key: &str, shape: &[u64], end: u64) -> Vec<u8> {
    let header = serde_json::json!({
        key: {"dtype": "F32", "shape": shape, "data_offsets": [0, end]}
    })
    .to_string();
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v
}

fn config_with(dir: &Path, key: &str, value: serde_json::Value) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(mt5().join("config.json")).unwrap()).unwrap();
    c[key] = value;
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(mt5().join(f), dir.join(f)).unwrap();
    }
    dir.to_path_buf()
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = s(&[
        "train",
        "--model",
        "mt0-tiny",
        "--tokenizer",
        &path(&complaints().join("tokenizer.json")),
        "--data",
        &path(data),
        "--output-dir",
        &path(out),
        "--quiet",
    ]);
    v.extend(s(extra));
    if !extra.iter().any(|a| a.starts_with("--max-steps")) {
        v.extend(s(&["--max-steps", "2"]));
    }
    v
}

fn mkfifo(p: &Path) {
    let ok = Command::new("mkfifo").arg(p).status().unwrap().success();
    assert!(ok, "mkfifo {}", p.display());
}

fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            if name.starts_with('.') && (name.contains(".tmp-") || name.starts_with(".record-")) {
                found.push(p.clone());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    found
}

#[test]
fn hostile_and_broken_inputs_end_in_exit_1_with_a_clear_message() {
    let base = std::env::temp_dir().join(format!("peft-adversarial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let marker = base.join("PWNED");
    let payload = format!("touch {}", marker.display());
    let d = |name: &str| base.join(name);
    let mut cases = Vec::new();
    let mut case = |name: &'static str, args: Vec<String>, expect: &'static [&'static str]| {
        cases.push(Case { name, args, expect })
    };

    // ---- pickles (PyTorch .bin adapters) ----
    case(
        "memo STACK_GLOBAL os.system",
        generate_with(&bin_adapter(&d("memo"), &memo_global(&payload), &[])),
        &["adapter_model.bin", "refused global `os.system`"],
    );
    case(
        "GLOBAL os.system in a zip",
        generate_with(&bin_adapter(
            &d("global"),
            &P::proto(2)
                .global("os", "system")
                .str(&payload)
                .op(&[0x85, b'R'])
                .stop(),
            &[],
        )),
        &["adapter_model.bin", "`os.system`"],
    );
    case(
        "legacy (non-zip) pickle with builtins.eval",
        generate_with(&adapter(
            &d("legacy"),
            "adapter_model.bin",
            &P::proto(2)
                .global("builtins", "eval")
                .str(&format!("__import__('os').system('{payload}')"))
                .op(&[0x85, b'R'])
                .stop(),
        )),
        &["adapter_model.bin", "legacy raw pickles are not read"],
    );
    case(
        "memo-clone bomb",
        generate_with(&bin_adapter(
            &d("bomb"),
            &P::proto(2)
                .op(b"]q\x00")
                .rep(b"(h\x00h\x00lq\x000", 26)
                .op(b"h\x00")
                .stop(),
            &[],
        )),
        &["adapter_model.bin", "elements"],
    );
    case(
        "nesting a million deep",
        generate_with(&bin_adapter(
            &d("deep"),
            &P::proto(2).rep(b"]", 1_000_000).rep(b"a", 999_999).stop(),
            &[],
        )),
        &["adapter_model.bin", "nesting depth"],
    );
    case(
        "tensor of 40 GB over a 16-byte storage",
        generate_with(&bin_adapter(
            &d("oob"),
            &P::proto(2)
                .op(b"}")
                .str(KEY)
                .tensor("0", 4, 0, &[100_000, 100_000], &[100_000, 1])
                .op(b"s")
                .stop(),
            &[("0", vec![0u8; 16])],
        )),
        &["adapter_model.bin", KEY, "100000"],
    );
    case(
        "zip that is not a zip",
        generate_with(&adapter(
            &d("notzip"),
            "adapter_model.bin",
            b"PK\x03\x04garbage",
        )),
        &["adapter_model.bin"],
    );

    // ---- safetensors ----
    case(
        "safetensors shape of 10^12 x 10^12",
        generate_with(&adapter(
            &d("st-shape"),
            "adapter_model.safetensors",
            &safetensors_header(KEY, &[1_000_000_000_000, 1_000_000_000_000], 16),
        )),
        &["adapter_model.safetensors"],
    );
    case(
        "safetensors header length of 2^60",
        generate_with(&adapter(
            &d("st-len"),
            "adapter_model.safetensors",
            &(1u64 << 60).to_le_bytes(),
        )),
        &["adapter_model.safetensors"],
    );
    case(
        "truncated safetensors",
        generate_with(&adapter(
            &d("st-trunc"),
            "adapter_model.safetensors",
            &std::fs::read(lora_fixture().join("adapter_model.safetensors")).unwrap()[..200],
        )),
        &["adapter_model.safetensors"],
    );
    let fifo = d("fifo");
    std::fs::create_dir_all(&fifo).unwrap();
    std::fs::copy(
        lora_fixture().join("adapter_config.json"),
        fifo.join("adapter_config.json"),
    )
    .unwrap();
    mkfifo(&fifo.join("adapter_model.safetensors"));
    case(
        "FIFO as the weights file",
        generate_with(&fifo),
        &["adapter_model.safetensors", "regular file"],
    );
    let dev = d("dev-zero");
    std::fs::create_dir_all(&dev).unwrap();
    std::fs::copy(
        lora_fixture().join("adapter_config.json"),
        dev.join("adapter_config.json"),
    )
    .unwrap();
    std::os::unix::fs::symlink("/dev/zero", dev.join("adapter_model.safetensors")).unwrap();
    case(
        "/dev/zero as the weights file",
        generate_with(&dev),
        &["adapter_model.safetensors", "regular file"],
    );
    let dir_file = d("dir-as-file");
    std::fs::create_dir_all(dir_file.join("adapter_model.safetensors")).unwrap();
    std::fs::copy(
        lora_fixture().join("adapter_config.json"),
        dir_file.join("adapter_config.json"),
    )
    .unwrap();
    case(
        "directory as the weights file",
        generate_with(&dir_file),
        &["adapter_model.safetensors", "directory"],
    );

    // ---- configs ----
    let huge_r = d("huge-r");
    adapter(
        &huge_r,
        "adapter_model.safetensors",
        &std::fs::read(lora_fixture().join("adapter_model.safetensors")).unwrap(),
    );
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(huge_r.join("adapter_config.json")).unwrap())
            .unwrap();
    c["r"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(huge_r.join("adapter_config.json"), c.to_string()).unwrap();
    case(
        "adapter_config.json r = 10^9",
        generate_with(&huge_r),
        &["adapter_model.safetensors"],
    );
    let r_string = adapter(
        &d("r-string"),
        "adapter_model.safetensors",
        &std::fs::read(lora_fixture().join("adapter_model.safetensors")).unwrap(),
    );
    let mut c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(r_string.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    c["r"] = serde_json::json!("8");
    std::fs::write(r_string.join("adapter_config.json"), c.to_string()).unwrap();
    case(
        "adapter_config.json r as a string",
        generate_with(&r_string),
        &["adapter_config.json", "field `r`"],
    );
    let bad_json = adapter(
        &d("bad-config"),
        "adapter_model.safetensors",
        &std::fs::read(lora_fixture().join("adapter_model.safetensors")).unwrap(),
    );
    std::fs::write(bad_json.join("adapter_config.json"), "{\"r\": 8,").unwrap();
    case(
        "adapter_config.json cut short",
        generate_with(&bad_json),
        &["adapter_config.json"],
    );
    case(
        "config.json num_layers = 10^9 (params allocates nothing)",
        s(&[
            "params",
            "--model",
            &path(&config_with(
                &d("layers"),
                "num_layers",
                serde_json::json!(1_000_000_000u64),
            )),
        ]),
        &["num_layers is 1000000000"],
    );
    case(
        "config.json vocab_size = 10^13",
        s(&[
            "params",
            "--model",
            &path(&config_with(
                &d("vocab"),
                "vocab_size",
                serde_json::json!(10_000_000_000_000u64),
            )),
        ]),
        &["config.json", "parameters"],
    );
    case(
        "config.json d_model as a string",
        s(&[
            "params",
            "--model",
            &path(&config_with(
                &d("dtype"),
                "d_model",
                serde_json::json!("512"),
            )),
        ]),
        &["config.json", "field `d_model`"],
    );

    // ---- training data ----
    let data = d("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("array.jsonl"),
        "{\"text\": [\"a\", \"b\"], \"label\": \"complaint\"}\n",
    )
    .unwrap();
    case(
        "JSONL text given as an array",
        train(&data.join("array.jsonl"), &d("out-array"), &[]),
        &["array.jsonl:1", "text", "an array"],
    );
    std::fs::write(
        data.join("object.jsonl"),
        "{\"text\": \"late\", \"label\": {\"x\": 1}}\n",
    )
    .unwrap();
    case(
        "JSONL label given as an object",
        train(&data.join("object.jsonl"), &d("out-object"), &[]),
        &["object.jsonl", "label", "an object"],
    );
    std::fs::write(data.join("quote.csv"), "text,label\n\"late bus,complaint\n").unwrap();
    case(
        "CSV with an unterminated quote",
        train(&data.join("quote.csv"), &d("out-quote"), &[]),
        &["quote.csv", "unterminated quoted field"],
    );
    mkfifo(&data.join("fifo.jsonl"));
    case(
        "FIFO as the data file",
        train(&data.join("fifo.jsonl"), &d("out-fifo"), &[]),
        &["fifo.jsonl", "regular file"],
    );
    std::fs::write(data.join("empty.jsonl"), "\n\n").unwrap();
    case(
        "data file with no examples",
        train(&data.join("empty.jsonl"), &d("out-empty"), &[]),
        &["empty.jsonl", "no examples"],
    );

    // ---- flags ----
    let good = complaints().join("train.jsonl");
    for (flag, value, expect) in [
        ("--batch-size", "0", &["--batch-size"][..]),
        (
            "--gradient-accumulation-steps",
            "0",
            &["--gradient-accumulation-steps"],
        ),
        ("--max-steps", "0", &["--max-steps"]),
        ("--max-source-length", "0", &["--max-source-length"]),
        ("--learning-rate", "-1", &["--learning-rate"]),
        ("--max-grad-norm", "nan", &["--max-grad-norm"]),
        ("--lora-r", "1000000000", &["--lora-r", "GiB"]),
        ("--lora-dropout", "1.5", &["--lora-dropout"]),
    ] {
        let out = d(&format!("out{flag}"));
        let args = train(&good, &out, &[&format!("{flag}={value}")]);
        case("bad training flag", args, expect);
    }
    case(
        "a training batch of 100000 x 100000 tokens",
        train(
            &good,
            &d("out-huge-batch"),
            &["--batch-size=100000", "--max-source-length=100000"],
        ),
        &["GiB", "--batch-size", "--max-source-length"],
    );
    // Eight inputs of 20,000 words: the attention scores alone are hundreds of GB.
    let mut long = s(&["forward", "--model", &path(&mt5()), "--out"]);
    long.push(path(&d("long.safetensors")));
    for _ in 0..8 {
        long.push("--text".into());
        long.push("word ".repeat(20_000));
    }
    case(
        "forward over eight 20,000-word inputs",
        long,
        &["GiB", "8 input(s)", "--text"],
    );
    case(
        "decoder id past the vocabulary",
        s(&[
            "forward",
            "--model",
            &path(&mt5()),
            "--text",
            "the bus is late",
            "--decoder-input-ids",
            "99999",
            "--out",
            &path(&d("forward.safetensors")),
        ]),
        &["99999", "vocab"],
    );

    let mut failures = Vec::new();
    for c in &cases {
        let (code, text) = run(&c.args);
        let mut why = Vec::new();
        if code != Some(1) {
            why.push(format!("exit status {code:?}, expected 1"));
        }
        for e in c.expect {
            if !text.contains(e) {
                why.push(format!("the message does not contain {e:?}"));
            }
        }
        for bad in ["panicked", "RUST_BACKTRACE", "memory allocation of"] {
            if text.contains(bad) {
                why.push(format!("the output contains {bad:?}"));
            }
        }
        let left = temporaries(&base);
        if !left.is_empty() {
            why.push(format!("temporaries left: {left:?}"));
        }
        if marker.exists() {
            why.push("the payload ran: the marker file exists".into());
        }
        if !why.is_empty() {
            failures.push(format!(
                "{}: {}\n    output: {}",
                c.name,
                why.join("; "),
                text.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    std::fs::remove_dir_all(&base).ok();
}
