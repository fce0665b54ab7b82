//! A strict gate in front of PyTorch `.bin` checkpoints: every pickle in the zip is walked opcode
//! by opcode (nothing is executed), and the file is refused unless it only builds tensors.
//!
//! Allowed: the data opcodes of protocols 0-5, persistent ids (torch storages), and globals from
//! a short list (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`, `torch.*Storage`, `torch` dtypes). Any other global
//! (`os.system`, `builtins.eval`, ...), `INST`, extension codes, or a `STACK_GLOBAL` whose names
//! are not plain string literals is refused with the module and name in the error.

use std::io::Read;
use std::path::Path;

use crate::error::{IoError, Result};

const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
];

fn allowed(module: &str, name: &str) -> bool {
    ALLOWED_GLOBALS.contains(&(module, name))
        || (module == "torch"
            && (name.ends_with("Storage")
                || matches!(
                    name,
                    "float32"
                        | "float16"
                        | "bfloat16"
                        | "float64"
                        | "int64"
                        | "int32"
                        | "int8"
                        | "uint8"
                        | "bool"
                )))
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or("length overflow")?;
        let s = self.data.get(self.pos..end).ok_or("pickle truncated")?;
        self.pos = end;
        Ok(s)
    }
    fn uint(&mut self, n: usize) -> std::result::Result<usize, String> {
        let b = self.take(n)?;
        let mut v = 0u64;
        for (i, x) in b.iter().enumerate() {
            v |= (*x as u64) << (8 * i);
        }
        usize::try_from(v).map_err(|_| "length too large".to_string())
    }
    fn line(&mut self) -> std::result::Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or("unterminated line")?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| "non-UTF-8 text".to_string())
    }
}

/// Walks one pickle stream and refuses anything but tensor construction.
pub fn check_pickle(data: &[u8]) -> std::result::Result<(), String> {
    let mut r = Reader { data, pos: 0 };
    // The last two string literals pushed, for STACK_GLOBAL (memo puts between them are fine).
    let mut strings: Vec<Option<String>> = Vec::new();
    loop {
        let op = *r.take(1)?.first().expect("one byte");
        let mut pushed: Option<Option<String>> = Some(None);
        match op {
            b'.' => return Ok(()),
            // no argument
            b'(' | b'0' | b'1' | b'2' | b'N' | b'R' | b'a' | b'b' | b'd' | b'}' | b'e' | b'l'
            | b']' | b'o' | b's' | b't' | b')' | b'u' | b'Q' | 0x81 | 0x85 | 0x86 | 0x87 | 0x88
            | 0x89 | 0x8f | 0x90 | 0x91 | 0x92 | 0x97 | 0x98 => {}
            // memo operations keep the string history
            0x94 => pushed = None,
            b'q' | b'h' => {
                r.take(1)?;
                pushed = None;
            }
            b'r' | b'j' => {
                r.take(4)?;
                pushed = None;
            }
            b'p' | b'g' => {
                r.line()?;
                pushed = None;
            }
            // fixed-size arguments
            b'K' | 0x80 => {
                r.take(1)?;
            }
            b'M' => {
                r.take(2)?;
            }
            b'J' => {
                r.take(4)?;
            }
            b'G' | 0x95 => {
                r.take(8)?;
            }
            // length-prefixed data
            b'C' | 0x8a => {
                let n = r.uint(1)?;
                r.take(n)?;
            }
            b'U' | 0x8c => {
                let n = r.uint(1)?;
                let s = r.take(n)?;
                pushed = Some(std::str::from_utf8(s).ok().map(str::to_string));
            }
            b'X' | b'T' => {
                let n = r.uint(4)?;
                let s = r.take(n)?;
                pushed = Some(std::str::from_utf8(s).ok().map(str::to_string));
            }
            b'B' | 0x8b => {
                let n = r.uint(4)?;
                r.take(n)?;
            }
            0x8d => {
                let n = r.uint(8)?;
                let s = r.take(n)?;
                pushed = Some(std::str::from_utf8(s).ok().map(str::to_string));
            }
            0x8e | 0x96 => {
                let n = r.uint(8)?;
                r.take(n)?;
            }
            // newline-terminated text
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' => {
                r.line()?;
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                if !allowed(module, name) {
                    return Err(format!(
                        "refused global `{module}.{name}` (only tensor data is loaded)"
                    ));
                }
            }
            0x93 => {
                let n = strings.len();
                let (m, name) = match (n >= 2).then(|| (&strings[n - 2], &strings[n - 1])) {
                    Some((Some(m), Some(name))) => (m.clone(), name.clone()),
                    _ => return Err("refused STACK_GLOBAL with computed names".into()),
                };
                if !allowed(&m, &name) {
                    return Err(format!(
                        "refused global `{m}.{name}` (only tensor data is loaded)"
                    ));
                }
            }
            b'i' => return Err("refused INST opcode (old-style object construction)".into()),
            0x82..=0x84 => return Err("refused extension-registry opcode".into()),
            other => {
                return Err(format!(
                    "unknown pickle opcode 0x{other:02x} at byte {}",
                    r.pos - 1
                ));
            }
        }
        if let Some(p) = pushed {
            strings.push(p);
            if strings.len() > 2 {
                strings.remove(0);
            }
        }
    }
}

/// Checks every `*.pkl` member of a torch zip checkpoint with [`check_pickle`]. Files that are
/// not zips (the pre-1.6 raw pickle format) are refused.
pub fn check_torch_zip(path: &Path) -> Result<()> {
    let err = |reason: String| IoError::Pickle {
        path: path.to_path_buf(),
        reason,
    };
    let (file, _) = crate::files::open_regular(path)?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        err(format!(
            "not a torch zip checkpoint ({e}); legacy raw pickles are not read"
        ))
    })?;
    let mut seen = false;
    for i in 0..zip.len() {
        let mut member = zip.by_index(i).map_err(|e| err(e.to_string()))?;
        if !member.name().ends_with(".pkl") {
            continue;
        }
        seen = true;
        let name = member.name().to_string();
        let mut bytes = Vec::new();
        member
            .read_to_end(&mut bytes)
            .map_err(|e| err(format!("{name}: {e}")))?;
        check_pickle(&bytes).map_err(|e| err(format!("{name}: {e}")))?;
    }
    if !seen {
        return Err(err("no pickle inside the zip".into()));
    }
    Ok(())
}
