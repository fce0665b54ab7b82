//! The pickle gate in front of PyTorch `.bin` checkpoints, against hand-built hostile pickles:
//! globals named through the memo, memo-clone bombs, deep nesting, and tensors larger than their
//! storage. Every pickle here is written byte by byte; none is ever executed.

use std::io::Write;
use std::path::{Path, PathBuf};

use peft_io::pickle::{
    GateError, MAX_DEPTH, MAX_ELEMENTS, MAX_MEMO, check_pickle, check_torch_zip,
};
use peft_io::{IoError, TensorSource};

#[path = "support/pickle.rs"]
mod pickle;
use pickle::{P, torch_zip};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-io-gate-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn gate_err(data: &[u8]) -> String {
    match check_pickle(data) {
        Ok(()) => panic!(
            "pickle accepted: {:?}",
            String::from_utf8_lossy(&data[..data.len().min(120)])
        ),
        Err(e) => e.to_string(),
    }
}

fn bin_err(path: &Path) -> String {
    match TensorSource::pytorch(path) {
        Ok(_) => panic!("{} accepted", path.display()),
        Err(e) => e.to_string(),
    }
}

// ---- 7: globals named through the memo ----

/// Puts `os` and `system` in the memo, pops them, pushes the literal strings of an allowed
/// global, then fetches `os` and `system` back from the memo for STACK_GLOBAL: Python resolves
/// `os.system` and calls it; a gate that only remembers the last two literals sees
/// `collections.OrderedDict`.
fn memo_decoy(put: &dyn Fn(P, u32) -> P, get: &dyn Fn(P, u32) -> P) -> Vec<u8> {
    let p = P::proto(4).short_str("os");
    let p = put(p, 0).short_str("system");
    let p = put(p, 1)
        .op(b"00")
        .short_str("collections")
        .short_str("OrderedDict");
    let p = get(p, 0);
    get(p, 1)
        .op(&[0x93])
        .short_str("touch /tmp/peft-rs-pwned")
        .op(&[0x85, b'R'])
        .stop()
}

#[test]
fn stack_global_names_from_the_memo_are_resolved() {
    type Op = fn(P, u32) -> P;
    let binput: Op = |p, i| p.op(&[b'q', i as u8]);
    let binget: Op = |p, i| p.op(&[b'h', i as u8]);
    let long_binput: Op = |p, i| p.op(b"r").op(&i.to_le_bytes());
    let long_binget: Op = |p, i| p.op(b"j").op(&i.to_le_bytes());
    let memoize: Op = |p, _| p.op(&[0x94]);
    let text_put: Op = |p, i| p.op(format!("p{i}\n").as_bytes());
    let text_get: Op = |p, i| p.op(format!("g{i}\n").as_bytes());
    let cases: [(&str, Op, Op); 6] = [
        ("BINPUT/BINGET", binput, binget),
        ("LONG_BINPUT/LONG_BINGET", long_binput, long_binget),
        ("MEMOIZE/BINGET", memoize, binget),
        ("MEMOIZE/LONG_BINGET", memoize, long_binget),
        ("PUT/GET", text_put, text_get),
        ("BINPUT/GET", binput, text_get),
    ];
    for (what, put, get) in cases {
        let pickle = memo_decoy(&put, &get);
        let err = gate_err(&pickle);
        assert!(err.contains("refused global `os.system`"), "{what}: {err}");
        assert_eq!(
            check_pickle(&pickle),
            Err(GateError::Global {
                opcode: "STACK_GLOBAL",
                module: "os".into(),
                name: "system".into()
            }),
            "{what}"
        );
    }

    // The same through a torch zip: refused with the file, the member and the global named.
    let d = tmpdir("memo-global");
    let path = d.join("pytorch_model.bin");
    torch_zip(&path, &memo_decoy(&binput, &binget), &[]);
    let err = bin_err(&path);
    assert!(
        err.contains("pytorch_model.bin")
            && err.contains("archive/data.pkl")
            && err.contains("refused global `os.system`"),
        "{err}"
    );
}

#[test]
fn memoized_allowed_names_still_resolve() {
    // Protocol 4 reuses memoized module strings: `torch.FloatStorage` then `torch.HalfStorage`
    // with `torch` fetched from the memo. Nothing is called, so the gate accepts it.
    let ok = P::proto(4)
        .short_str("torch")
        .op(&[0x94])
        .short_str("FloatStorage")
        .op(&[0x94, 0x93, 0x94])
        .op(&[b'h', 0])
        .short_str("HalfStorage")
        .op(&[0x93, 0x86])
        .stop();
    check_pickle(&ok).unwrap();
}

