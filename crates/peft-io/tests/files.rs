//! Every file peft-io reads is opened as a regular file: a directory, a FIFO or a device given
//! where a weights, config or tokenizer file belongs is refused at once, with the file named and
//! what was found there; files read whole into memory have size limits.
#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use peft_io::{IoError, TensorSource, TextTokenizer};

type B = burn::backend::NdArray<f32>;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-io-files-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

type Reader = fn(&Path) -> Result<(), IoError>;

/// Each reader of peft-io, with the file name it reads inside the directory it is given.
fn readers() -> Vec<(&'static str, &'static str, Reader)> {
    vec![
        ("safetensors", "model.safetensors", |d| {
            TensorSource::safetensors(&d.join("model.safetensors")).map(drop)
        }),
        ("model directory", "model.safetensors", |d| {
            peft_io::open_weights(d).map(drop)
        }),
        ("pytorch", "pytorch_model.bin", |d| {
            TensorSource::pytorch(&d.join("pytorch_model.bin")).map(drop)
        }),
        ("sharded index", "model.safetensors.index.json", |d| {
            TensorSource::sharded(&d.join("model.safetensors.index.json")).map(drop)
        }),
        ("adapter config", "adapter_config.json", |d| {
            peft_io::read_adapter_config(d).map(drop)
        }),
        ("AdapterHub config", "adapter_config.json", |d| {
            peft_io::adapterhub::read_config(d).map(drop)
        }),
        ("config.json", "config.json", |d| {
            peft_io::hf_model::read_json(&d.join("config.json")).map(drop)
        }),
        ("T5 config", "config.json", |d| {
            peft_io::hf_model::read_t5_config(d).map(drop)
        }),
        ("BERT config", "config.json", |d| {
            peft_io::hf_model::read_bert_config(d).map(drop)
        }),
        ("tokenizer", "tokenizer.json", |d| {
            TextTokenizer::from_path(d).map(drop)
        }),
        ("optimizer record", "optimizer.mpk", |d| {
            peft_io::checkpoint::load_record::<B, burn::tensor::Tensor<B, 1>>(
                &d.join("optimizer.mpk"),
                &Default::default(),
            )
            .map(drop)
        }),
    ]
}

/// Runs `read` on a thread; a reader still blocked after 20 s is a failure (and the FIFO is then
/// opened for writing and closed, so that the blocked thread ends).
fn run_bounded(what: &str, dir: &Path, fifo: Option<PathBuf>, read: Reader) -> String {
    let (tx, rx) = mpsc::channel();
    let d = dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(read(&d).map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(())) => panic!("{what}: accepted"),
        Ok(Err(e)) => e,
        Err(_) => {
            if let Some(f) = fifo {
                std::thread::spawn(move || drop(std::fs::OpenOptions::new().write(true).open(f)));
            }
            panic!("{what}: still blocked after 20 s");
        }
    }
}

#[test]
fn directories_are_refused_as_directories() {
    for (what, file, read) in readers() {
        let d = tmpdir(&format!("dir-{}", what.replace(' ', "-")));
        std::fs::create_dir(d.join(file)).unwrap();
        let err = run_bounded(what, &d, None, read);
        let shown = d.join(file).display().to_string();
        assert!(
            err.contains(&format!("{shown}: is a directory")),
            "{what}: {err}"
        );
    }
}

#[test]
fn fifos_are_refused_without_blocking() {
    for (what, file, read) in readers() {
        let d = tmpdir(&format!("fifo-{}", what.replace(' ', "-")));
        let fifo = d.join(file);
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let err = run_bounded(what, &d, Some(fifo.clone()), read);
        let shown = fifo.display().to_string();
        assert!(
            err.contains(&format!("{shown}: is not a regular file (FIFO)")),
            "{what}: {err}"
        );
    }
}

#[test]
fn devices_are_refused_without_reading_them() {
    for (what, file, read) in readers() {
        let d = tmpdir(&format!("dev-{}", what.replace(' ', "-")));
        std::os::unix::fs::symlink("/dev/zero", d.join(file)).unwrap();
        let err = run_bounded(what, &d, None, read);
        let shown = d.join(file).display().to_string();
        assert!(
            err.contains(&format!(
                "{shown}: is not a regular file (character device)"
            )),
            "{what}: {err}"
        );
    }
}

#[test]
fn files_read_whole_have_size_limits() {
    // A sparse 1 GiB + 1 file: larger than any whole-file read limit, and never read.
    let huge = (1u64 << 30) + 1;
    for (what, file, read) in readers() {
        if [".safetensors", ".mpk", ".bin"]
            .iter()
            .any(|x| file.ends_with(x))
        {
            continue; // memory-mapped, streamed, or (records) without a limit
        }
        let d = tmpdir(&format!("big-{}", what.replace(' ', "-")));
        let f = std::fs::File::create(d.join(file)).unwrap();
        f.set_len(huge).unwrap();
        drop(f);
        let err = run_bounded(what, &d, None, read);
        let shown = d.join(file).display().to_string();
        assert!(
            err.contains(&shown) && err.contains(&format!("{huge} bytes")),
            "{what}: {err}"
        );
        assert!(err.contains("limit"), "{what}: {err}");
    }
}
