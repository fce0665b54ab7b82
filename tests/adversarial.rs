//! Broken and hostile files, each refused with an error that names the file (and the key and
//! shapes where they apply), never a panic; and the legacy `.bin` format PEFT still writes, read
//! safely. Hostile pickles are made by `tests/fixtures/adversarial/make_fixtures.py`; broken
//! safetensors and configs are made here.

mod common;

use std::path::{Path, PathBuf};

use common::{B, Fixture, assert_close, fixture_path};
use peft::io::{IoError, TensorSource, from_pretrained, load_t5};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-adversarial-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mt5() -> peft::models::T5ForConditionalGeneration<B> {
    load_t5::<B>(&fixture_path("t5/mt5"), &Default::default())
        .unwrap()
        .0
}

/// The PEFT adapter's tensors as (name, dtype, shape, bytes).
fn adapter_tensors() -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(fixture_path("t5/mt5_lora/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// An adapter dir with PEFT's config and the given tensors.
fn adapter_dir(
    name: &str,
    tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
) -> PathBuf {
    let d = tmpdir(name);
    std::fs::copy(
        fixture_path("t5/mt5_lora/adapter_config.json"),
        d.join("adapter_config.json"),
    )
    .unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, dt, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        d.join("adapter_model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    d
}

fn load_err(dir: &Path) -> IoError {
    match from_pretrained(mt5(), dir, "default") {
        Ok(_) => panic!("{} should be refused", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn legacy_bin_adapter_loads_and_matches_peft() {
    let device = Default::default();
    let (peft, report) =
        from_pretrained(mt5(), &fixture_path("adversarial/mt5_lora_bin"), "default").unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    let fx = Fixture::load("t5/mt5_lora_outputs.safetensors");
    let out = peft.base_model.forward(
        fx.get_int("input_ids", &device),
        Some(fx.get_int("attention_mask", &device)),
        fx.get_int("decoder_input_ids", &device),
    );
    assert_close(
        out.logits,
        fx.get("logits", &device),
        1e-4,
        "adapter_model.bin logits",
    );
}

#[test]
fn hostile_pickles_are_refused_without_running_them() {
    let marker = Path::new("/tmp/peft-rs-pwned");
    let _ = std::fs::remove_file(marker);
    // Pickle protocol 2 names builtins `__builtin__`.
    for (file, global) in [
        ("hostile_reduce.bin", "posix.system"),
        ("hostile_eval.bin", "__builtin__.eval"),
    ] {
        let path = fixture_path(&format!("adversarial/{file}"));
        let err = match TensorSource::pytorch(&path) {
            Ok(_) => panic!("{file} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(file) && err.contains(&format!("refused global `{global}`")),
            "{err}"
        );
        // The same file as an adapter's legacy weights.
        let d = tmpdir(file);
        std::fs::copy(
            fixture_path("t5/mt5_lora/adapter_config.json"),
            d.join("adapter_config.json"),
        )
        .unwrap();
        std::fs::copy(&path, d.join("adapter_model.bin")).unwrap();
        let err = load_err(&d).to_string();
        assert!(
            err.contains("adapter_model.bin") && err.contains("refused global"),
            "{err}"
        );
    }
    assert!(!marker.exists(), "a hostile pickle was executed");
    // Not a zip at all (a raw pickle): refused, not parsed.
    let d = tmpdir("raw");
    std::fs::write(d.join("x.bin"), b"\x80\x02cposix\nsystem\nq\x00.").unwrap();
    let err = TensorSource::pytorch(&d.join("x.bin"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a torch zip checkpoint"), "{err}");
}

#[test]
fn broken_safetensors_files_are_refused_clearly() {
    let good = std::fs::read(fixture_path("t5/mt5_lora/adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good[8..8 + n]).unwrap().to_string();
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    cases.push(("empty", Vec::new(), "header too small"));
    let mut past = good.clone();
    past[..8].copy_from_slice(&(good.len() as u64 * 2).to_le_bytes());
    cases.push(("header length past the file", past, "invalid header length"));
    cases.push((
        "truncated data",
        good[..good.len() - 100].to_vec(),
        "incomplete metadata",
    ));
    let mut bad_json = good.clone();
    bad_json[8] = b'[';
    cases.push(("malformed header JSON", bad_json, "invalid JSON in header"));
    // overlapping offsets: point the second tensor at the first one's bytes
    let overlapped = {
        let mut v: serde_json::Value = serde_json::from_str(&header).unwrap();
        let obj = v.as_object_mut().unwrap();
        let mut keys: Vec<String> = obj
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect();
        keys.sort_by_key(|k| obj[k]["data_offsets"][0].as_u64().unwrap());
        let first = obj[&keys[0]]["data_offsets"].clone();
        obj.get_mut(&keys[1]).unwrap()["data_offsets"] = first;
        let h = serde_json::to_string(&v).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h.as_bytes());
        out.extend(&good[8 + n..]);
        out
    };
    cases.push((
        "overlapping offsets",
        overlapped,
        "invalid offset for tensor",
    ));
    for (what, bytes, reason) in cases {
        let d = tmpdir(&what.replace(' ', "-"));
        std::fs::copy(
            fixture_path("t5/mt5_lora/adapter_config.json"),
            d.join("adapter_config.json"),
        )
        .unwrap();
        std::fs::write(d.join("adapter_model.safetensors"), bytes).unwrap();
        let err = load_err(&d);
        let msg = err.to_string();
        assert!(matches!(err, IoError::Safetensors { .. }), "{what}: {msg}");
        assert!(
            msg.contains("adapter_model.safetensors: not a valid safetensors file"),
            "{what}: {msg}"
        );
        assert!(msg.contains(reason), "{what}: {msg}");
    }
}

#[test]
fn wrong_dtype_shape_missing_and_extra_tensors() {
    let t = adapter_tensors();
    // an integer tensor where weights belong
    let mut bad = t.clone();
    bad[0].1 = safetensors::Dtype::I32;
    let err = load_err(&adapter_dir("dtype", &bad)).to_string();
    assert!(
        err.contains(&format!("tensor `{}` has dtype I32", bad[0].0)),
        "{err}"
    );

    // a transposed lora_A: the key, expected and found shapes are named
    let mut shaped = t.clone();
    let i = shaped
        .iter()
        .position(|x| x.0.ends_with("lora_A.weight"))
        .unwrap();
    shaped[i].2.reverse();
    let err = load_err(&adapter_dir("shape", &shaped));
    match &err {
        IoError::ShapeMismatch {
            key,
            expected,
            found,
            ..
        } => {
            assert_eq!(key, &t[i].0);
            assert_eq!(expected, &t[i].2);
            assert_eq!(found, &shaped[i].2);
        }
        other => panic!("{other}"),
    }
    assert!(
        err.to_string()
            .contains("adapter_model.safetensors: shape mismatch for"),
        "{err}"
    );

    // a missing tensor is listed
    let missing: Vec<_> = t[1..].to_vec();
    let err = load_err(&adapter_dir("missing", &missing)).to_string();
    assert!(
        err.contains("missing 1 tensor(s)") && err.contains(&t[0].0),
        "{err}"
    );

    // an unexpected tensor is reported, and the adapter still loads
    let mut extra = t.clone();
    extra.push((
        "base_model.model.nonexistent.lora_A.weight".into(),
        safetensors::Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    let (_, report) = from_pretrained(mt5(), &adapter_dir("extra", &extra), "default").unwrap();
    assert_eq!(
        report.unused,
        vec!["base_model.model.nonexistent.lora_A.weight".to_string()]
    );
}

#[test]
fn bad_configs_and_wrong_architectures() {
    let t = adapter_tensors();
    let d = adapter_dir("json", &t);
    std::fs::write(d.join("adapter_config.json"), "{\"r\": 4,").unwrap();
    let err = load_err(&d).to_string();
    assert!(err.contains("adapter_config.json: invalid JSON"), "{err}");

    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("t5/mt5_lora/adapter_config.json")).unwrap(),
    )
    .unwrap();
    cfg["peft_type"] = "ADALORA".into();
    std::fs::write(d.join("adapter_config.json"), cfg.to_string()).unwrap();
    let err = load_err(&d).to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("peft_type \"ADALORA\""),
        "{err}"
    );
    // A known method whose fields are missing: the file and the field are named.
    cfg["peft_type"] = "PREFIX_TUNING".into();
    std::fs::write(d.join("adapter_config.json"), cfg.to_string()).unwrap();
    let err = load_err(&d).to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("num_virtual_tokens"),
        "{err}"
    );

    // A BERT adapter on a T5 model: its targets are not in the model.
    let err = load_err(&fixture_path("bert/bert_lora")).to_string();
    assert!(
        err.contains("not found in the base model") && err.contains("SelfAttention"),
        "{err}"
    );

    // A BERT directory loaded as T5.
    let err = load_t5::<B>(&fixture_path("bert/bert_cls"), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json")
            && err.contains("wrong model type: expected t5 or mt5, found \"bert\""),
        "{err}"
    );

    // A directory without weights.
    let d = tmpdir("noweights");
    std::fs::copy(fixture_path("t5/mt5/config.json"), d.join("config.json")).unwrap();
    let err = load_t5::<B>(&d, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no weights found"), "{err}");
}

#[test]
fn saves_are_atomic_and_leave_no_temporary_files() {
    let (peft, _) = from_pretrained(mt5(), &fixture_path("t5/mt5_lora"), "default").unwrap();
    let d = tmpdir("save");
    peft::io::save_pretrained(&peft, &d).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);
    // Saving over a path that is a file fails cleanly and names it.
    let f = d.join("blocked");
    std::fs::write(&f, b"x").unwrap();
    let err = peft::io::save_pretrained(&peft, &f)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("blocked"), "{err}");
}
