//! The one way peft-io opens a file for reading: only regular files (a directory, FIFO, device or
//! socket is refused with the path and what was found there, before anything blocks or reads),
//! and files read whole into memory have a size limit.

use std::fs::{File, Metadata};
use std::io::Read;
use std::path::Path;

use crate::error::{IoError, Result, io_err};

/// Largest JSON file read (`config.json`, `adapter_config.json`,
/// `model.safetensors.index.json`): 64 MiB, about a hundred times the largest sharded index.
pub const MAX_JSON_BYTES: u64 = 64 << 20;
/// Largest `tokenizer.json` (and other tokenizer file copied with a merged model): 256 MiB,
/// several times the largest published tokenizers (about 35 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// What kind of file `meta` describes, when it is not a regular one.
fn irregular_kind(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        return None;
    }
    if t.is_dir() {
        return Some("directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return Some("FIFO");
        }
        if t.is_char_device() {
            return Some("character device");
        }
        if t.is_block_device() {
            return Some("block device");
        }
        if t.is_socket() {
            return Some("socket");
        }
    }
    Some("unknown file type")
}

fn check_regular(path: &Path, meta: &Metadata) -> Result<()> {
    match irregular_kind(meta) {
        None => Ok(()),
        Some(kind) => Err(IoError::NotRegularFile {
            path: path.to_path_buf(),
            kind,
        }),
    }
}

/// Opens `path` for reading if it is a regular file (symlinks followed), and returns it with its
/// size. The path is checked before opening (opening a FIFO would block until a writer comes),
/// and the opened handle is checked again (the path may have been replaced in between).
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    check_regular(path, &meta)?;
    let file = File::open(path).map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    check_regular(path, &meta)?;
    Ok((file, meta.len()))
}

/// Reads the regular file `path` whole, refusing it when it is larger than `limit` bytes
/// (`what` names the kind of file in that error).
pub fn read_limited(path: &Path, limit: u64, what: &'static str) -> Result<Vec<u8>> {
    let (file, size) = open_regular(path)?;
    let too_large = |size| IoError::TooLarge {
        path: path.to_path_buf(),
        what,
        size,
        limit,
    };
    if size > limit {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // The file may grow after the size check: never read past the limit.
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_limited`] as UTF-8 text.
pub fn read_text(path: &Path, limit: u64, what: &'static str) -> Result<String> {
    let bytes = read_limited(path, limit, what)?;
    String::from_utf8(bytes).map_err(|e| IoError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
    })
}

/// A JSON file as text ([`MAX_JSON_BYTES`]).
pub fn read_json_text(path: &Path) -> Result<String> {
    read_text(path, MAX_JSON_BYTES, "a JSON file")
}

/// Parses the JSON `text` of `path` as a `T`; a field of the wrong type or value is named in the
/// error ([`IoError::JsonField`]).
pub fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let source = e.into_inner();
        if field.is_empty() || field == "." || source.is_syntax() || source.is_eof() {
            IoError::Json {
                path: path.to_path_buf(),
                source,
            }
        } else {
            IoError::JsonField {
                path: path.to_path_buf(),
                field,
                source,
            }
        }
    })
}