#[test]
fn globals_the_gate_cannot_resolve_are_refused() {
    // STACK_GLOBAL whose module is bytes, not a string (Python refuses it too, but the gate must
    // not guess).
    let bytes_module = P::proto(4)
        .op(&[b'C', 2])
        .op(b"os")
        .short_str("system")
        .op(&[0x93])
        .stop();
    let err = gate_err(&bytes_module);
    assert!(err.contains("STACK_GLOBAL"), "{err}");

    // A module given as an escaped protocol-0 string that the gate does not decode.
    let escaped = P::proto(2)
        .op(b"V\\u006fs\n")
        .short_str("system")
        .op(&[0x93])
        .stop();
    let err = gate_err(&escaped);
    assert!(err.contains("STACK_GLOBAL"), "{err}");

    // Names that are the results of calls, not strings.
    let computed = P::proto(4)
        .global("collections", "OrderedDict")
        .op(b")R")
        .short_str("system")
        .op(&[0x93])
        .stop();
    let err = gate_err(&computed);
    assert!(err.contains("STACK_GLOBAL"), "{err}");

    // INST imports its class by name: refused with the name.
    let inst = P::proto(0)
        .op(b"(S'touch /tmp/peft-rs-pwned'\nios\nsystem\n")
        .stop();
    let err = gate_err(&inst);
    assert!(err.contains("`os.system`"), "{err}");

    // An allowed global that is not a constructor is never called (REDUCE, OBJ, NEWOBJ).
    let calls = [
        P::proto(2)
            .global("torch", "FloatStorage")
            .int(1 << 40)
            .op(&[0x85, b'R'])
            .stop(),
        P::proto(2)
            .op(b"(")
            .global("torch", "FloatStorage")
            .int(1 << 40)
            .op(b"o")
            .stop(),
        P::proto(2)
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b")")
            .op(&[0x81])
            .stop(),
    ];
    for p in calls {
        let err = gate_err(&p);
        assert!(err.contains("refused"), "{err}");
    }

    // Globals with dotted names are refused even under an allowed module.
    let dotted = P::proto(4)
        .short_str("torch")
        .short_str("serialization.os.FakeStorage")
        .op(&[0x93])
        .stop();
    let err = gate_err(&dotted);
    assert!(
        err.contains("refused global `torch.serialization.os.FakeStorage`"),
        "{err}"
    );
}

// ---- 8: budgets ----

/// 242 bytes whose unpickled object (as a parser that copies memo entries builds it) has about
/// 2^26 elements: a list memoized, then 26 times `[memo[0], memo[0]]` memoized over it.
fn clone_bomb_list() -> Vec<u8> {
    P::proto(2)
        .op(b"]q\x00")
        .rep(b"(h\x00h\x00lq\x000", 26)
        .op(b"h\x00")
        .stop()
}

/// The same growth through APPEND: `memo[0].append(memo[0])`, memoized again.
fn clone_bomb_append() -> Vec<u8> {
    P::proto(2)
        .op(b"]q\x00")
        .rep(b"h\x00h\x00aq\x000", 30)
        .op(b"h\x00")
        .stop()
}

/// And through DUP: `x = memo[0]; x.append(x)`.
fn clone_bomb_dup() -> Vec<u8> {
    P::proto(2)
        .op(b"]q\x00")
        .rep(b"h\x002aq\x000", 30)
        .op(b"h\x00")
        .stop()
}

#[test]
fn memo_clone_bombs_are_refused() {
    for (what, bomb) in [
        ("LIST", clone_bomb_list()),
        ("APPEND", clone_bomb_append()),
        ("DUP", clone_bomb_dup()),
    ] {
        assert!(bomb.len() < 256, "{what}: {} bytes", bomb.len());
        let err = gate_err(&bomb);
        assert!(err.contains("elements"), "{what}: {err}");
        assert!(
            matches!(check_pickle(&bomb), Err(GateError::Limit { limit, .. }) if limit == MAX_ELEMENTS),
            "{what}"
        );
    }
    // Through a checkpoint: refused by the gate, before burn-store's parser copies anything.
    let d = tmpdir("bomb");
    let path = d.join("pytorch_model.bin");
    torch_zip(&path, &clone_bomb_list(), &[]);
    let err = bin_err(&path);
    assert!(err.contains("elements"), "{err}");
}

