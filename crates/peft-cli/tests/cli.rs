//! The `peft` binary as a user runs it, checked against transformers/PEFT outputs
//! (`tests/fixtures/t5/cli.json`, made by `tests/fixtures/t5/make_fixtures.py`) and the seed's
//! numbers.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    root().join("tests/fixtures/t5")
}

fn peft(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn cli_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("cli.json")).unwrap()).unwrap()
}

#[test]
fn params_prints_the_seed_line_for_mt0_large() {
    let (ok, out, err) = peft(&[
        "params",
        "--model",
        "mt0-large",
        "--lora-r",
        "8",
        "--lora-alpha",
        "32",
        "--lora-dropout",
        "0.1",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915"
    );
    // DoRA adds a magnitude per output of every target (144 q/v layers x 1024); PEFT 0.21.2
    // prints this line for the same config (on a meta-device mt0-large).
    let (ok, out, err) = peft(&[
        "params",
        "--model",
        "mt0-large",
        "--method",
        "dora",
        "--lora-r",
        "8",
        "--lora-alpha",
        "32",
        "--lora-dropout",
        "0.1",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "trainable params: 2,506,752 || all params: 1,232,088,064 || trainable%: 0.2035"
    );
    let (ok, out, _) = peft(&[
        "params",
        "--model",
        "bigscience/T0_3B",
        "--lora-r",
        "8",
        "--lora-alpha",
        "32",
    ]);
    assert!(ok);
    assert!(out.starts_with("trainable params: 4,718,592 ||"), "{out}");
}

#[test]
fn params_prints_adapterhub_counts_for_bert_large() {
    // AdapterHub's numbers (tests/fixtures/bottleneck/counts.json): bottleneck 64 in every layer.
    for (method, line) in [
        (
            "houlsby",
            "trainable params: 6,343,680 || all params: 341,485,568 || trainable%: 1.8577",
        ),
        (
            "pfeiffer",
            "trainable params: 3,171,840 || all params: 338,313,728 || trainable%: 0.9375",
        ),
    ] {
        let (ok, out, err) = peft(&["params", "--model", "bert-large", "--method", method]);
        assert!(ok, "{err}");
        assert_eq!(out.trim(), line, "{method}");
    }
    let (ok, _, err) = peft(&["params", "--model", "bert-large", "--method", "nope"]);
    assert!(!ok && err.contains("unknown --method"), "{err}");
}

#[test]
fn inspect_reads_adapterhub_and_ia3_dirs() {
    // Numbers are checked in tests/bottleneck_fixtures.rs; here the binary reads both formats.
    let dir = root().join("tests/fixtures/bottleneck");
    let (ok, out, err) = peft(&[
        "inspect",
        &dir.join("bert_houlsby_bin").display().to_string(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("bottleneck (AdapterHub)") && out.contains("attention, output"),
        "{out}"
    );
    assert!(out.contains("parameters:     3,312"), "{out}");
    let (ok, out, err) = peft(&["inspect", &dir.join("ia3_mt5").display().to_string()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("IA3 (PEFT)") && out.contains("parameters:     576"),
        "{out}"
    );
}

#[test]
fn bench_prints_one_json_line_with_the_torch_scripts_fields() {
    // A smoke test of `peft bench` at a tiny shape (timings are never asserted in tests; the
    // benchmark itself is `cargo xtask bench`).
    for w in ["lora-train", "infer-unmerged", "generate"] {
        let (ok, out, err) = peft(&[
            "bench",
            "--workload",
            w,
            "--warmup",
            "0",
            "--steps",
            "1",
            "--batch",
            "1",
            "--src-len",
            "4",
            "--tgt-len",
            "2",
            "--new-tokens",
            "2",
        ]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        for k in [
            "workload",
            "impl",
            "median_s",
            "tokens_per_s",
            "peak_rss_mib",
        ] {
            assert!(!v[k].is_null(), "{w}: {k} in {v}");
        }
        assert_eq!(v["impl"], "peft");
        // The same model as bench_torch.py builds: 76,961,152 base parameters, 344,064 LoRA.
        let lora = if w == "infer-base" { 0 } else { 344_064 };
        assert_eq!(v["params"], 76_961_152 + lora, "{w}");
    }
    // --paired-base: the bare base timed step for step beside the adapter.
    let tiny = [
        "--warmup",
        "0",
        "--steps",
        "3",
        "--batch",
        "1",
        "--src-len",
        "4",
        "--tgt-len",
        "2",
    ];
    let mut args = vec!["bench", "--workload", "infer-merged", "--paired-base"];
    args.extend(tiny);
    let (ok, out, err) = peft(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let (base, adapter) = (
        v["base_step_s"].as_array().unwrap(),
        v["step_s"].as_array().unwrap(),
    );
    assert_eq!((base.len(), adapter.len()), (3, 3), "{v}");
    for k in ["base_median_s", "vs_base"] {
        let x = v[k].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x > 0.0, "{k} in {v}");
    }
    // A merged adapter's model has the base's parameter count.
    assert_eq!(v["params"], 76_961_152);
    let mut args = vec!["bench", "--workload", "lora-train", "--paired-base"];
    args.extend(tiny);
    let (ok, _, err) = peft(&args);
    assert!(
        !ok && err.contains("--paired-base") && err.contains("lora-train"),
        "{err}"
    );
}

#[test]
fn generate_prints_what_transformers_decodes() {
    let fx = cli_json();
    for (case, adapter, beams, key) in [
        ("mt5", None, "1", "decoded"),
        ("mt5_lora", Some("mt5_lora"), "1", "decoded"),
        ("mt5_lora", Some("mt5_lora"), "2", "decoded_beam2"),
    ] {
        let texts: Vec<String> = serde_json::from_value(fx[case]["texts"].clone()).unwrap();
        let expected: Vec<String> = serde_json::from_value(fx[case][key].clone()).unwrap();
        let model = fixtures().join("mt5");
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--max-new-tokens".into(),
            "6".into(),
            "--num-beams".into(),
            beams.into(),
        ];
        if let Some(a) = adapter {
            args.push("--adapter".into());
            args.push(fixtures().join(a).display().to_string());
        }
        args.extend(texts.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, err) = peft(&args);
        assert!(ok, "{case}: {err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines, expected, "{case}");
    }
}

fn logits_from(file: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    (t.shape().to_vec(), le_f32(t.data()))
}

fn le_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn flatten(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(flatten).collect(),
        n => vec![n.as_f64().unwrap() as f32],
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    peft_core::check::max_abs_diff(a, b)
}

#[test]
fn forward_and_merge_match_peft() {
    let fx = cli_json();
    let tmp = std::env::temp_dir().join(format!("peft-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let texts: Vec<String> = serde_json::from_value(fx["mt5_lora"]["texts"].clone()).unwrap();
    let expected = flatten(&fx["mt5_lora"]["logits"]);
    let model = fixtures().join("mt5").display().to_string();
    let adapter = fixtures().join("mt5_lora").display().to_string();
    let out = tmp.join("out.safetensors").display().to_string();
    let mut args = vec![
        "forward",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--decoder-input-ids",
        "0,5,17",
        "--out",
        &out,
    ];
    for t in &texts {
        args.push("--text");
        args.push(t);
    }
    let (ok, _, err) = peft(&args);
    assert!(ok, "{err}");
    let (shape, ours) = logits_from(Path::new(&out));
    assert_eq!(shape, vec![3, 3, 96]);
    let d = max_diff(&ours, &expected);
    assert!(d < 1e-4, "forward with adapter vs PEFT: {d}");

    // merge writes a plain HF model dir whose outputs equal PEFT's adapted model.
    let merged = tmp.join("merged").display().to_string();
    let (ok, _, err) = peft(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--out",
        &merged,
    ]);
    assert!(ok, "{err}");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(Path::new(&merged).join(f).exists(), "{f} written");
    }
    let mut args = vec![
        "forward",
        "--model",
        &merged,
        "--decoder-input-ids",
        "0,5,17",
        "--out",
        &out,
    ];
    for t in &texts {
        args.push("--text");
        args.push(t);
    }
    let (ok, _, err) = peft(&args);
    assert!(ok, "{err}");
    let (_, merged_logits) = logits_from(Path::new(&out));
    let d = max_diff(&merged_logits, &expected);
    assert!(d < 1e-4, "merged model vs PEFT adapted: {d}");
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn errors_are_clear_and_not_panics() {
    let (ok, _, err) = peft(&["params", "--model", "nope"]);
    assert!(!ok);
    assert!(
        err.starts_with("error: `nope` is neither a preset"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    let (ok, _, err) = peft(&["inspect", "/nonexistent"]);
    assert!(
        !ok && err.contains("/nonexistent/adapter_config.json"),
        "{err}"
    );
    let (ok, _, err) = peft(&["generate", "--model", "/nonexistent", "hi"]);
    assert!(!ok && err.contains("/nonexistent/config.json"), "{err}");
}

#[test]
fn forward_on_real_minilm_matches_transformers() {
    let dir = common::minilm_dir();
    let tmp = std::env::temp_dir().join(format!(
        "peft-cli-minilm-{}.safetensors",
        std::process::id()
    ));
    let (d, o) = (dir.display().to_string(), tmp.display().to_string());
    let (ok, _, err) = peft(&[
        "forward",
        "--model",
        &d,
        "--out",
        &o,
        "--text",
        "This framework generates embeddings for each input sentence",
        "--text",
        "Sentences are passed as a list of string.",
        "--text",
        "The quick brown fox jumps over the lazy dog.",
    ]);
    assert!(ok, "{err}");
    let bytes = std::fs::read(&tmp).unwrap();
    let ours = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ours = ours.tensor("last_hidden_state").unwrap();
    let exp_bytes =
        std::fs::read(root().join("tests/fixtures/minilm/expected.safetensors")).unwrap();
    let exp = safetensors::SafeTensors::deserialize(&exp_bytes).unwrap();
    let exp = exp.tensor("last_hidden_state").unwrap();
    assert_eq!(ours.shape(), exp.shape());
    let f = |b: &[u8]| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<f32>>()
    };
    let d = max_diff(&f(ours.data()), &f(exp.data()));
    assert!(d < 1e-4, "MiniLM last_hidden_state vs transformers: {d}");
    std::fs::remove_file(&tmp).ok();
}

/// Copies a directory's files (one level) into `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn merge_never_overwrites_the_base_or_a_model_unasked() {
    let tmp = std::env::temp_dir().join(format!("peft-cli-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let model = tmp.join("mt5");
    copy_dir(&fixtures().join("mt5"), &model);
    let adapter = fixtures().join("mt5_lora");
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    let (m, a) = (model.display().to_string(), adapter.display().to_string());

    // Into the base's own directory: refused, the base untouched.
    let (ok, _, err) = peft(&["merge", "--model", &m, "--adapter", &a, "--out", &m]);
    assert!(!ok);
    assert!(
        err.contains("is the base model's directory") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        weights
    );
    // Inside the base or the adapter: refused even with --overwrite.
    let inside = model.join("sub").display().to_string();
    let (ok, _, err) = peft(&[
        "merge",
        "--model",
        &m,
        "--adapter",
        &a,
        "--out",
        &inside,
        "--overwrite",
    ]);
    assert!(
        !ok && err.contains("inside the base model directory"),
        "{err}"
    );
    let (ok, _, err) = peft(&[
        "merge",
        "--model",
        &m,
        "--adapter",
        &a,
        "--out",
        &a,
        "--overwrite",
    ]);
    assert!(!ok && err.contains("is the adapter directory"), "{err}");

    // A new directory works; a second merge into it is refused without --overwrite.
    let out = tmp.join("merged").display().to_string();
    let (ok, _, err) = peft(&["merge", "--model", &m, "--adapter", &a, "--out", &out]);
    assert!(ok, "{err}");
    let (ok, _, err) = peft(&["merge", "--model", &m, "--adapter", &a, "--out", &out]);
    assert!(!ok && err.contains("already holds a model"), "{err}");

    // --overwrite into the base's directory: swapped in complete, nothing left behind.
    let (ok, _, err) = peft(&[
        "merge",
        "--model",
        &m,
        "--adapter",
        &a,
        "--out",
        &m,
        "--overwrite",
    ]);
    assert!(ok, "{err}");
    assert_ne!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        weights
    );
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        std::fs::read(tmp.join("merged/model.safetensors")).unwrap(),
        "the swapped-in model is the merged one"
    );
    assert!(leftovers(&tmp).is_empty(), "{:?}", leftovers(&tmp));
    std::fs::remove_dir_all(&tmp).ok();
}

fn train_args<'a>(out: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<String> {
    let data = root().join("examples/data/complaints");
    let mut v: Vec<String> = [
        "train",
        "--model",
        "mt0-tiny",
        "--tokenizer",
        &data.join("tokenizer.json").display().to_string(),
        "--data",
        &data.join("train.jsonl").display().to_string(),
        "--output-dir",
        out,
        "--max-steps",
        steps,
        "--quiet",
        "--show-examples",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn peft_owned(args: &[String]) -> (bool, String, String) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    peft(&refs)
}

#[test]
fn bad_training_flags_are_refused_by_name() {
    let out = std::env::temp_dir().join(format!("peft-cli-flags-{}", std::process::id()));
    let o = out.display().to_string();
    for (flag, value, expect) in [
        ("--batch-size", "0", "--batch-size"),
        (
            "--gradient-accumulation-steps",
            "0",
            "--gradient-accumulation-steps",
        ),
        ("--epochs", "0", "--epochs"),
        ("--max-source-length", "0", "--max-source-length"),
        ("--max-target-length", "0", "--max-target-length"),
        ("--learning-rate=-1", "", "--learning-rate"),
        ("--max-grad-norm", "NaN", "--max-grad-norm"),
    ] {
        let mut extra = vec![flag];
        if !value.is_empty() {
            extra.push(value);
        }
        let (ok, _, err) = peft_owned(&train_args(&o, "2", &extra));
        assert!(!ok, "{flag} {value} accepted");
        assert!(err.contains(expect), "{flag} {value}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (ok, _, err) = peft_owned(&train_args(&o, "0", &[]));
    assert!(!ok && err.contains("--max-steps"), "{err}");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn a_second_run_into_a_locked_output_dir_is_refused_and_a_killed_runs_lock_is_not_stale() {
    let out = std::env::temp_dir().join(format!("peft-cli-lock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = out.display().to_string();
    let mut first = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(train_args(&o, "400", &["--save-steps", "1"]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first run holds the lock and has checkpointed once.
    let t0 = std::time::Instant::now();
    while !out.join("latest").exists() {
        assert!(
            t0.elapsed().as_secs() < 120,
            "the first run never checkpointed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let base = out.join("base_model/model.safetensors");
    let base_written = std::fs::metadata(&base).unwrap().modified().unwrap();
    let (ok, _, err) = peft_owned(&train_args(&o, "2", &["--seed", "99"]));
    assert!(!ok, "a second run into a locked directory must fail");
    // It was refused before writing anything: the first run's base is untouched.
    assert_eq!(
        std::fs::metadata(&base).unwrap().modified().unwrap(),
        base_written,
        "the refused run rewrote the first run's base model"
    );
    assert!(
        err.contains("in use by process") && err.contains(&first.id().to_string()),
        "{err}"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // The killed run's lock went with it: resuming works and finishes two steps later.
    let latest = std::fs::read_to_string(out.join("latest")).unwrap();
    let done: usize = latest
        .trim()
        .trim_start_matches("checkpoint-")
        .parse()
        .unwrap();
    let end = (done + 2).to_string();
    let resume =
        |from: &'static str| train_args(&o, &end, &["--resume", from, "--save-steps", "1"]);
    let (ok, stdout, err) = peft_owned(&resume("latest"));
    assert!(ok, "{err}");
    assert!(out.join("adapter_model.safetensors").exists(), "{stdout}");
    let adapter = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    // Resuming the finished run trains nothing and leaves the adapter alone.
    let (ok, stdout, err) = peft_owned(&resume("latest"));
    assert!(ok, "{err}");
    assert!(stdout.contains("nothing to train"), "{stdout}");
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        adapter
    );
    // A checkpoint named relative to the output directory resumes too.
    let (ok, stdout, err) = peft_owned(&resume("checkpoint-1"));
    assert!(ok, "{err}");
    assert!(!stdout.contains("nothing to train"), "{stdout}");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn out_of_range_ids_are_refused_not_a_panic() {
    let model = fixtures().join("mt5").display().to_string();
    let out = std::env::temp_dir().join(format!("peft-cli-ids-{}.safetensors", std::process::id()));
    let (ok, _, err) = peft(&[
        "forward",
        "--model",
        &model,
        "--text",
        "hello",
        "--decoder-input-ids",
        "99999",
        "--out",
        &out.display().to_string(),
    ]);
    assert!(!ok);
    assert!(
        err.contains(
            "--decoder-input-ids: token id 99999 is out of range for the model's vocab_size"
        ),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists());
}

#[test]
fn absurd_sizes_are_refused_with_numbers_before_allocating() {
    let out = std::env::temp_dir().join(format!("peft-cli-sizes-{}", std::process::id()));
    let o = out.display().to_string();
    let (ok, _, err) = peft_owned(&train_args(&o, "2", &["--lora-r", "1000000000"]));
    assert!(!ok);
    assert!(err.contains("GiB") && err.contains("--lora-r"), "{err}");
    assert!(!err.contains("memory allocation"), "{err}");
    // A config.json with a billion layers: refused when read, even by `params`.
    let model = out.join("huge");
    std::fs::create_dir_all(&model).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("mt5/config.json")).unwrap())
            .unwrap();
    config["num_layers"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let (ok, _, err) = peft(&["params", "--model", &model.display().to_string()]);
    assert!(!ok);
    assert!(err.contains("num_layers is 1000000000"), "{err}");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn a_long_prompt_is_truncated_with_a_warning() {
    let model = fixtures().join("mt5").display().to_string();
    let prompt = "word ".repeat(20_000);
    let (ok, _, err) = peft(&[
        "generate",
        "--model",
        &model,
        "--max-new-tokens",
        "2",
        &prompt,
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("truncated to --max-source-length 512"),
        "{err}"
    );
}

#[test]
fn merge_adapters_writes_what_peft_add_weighted_adapter_writes() {
    // tests/fixtures/merge: PEFT's `add_weighted_adapter(["a", "b"], [0.7, 0.3], "ties",
    // density=0.5)` on the same two adapters (make_fixtures.py).
    let merge = root().join("tests/fixtures/merge");
    let dir = std::env::temp_dir().join(format!("peft-merge-adapters-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("ties");
    let (a, b, o) = (
        merge.join("a").display().to_string(),
        merge.join("b").display().to_string(),
        out.display().to_string(),
    );
    let args = [
        "merge-adapters",
        "--adapter",
        &a,
        "--adapter",
        &b,
        "--weights",
        "0.7,0.3",
        "--combination-type",
        "ties",
        "--density",
        "0.5",
        "--out",
        &o,
    ];
    let (ok, stdout, err) = peft(&args);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("ties of 2 adapters") && stdout.contains("rank 4"),
        "{stdout}"
    );
    let read = |d: &Path| {
        let st = safetensors_map(&d.join("adapter_model.safetensors"));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
                .unwrap();
        (st, cfg)
    };
    let (got, cfg) = read(&out);
    let (want, want_cfg) = read(&merge.join("ties"));
    assert_eq!(cfg["r"], want_cfg["r"]);
    assert_eq!(cfg["lora_alpha"], want_cfg["lora_alpha"]);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, v) in &want {
        assert!(max_diff(&got[k], v) <= 1e-6, "{k}");
    }
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));

    // A finished adapter is not overwritten unasked; --overwrite replaces it.
    let (ok, _, err) = peft(&args);
    assert!(
        !ok && err.contains("already holds an adapter") && err.contains("--overwrite"),
        "{err}"
    );
    let mut again = args.to_vec();
    again.push("--overwrite");
    let (ok, _, err) = peft(&again);
    assert!(ok, "{err}");

    // Bad input: named, exit 1, nothing written.
    let bad = dir.join("bad").display().to_string();
    for (extra, needle) in [
        (vec!["--weights", "0.7"], "--weights has 1 values for 2"),
        (vec!["--combination-type", "ties"], "needs a density"),
        (
            vec!["--combination-type", "mean"],
            "expected one of svd, linear, cat",
        ),
        (
            vec!["--combination-type", "linear", "--weights", "1,nan"],
            "not a finite number",
        ),
    ] {
        let mut args = vec![
            "merge-adapters",
            "--adapter",
            &a,
            "--adapter",
            &b,
            "--out",
            &bad,
        ];
        args.extend(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_peft"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    assert!(!dir.join("bad").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

fn safetensors_map(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, le_f32(v.data())))
        .collect()
}

#[test]
fn params_prints_peft_prompt_learning_lines_for_mt0_large() {
    // tests/fixtures/prompt/counts.json: PEFT 0.21.2's print_trainable_parameters on a
    // meta-device mt0-large (make_fixtures.py), SEQ_2_SEQ_LM, 20 virtual tokens.
    let counts: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/prompt/counts.json")).unwrap(),
    )
    .unwrap();
    let base = [
        "params",
        "--model",
        "mt0-large",
        "--task-type",
        "SEQ_2_SEQ_LM",
    ];
    for (name, extra) in [
        ("prompt_tuning", vec!["--method", "prompt_tuning"]),
        (
            "p_tuning_mlp",
            vec!["--method", "p_tuning", "--encoder-hidden-size", "128"],
        ),
        (
            "p_tuning_lstm",
            vec![
                "--method",
                "p_tuning",
                "--encoder-hidden-size",
                "128",
                "--encoder-reparameterization-type",
                "LSTM",
            ],
        ),
        ("prefix_tuning", vec!["--method", "prefix_tuning"]),
        (
            "prefix_tuning_projection",
            vec![
                "--method",
                "prefix_tuning",
                "--prefix-projection",
                "--encoder-hidden-size",
                "512",
            ],
        ),
    ] {
        let mut args = base.to_vec();
        args.extend(extra);
        let (ok, out, err) = peft(&args);
        assert!(ok, "{name}: {err}");
        assert_eq!(out.trim(), counts[name].as_str().unwrap(), "{name}");
        if name.starts_with("prefix") {
            // Counted as PEFT creates it, with the reason it cannot be trained on T5.
            assert!(
                err.contains("cannot be trained") && err.contains("PEFT 0.21.2"),
                "{err}"
            );
        }
    }
}
