//! Writing pickles and torch zip checkpoints byte by byte, for tests of the pickle gate (here
//! and, through `#[path]`, in peft-cli's adversarial suite). Nothing here runs a pickle.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

/// A pickle under construction, one opcode at a time.
#[derive(Clone, Default)]
pub struct P(pub Vec<u8>);

impl P {
    pub fn proto(v: u8) -> Self {
        P(vec![0x80, v])
    }
    pub fn op(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    pub fn rep(mut self, bytes: &[u8], n: usize) -> Self {
        for _ in 0..n {
            self.0.extend_from_slice(bytes);
        }
        self
    }
    /// SHORT_BINUNICODE (protocol 4).
    pub fn short_str(self, s: &str) -> Self {
        assert!(s.len() < 256);
        self.op(&[0x8c, s.len() as u8]).op(s.as_bytes())
    }
    /// BINUNICODE (protocol 1+).
    pub fn str(self, s: &str) -> Self {
        self.op(b"X")
            .op(&(s.len() as u32).to_le_bytes())
            .op(s.as_bytes())
    }
    /// GLOBAL.
    pub fn global(self, module: &str, name: &str) -> Self {
        self.op(b"c")
            .op(module.as_bytes())
            .op(b"\n")
            .op(name.as_bytes())
            .op(b"\n")
    }
    /// BININT, or LONG1 for values outside i32.
    pub fn int(self, v: i64) -> Self {
        match i32::try_from(v) {
            Ok(v) => self.op(b"J").op(&v.to_le_bytes()),
            Err(_) => self.op(&[0x8a, 8]).op(&v.to_le_bytes()),
        }
    }
    pub fn put(self, i: u32) -> Self {
        match u8::try_from(i) {
            Ok(i) => self.op(&[b'q', i]),
            Err(_) => self.op(b"r").op(&i.to_le_bytes()),
        }
    }
    pub fn get(self, i: u32) -> Self {
        match u8::try_from(i) {
            Ok(i) => self.op(&[b'h', i]),
            Err(_) => self.op(b"j").op(&i.to_le_bytes()),
        }
    }
    /// `_rebuild_tensor_v2(persistent ('storage', torch.FloatStorage, key, 'cpu', numel),
    /// offset, shape, stride, False, OrderedDict())`, as `torch.save` writes it.
    pub fn tensor(self, key: &str, numel: i64, offset: i64, shape: &[i64], stride: &[i64]) -> Self {
        let mut p = self
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b"(")
            .op(b"(")
            .str("storage")
            .global("torch", "FloatStorage")
            .str(key)
            .str("cpu")
            .int(numel)
            .op(b"tQ")
            .int(offset)
            .op(b"(");
        for d in shape {
            p = p.int(*d);
        }
        p = p.op(b"t(");
        for s in stride {
            p = p.int(*s);
        }
        p.op(b"t")
            .op(&[0x89])
            .global("collections", "OrderedDict")
            .op(b")R")
            .op(b"tR")
    }
    pub fn stop(self) -> Vec<u8> {
        self.op(b".").0
    }
}

/// A torch zip checkpoint (all entries stored, as `torch.save` writes them).
pub fn torch_zip(path: &Path, pickle: &[u8], storages: &[(&str, Vec<u8>)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/byteorder", opts).unwrap();
    zip.write_all(b"little").unwrap();
    for (key, bytes) in storages {
        zip.start_file(format!("archive/data/{key}"), opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}