#[test]
fn deep_nesting_is_refused() {
    const N: usize = 1_000_000;
    let cases = [
        // ]]]...]aaa...a: each list appended to the one below it
        (
            "EMPTY_LIST/APPEND",
            P::proto(2).rep(b"]", N).rep(b"a", N - 1).stop(),
        ),
        // (((...(lll...l: MARK then LIST, nested
        ("MARK/LIST", P::proto(2).rep(b"(", N).rep(b"l", N).stop()),
        // N then TUPLE1 a million times
        ("TUPLE1", P::proto(2).op(b"N").rep(&[0x85], N).stop()),
        // a dict nested in a dict ...
        (
            "SETITEM",
            P::proto(2)
                .rep(b"}X\x01\x00\x00\x00k", N)
                .op(b"N")
                .rep(b"s", N)
                .stop(),
        ),
    ];
    for (what, p) in cases {
        let err = gate_err(&p);
        assert!(err.contains("nesting depth"), "{what}: {err}");
        assert!(
            matches!(check_pickle(&p), Err(GateError::Limit { limit, .. }) if limit == MAX_DEPTH as u64),
            "{what}"
        );
    }
    // Nesting up to the limit is fine.
    let ok = P::proto(2)
        .rep(b"]", MAX_DEPTH)
        .rep(b"a", MAX_DEPTH - 1)
        .stop();
    check_pickle(&ok).unwrap();
    let d = tmpdir("deep");
    let path = d.join("pytorch_model.bin");
    torch_zip(&path, &P::proto(2).rep(b"(", N).rep(b"l", N).stop(), &[]);
    let err = bin_err(&path);
    assert!(err.contains("nesting depth"), "{err}");
}

#[test]
fn memo_size_is_bounded() {
    // One value put under 5 million distinct memo keys (25 MB of LONG_BINPUT).
    let mut p = P::proto(2).op(b"N");
    for i in 0..5_000_000u32 {
        p = p.op(b"r").op(&i.to_le_bytes());
    }
    let p = p.stop();
    let err = gate_err(&p);
    assert!(err.contains("memo"), "{err}");
    assert!(
        matches!(check_pickle(&p), Err(GateError::Limit { limit, .. }) if limit == MAX_MEMO as u64)
    );
}

// ---- 9: tensors larger than their storage ----

/// `{key: tensor}` in a zip, with one storage `0` of `storage_bytes` bytes.
fn one_tensor_zip(
    name: &str,
    key: &str,
    offset: i64,
    shape: &[i64],
    stride: &[i64],
    storage_bytes: usize,
) -> PathBuf {
    let pickle = P::proto(2)
        .op(b"}")
        .str(key)
        .tensor("0", (storage_bytes / 4) as i64, offset, shape, stride)
        .op(b"s")
        .stop();
    let d = tmpdir(name);
    let path = d.join("pytorch_model.bin");
    let values: Vec<f32> = (0..storage_bytes / 4).map(|i| i as f32).collect();
    torch_zip(&path, &pickle, &[("0", f32_bytes(&values))]);
    path
}

#[test]
fn tensor_larger_than_its_storage_is_refused_before_allocating() {
    // 100000 x 100000 f32 (40 GB) over a 16-byte storage.
    let path = one_tensor_zip(
        "huge",
        "encoder.weight",
        0,
        &[100_000, 100_000],
        &[100_000, 1],
        16,
    );
    match TensorSource::pytorch(&path) {
        Err(IoError::PickleRefused { member, source, .. }) => {
            assert_eq!(member, "archive/data.pkl");
            assert_eq!(
                *source,
                GateError::TensorOutOfBounds {
                    key: "encoder.weight".into(),
                    shape: vec![100_000, 100_000],
                    storage: "archive/data/0".into(),
                    needed: 40_000_000_000,
                    available: 16,
                }
            );
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("accepted"),
    }
    let err = bin_err(&path);
    assert!(
        err.contains("pytorch_model.bin")
            && err.contains("`encoder.weight`")
            && err.contains("[100000, 100000]")
            && err.contains("40000000000 bytes")
            && err.contains("16 bytes"),
        "{err}"
    );

    // The storage offset pushes a fitting shape past the end: 4 elements from element 1 of 4.
    let path = one_tensor_zip("offset", "w", 1, &[2, 2], &[2, 1], 16);
    let err = bin_err(&path);
    assert!(
        err.contains("`w`") && err.contains("20 bytes") && err.contains("16 bytes"),
        "{err}"
    );

    // Strides reach past the end: a [2, 2] view with row stride 4 touches element 5.
    let path = one_tensor_zip("stride", "w", 0, &[2, 2], &[4, 1], 16);
    let err = bin_err(&path);
    assert!(
        err.contains("`w`") && err.contains("24 bytes") && err.contains("16 bytes"),
        "{err}"
    );

    // A shape whose element count overflows, and a negative dimension.
    let path = one_tensor_zip("overflow", "w", 0, &[1 << 62, 1 << 62], &[1 << 62, 1], 16);
    let err = bin_err(&path);
    assert!(err.contains("`w`") && err.contains("overflows"), "{err}");
    let path = one_tensor_zip("negative", "w", 0, &[-1, 4], &[4, 1], 16);
    let err = bin_err(&path);
    assert!(err.contains("`w`"), "{err}");

    // The key of a nested state dict is the dotted path burn-store would give it.
    let pickle = P::proto(2)
        .op(b"}")
        .str("model")
        .op(b"}")
        .str("w")
        .tensor("0", 4, 0, &[8, 8], &[8, 1])
        .op(b"ss")
        .stop();
    let d = tmpdir("nested");
    let path = d.join("pytorch_model.bin");
    torch_zip(&path, &pickle, &[("0", f32_bytes(&[0.0; 4]))]);
    let err = bin_err(&path);
    assert!(
        err.contains("`model.w`") && err.contains("256 bytes"),
        "{err}"
    );

    // A storage that is not in the zip at all.
    let pickle = P::proto(2)
        .op(b"}")
        .str("w")
        .tensor("7", 4, 0, &[2, 2], &[2, 1])
        .op(b"s")
        .stop();
    let d = tmpdir("missing");
    let path = d.join("pytorch_model.bin");
    torch_zip(&path, &pickle, &[("0", f32_bytes(&[0.0; 4]))]);
    let err = bin_err(&path);
    assert!(err.contains("`w`") && err.contains("missing"), "{err}");
}

#[test]
fn tensors_that_fit_their_storage_load() {
    // Exactly fitting, and a view at an offset inside a larger storage.
    let path = one_tensor_zip("fits", "w", 0, &[2, 3], &[3, 1], 24);
    let src = TensorSource::pytorch(&path).unwrap();
    let (shape, values) = src.get_f32("w").unwrap().unwrap();
    assert_eq!(shape, vec![2, 3]);
    assert_eq!(values, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let path = one_tensor_zip("view", "w", 2, &[2], &[1], 24);
    let src = TensorSource::pytorch(&path).unwrap();
    assert_eq!(
        src.get_f32("w").unwrap().unwrap(),
        (vec![2], vec![2.0, 3.0])
    );
}

#[test]
fn zero_element_tensors_load_empty() {
    // burn-store reads max(1, elements) values for a tensor, which does not match a shape
    // with a zero dimension.
    for (name, shape, stride, bytes) in [
        ("empty-storage", [0i64, 4], [4i64, 1], 0),
        ("empty-view", [0, 4], [4, 1], 16),
    ] {
        let path = one_tensor_zip(name, "w", 0, &shape, &stride, bytes);
        let src = TensorSource::pytorch(&path).unwrap();
        assert_eq!(
            src.get_f32("w").unwrap().unwrap(),
            (vec![0, 4], Vec::<f32>::new())
        );
    }
}

/// Overwrites the uncompressed size of `entry` in the zip's central directory.
fn patch_central_size(path: &Path, entry: &str, size: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    let sig = [0x50, 0x4b, 0x01, 0x02];
    let mut patched = false;
    for i in 0..bytes.len().saturating_sub(46) {
        if bytes[i..i + 4] != sig {
            continue;
        }
        let name_len = u16::from_le_bytes([bytes[i + 28], bytes[i + 29]]) as usize;
        if bytes.get(i + 46..i + 46 + name_len) == Some(entry.as_bytes()) {
            bytes[i + 24..i + 28].copy_from_slice(&size.to_le_bytes());
            patched = true;
        }
    }
    assert!(patched, "{entry} not found");
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn storage_entries_must_be_stored_with_honest_sizes() {
    // A storage whose central-directory size claims 4 GB in a file of a few hundred bytes.
    let path = one_tensor_zip("lying", "w", 0, &[2, 2], &[2, 1], 16);
    patch_central_size(&path, "archive/data/0", 0xffff_fff0);
    let err = bin_err(&path);
    assert!(err.contains("archive/data/0"), "{err}");

    // A compressed entry (torch never compresses; a deflated entry can expand without bound).
    let d = tmpdir("deflated");
    let path = d.join("pytorch_model.bin");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let deflated = stored.compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("archive/data.pkl", stored).unwrap();
    let pickle = P::proto(2)
        .op(b"}")
        .str("w")
        .tensor("0", 4, 0, &[4], &[1])
        .op(b"s")
        .stop();
    zip.write_all(&pickle).unwrap();
    zip.start_file("archive/data/0", deflated).unwrap();
    zip.write_all(&[0u8; 16]).unwrap();
    zip.finish().unwrap();
    let err = bin_err(&path);
    assert!(
        err.contains("archive/data/0") && err.contains("compressed"),
        "{err}"
    );
}

// ---- real checkpoints keep loading ----

#[test]
fn fixture_checkpoints_pass_the_gate_and_load() {
    let mut bins = Vec::new();
    let mut dirs = vec![fixtures()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "bin") {
                bins.push(p);
            }
        }
    }
    bins.sort();
    assert!(bins.len() >= 6, "{bins:?}");
    for b in &bins {
        let hostile = b
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("hostile_");
        let gate = check_torch_zip(b);
        if hostile {
            assert!(gate.is_err(), "{} passed the gate", b.display());
            continue;
        }
        gate.unwrap_or_else(|e| panic!("{e}"));
        let src = TensorSource::pytorch(b).unwrap_or_else(|e| panic!("{e}"));
        let names = src.names();
        assert!(!names.is_empty(), "{}", b.display());
        for n in names {
            let (shape, values) = src.get_f32(&n).unwrap().unwrap();
            assert_eq!(shape.iter().product::<usize>(), values.len(), "{n}");
        }
    }
}

/// A state dict pickled the way `torch.save` does it (protocol 2, every object memoized,
/// repeated strings and globals fetched from the memo), with `n` tensors of shape `[2, 2]`,
/// tensor `i` in storage `i`.
fn torch_like_state_dict(n: usize) -> Vec<u8> {
    let mut memo = 0u32;
    let mut next = || {
        memo += 1;
        memo - 1
    };
    let od = next();
    let rebuild = next();
    let storage = next();
    let float = next();
    let cpu = next();
    let mut p = P::proto(2)
        .global("collections", "OrderedDict")
        .put(od)
        .op(b")R")
        .put(next())
        .op(b"(");
    for i in 0..n {
        let key = format!("encoder.layer.{i}.weight");
        p = p.str(&key).put(next());
        p = if i == 0 {
            p.global("torch._utils", "_rebuild_tensor_v2")
                .put(rebuild)
                .op(b"((")
                .str("storage")
                .put(storage)
                .global("torch", "FloatStorage")
                .put(float)
                .str(&i.to_string())
                .put(next())
                .str("cpu")
                .put(cpu)
        } else {
            p.get(rebuild)
                .op(b"((")
                .get(storage)
                .get(float)
                .str(&i.to_string())
                .put(next())
                .get(cpu)
        };
        p = p
            .int(4)
            .op(b"t")
            .put(next())
            .op(b"QK\x00K\x02K\x02\x86")
            .put(next())
            .op(b"K\x02K\x01\x86")
            .put(next())
            .op(&[0x89])
            .get(od)
            .op(b")R")
            .put(next())
            .op(b"tR")
            .put(next());
        if i % 1000 == 999 {
            p = p.op(b"u(");
        }
    }
    p.op(b"u").stop()
}

#[test]
fn large_state_dicts_pass_the_budgets() {
    // 150,000 tensors, far more than any single checkpoint file holds.
    let big = torch_like_state_dict(150_000);
    check_pickle(&big).unwrap_or_else(|e| panic!("{e}"));

    // 3,000 tensors through a real zip and burn-store.
    let n = 3000;
    let pickle = torch_like_state_dict(n);
    let storages: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| (i.to_string(), f32_bytes(&[i as f32, 1.0, 2.0, 3.0])))
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = storages
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let d = tmpdir("many");
    let path = d.join("pytorch_model.bin");
    torch_zip(&path, &pickle, &refs);
    let src = TensorSource::pytorch(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(src.names().len(), n);
    let (shape, values) = src.get_f32("encoder.layer.2999.weight").unwrap().unwrap();
    assert_eq!(shape, vec![2, 2]);
    assert_eq!(values, vec![2999.0, 1.0, 2.0, 3.0]);
}
