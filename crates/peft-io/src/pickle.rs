//! A strict gate in front of PyTorch `.bin` checkpoints: every pickle in the zip is walked opcode
//! by opcode (nothing is executed, nothing it describes is allocated), and the file is refused
//! unless it only builds tensors, within fixed budgets.
//!
//! The walk simulates the unpickler's stack, marks and memo, so every value is known as far as
//! the gate needs it: strings (so a `STACK_GLOBAL` whose module and name come from the memo is
//! resolved exactly as Python would), globals, integers and tuples (so each tensor's storage,
//! offset, shape and stride are known), containers (their size and depth).
//!
//! - Globals (`GLOBAL`, `STACK_GLOBAL`, `INST`) must be on a short list (`collections.OrderedDict`,
//!   `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter[_with_state]`,
//!   `torch.Size`, `torch.*Storage`, `torch` dtypes); anything else (`os.system`,
//!   `builtins.eval`, ...) is refused with its module and name. A `STACK_GLOBAL` whose module or
//!   name is not a string the gate can decode is refused.
//! - Only `OrderedDict`, the tensor rebuilds and `torch.Size` are ever called (`REDUCE`, `OBJ`,
//!   `INST`, `NEWOBJ`); extension codes, text persistent ids and out-of-band buffers are refused.
//! - Budgets: [`MAX_ELEMENTS`] elements in all (a memo reference counts as the size of what it
//!   refers to, as burn-store's parser copies it: memo-clone bombs are measured), nesting depth
//!   [`MAX_DEPTH`], [`MAX_MEMO`] memo entries, [`MAX_PICKLE_BYTES`] per pickle.
//! - Every `_rebuild_tensor_v2(storage, offset, shape, stride, ...)` is checked against the
//!   storage's byte size in the zip (shape x dtype size + offset, and the furthest element the
//!   strides reach), and refused with the tensor's key, its shape and both byte counts.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use crate::error::{IoError, Result};

/// Largest pickle read from a checkpoint zip: 256 MiB (a state dict of a million tensors
/// pickles to about 100 MB).
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Most elements a pickle may build, counting every memo fetch, memo put and `DUP` at the full
/// size of what it copies (burn-store's parser deep-copies there): 2^23 (8.4 million). A
/// `torch.save` state dict costs about 40 per tensor, so 200,000 tensors fit in one pickle;
/// burn-store then holds at most about this many of its 160-byte objects (1.3 GB) where a
/// memo-clone bomb would make it build billions.
pub const MAX_ELEMENTS: u64 = 1 << 23;
/// Deepest nesting of containers: 256 (state dicts nest under 10 deep). burn-store's parser
/// recurses on nesting when it copies, prints and drops objects.
pub const MAX_DEPTH: usize = 256;
/// Most memo entries: 2^22 (4.2 million; `torch.save` memoizes about 8 per tensor).
pub const MAX_MEMO: usize = 1 << 22;

/// Why the gate refused a pickle.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    /// A global outside the allowlist.
    #[error("refused global `{module}.{name}` ({opcode}; only tensor data is loaded)")]
    Global {
        /// `GLOBAL`, `STACK_GLOBAL` or `INST`.
        opcode: &'static str,
        /// The module.
        module: String,
        /// The name.
        name: String,
    },
    /// A `STACK_GLOBAL` whose module or name is not a string the gate can decode.
    #[error(
        "refused STACK_GLOBAL at byte {at}: its {which} is {found}, not a string the gate can \
         resolve"
    )]
    Unresolved {
        /// Offset of the opcode.
        at: usize,
        /// `module` or `name`.
        which: &'static str,
        /// What is there instead.
        found: &'static str,
    },
    /// A call of something that is not a tensor rebuild or `OrderedDict`.
    #[error("refused {opcode} at byte {at}: calling {callee} (only tensor rebuilds are called)")]
    Call {
        /// `REDUCE`, `OBJ`, `INST`, `NEWOBJ` or `NEWOBJ_EX`.
        opcode: &'static str,
        /// Offset of the opcode.
        at: usize,
        /// What would have been called.
        callee: String,
    },
    /// An opcode the gate does not accept here.
    #[error("refused {opcode} at byte {at}: {why}")]
    Opcode {
        /// The opcode.
        opcode: &'static str,
        /// Its offset.
        at: usize,
        /// Why.
        why: String,
    },
    /// A budget is exceeded.
    #[error("refused at byte {at}: {what} would exceed the limit of {limit}")]
    Limit {
        /// Offset of the opcode that crossed it.
        at: usize,
        /// The budget.
        what: &'static str,
        /// Its limit.
        limit: u64,
    },
    /// A tensor reaches past the end of its storage.
    #[error(
        "tensor `{key}` of shape {shape:?} needs {needed} bytes of storage `{storage}`, which \
         holds {available} bytes"
    )]
    TensorOutOfBounds {
        /// Its state-dict key (dotted for nested dicts).
        key: String,
        /// Its shape.
        shape: Vec<i64>,
        /// The storage's zip entry.
        storage: String,
        /// Bytes the tensor reaches (offset and strides included).
        needed: u64,
        /// Bytes the storage holds.
        available: u64,
    },
    /// A tensor whose shape, stride, offset, dtype or storage is invalid.
    #[error("tensor `{key}`: {reason}")]
    Tensor {
        /// Its state-dict key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Not a well-formed pickle.
    #[error("malformed pickle at byte {at}: {reason}")]
    Malformed {
        /// Offset of the opcode.
        at: usize,
        /// What is wrong.
        reason: String,
    },
}

type GateResult<T> = std::result::Result<T, GateError>;

const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
];

fn allowed(module: &str, name: &str) -> bool {
    // Protocol 4 resolves dotted names attribute by attribute: never accept one.
    !name.contains('.')
        && (ALLOWED_GLOBALS.contains(&(module, name))
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
                    ))))
}

/// Element size of the storage types burn-store reads.
fn storage_element_size(type_name: &str) -> Option<u64> {
    Some(match type_name {
        "DoubleStorage" | "LongStorage" => 8,
        "FloatStorage" | "IntStorage" => 4,
        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
        "CharStorage" | "ByteStorage" | "BoolStorage" => 1,
        _ => return None,
    })
}

const ELEMENTS: &str = "the number of elements (memo references counted at full size)";
const DEPTH: &str = "the nesting depth";
const MEMO: &str = "the number of memo entries";

/// A simulated container: its items (a dict's as key, value, key, value, ...), its size in
/// elements with every shared item counted in full, its depth, and whether it holds a tensor
/// that does not fit its storage.
#[derive(Clone, Default)]
struct Node {
    items: Vec<V>,
    size: u64,
    depth: usize,
    bad: bool,
}

impl Node {
    fn new(items: Vec<V>) -> Self {
        let mut n = Node {
            items: Vec::new(),
            size: 1,
            depth: 1,
            bad: false,
        };
        n.extend(items);
        n
    }
    fn extend(&mut self, items: Vec<V>) {
        self.items.reserve(items.len());
        for v in items {
            self.size = self.size.saturating_add(v.size());
            self.depth = self.depth.max(v.depth() + 1);
            self.bad |= v.bad();
            self.items.push(v);
        }
    }
}

/// A persistent id `('storage', type, key, location, numel)`.
struct Storage {
    key: String,
    /// `FloatStorage`, ... (`None` when the type is not a `torch` global or a string).
    type_name: Option<String>,
}

/// What is wrong with a tensor, reported with its key once the state dict is complete.
#[derive(Clone)]
enum Bad {
    OutOfBounds {
        shape: Vec<i64>,
        storage: String,
        needed: u64,
        available: u64,
    },
    Invalid(String),
}

impl Bad {
    fn error(self, key: String) -> GateError {
        match self {
            Bad::OutOfBounds {
                shape,
                storage,
                needed,
                available,
            } => GateError::TensorOutOfBounds {
                key,
                shape,
                storage,
                needed,
                available,
            },
            Bad::Invalid(reason) => GateError::Tensor { key, reason },
        }
    }
}

/// A simulated value. Values are shared (`Rc`) and copied on write, so memo fetches cost
/// nothing here however large what they fetch.
#[derive(Clone)]
enum V {
    Str(Rc<str>),
    Int(i64),
    /// None, bools, floats, bytes, big integers, strings the gate does not decode.
    Opaque(&'static str),
    Global(Rc<(String, String)>),
    Storage(Rc<Storage>),
    Tensor(Option<Rc<Bad>>),
    List(Rc<Node>),
    Tuple(Rc<Node>),
    Dict(Rc<Node>),
    Set(Rc<Node>),
}

impl V {
    fn size(&self) -> u64 {
        match self {
            V::List(n) | V::Tuple(n) | V::Dict(n) | V::Set(n) => n.size,
            _ => 1,
        }
    }
    fn depth(&self) -> usize {
        match self {
            V::List(n) | V::Tuple(n) | V::Dict(n) | V::Set(n) => n.depth,
            V::Storage(_) => 1,
            _ => 0,
        }
    }
    fn bad(&self) -> bool {
        match self {
            V::List(n) | V::Tuple(n) | V::Dict(n) | V::Set(n) => n.bad,
            V::Tensor(b) => b.is_some(),
            _ => false,
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            V::Str(_) => "a string",
            V::Int(_) => "an integer",
            V::Opaque(k) => k,
            V::Global(_) => "a global",
            V::Storage(_) => "a storage",
            V::Tensor(_) => "a tensor",
            V::List(_) => "a list",
            V::Tuple(_) => "a tuple",
            V::Dict(_) => "a dict",
            V::Set(_) => "a set",
        }
    }
    /// A dict key as burn-store names it.
    fn key(&self) -> Option<String> {
        match self {
            V::Str(s) => Some(s.to_string()),
            V::Int(i) => Some(i.to_string()),
            _ => None,
        }
    }
}

fn opname(op: u8) -> &'static str {
    match op {
        b'R' => "REDUCE",
        b'o' => "OBJ",
        b'i' => "INST",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        b'b' => "BUILD",
        b'Q' => "BINPERSID",
        b'P' => "PERSID",
        b'a' => "APPEND",
        b'e' => "APPENDS",
        b's' => "SETITEM",
        b'u' => "SETITEMS",
        b'd' => "DICT",
        0x90 => "ADDITEMS",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "opcode",
    }
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
    fn byte(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn uint(&mut self, n: usize) -> std::result::Result<u64, String> {
        let b = self.take(n)?;
        let mut v = 0u64;
        for (i, x) in b.iter().enumerate() {
            v |= (*x as u64) << (8 * i);
        }
        Ok(v)
    }
    fn len(&mut self, n: usize) -> std::result::Result<usize, String> {
        usize::try_from(self.uint(n)?).map_err(|_| "length too large".to_string())
    }
    fn line(&mut self) -> std::result::Result<&'a [u8], String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or("unterminated line")?;
        self.pos += n + 1;
        Ok(&rest[..n])
    }
    fn text_line(&mut self) -> std::result::Result<&'a str, String> {
        std::str::from_utf8(self.line()?).map_err(|_| "non-UTF-8 text".to_string())
    }
}

/// A decimal integer without sign tricks, leading zeros or separators; anything else is not
/// decoded (`None`).
fn decimal(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty()
        || !digits.iter().all(u8::is_ascii_digit)
        || (digits.len() > 1 && digits[0] == b'0')
    {
        return None;
    }
    let v: i64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(if neg { -v } else { v })
}

/// A little-endian two's complement integer (`LONG1`, `LONG4`).
fn le_int(bytes: &[u8]) -> V {
    match bytes.last() {
        None => V::Int(0),
        Some(last) if bytes.len() <= 8 => {
            let mut buf = if last & 0x80 != 0 { [0xff; 8] } else { [0; 8] };
            buf[..bytes.len()].copy_from_slice(bytes);
            V::Int(i64::from_le_bytes(buf))
        }
        Some(_) => V::Opaque("a big integer"),
    }
}

/// A string decoded as torch.load decodes it (UTF-8).
fn utf8(bytes: &[u8]) -> V {
    match std::str::from_utf8(bytes) {
        Ok(s) => V::Str(s.into()),
        Err(_) => V::Opaque("a non-UTF-8 string"),
    }
}

/// Looks a storage key up in the zip: the entry's name and byte size.
type StorageLookup<'a> = &'a dyn Fn(&str) -> Option<(String, u64)>;

struct Gate<'a> {
    r: Reader<'a>,
    /// Offset of the opcode being simulated.
    at: usize,
    stack: Vec<V>,
    /// Stack lengths at each open MARK (Python's metastack).
    marks: Vec<usize>,
    memo: HashMap<u64, V>,
    elements: u64,
    storages: Option<StorageLookup<'a>>,
    first_bad: Option<Rc<Bad>>,
}

impl<'a> Gate<'a> {
    fn malformed(&self, reason: impl Into<String>) -> GateError {
        GateError::Malformed {
            at: self.at,
            reason: reason.into(),
        }
    }
    fn refuse(&self, op: u8, why: impl Into<String>) -> GateError {
        GateError::Opcode {
            opcode: opname(op),
            at: self.at,
            why: why.into(),
        }
    }
    fn limit(&self, what: &'static str, limit: u64) -> GateError {
        GateError::Limit {
            at: self.at,
            what,
            limit,
        }
    }

    fn charge(&mut self, n: u64) -> GateResult<()> {
        self.elements = self.elements.saturating_add(n);
        if self.elements > MAX_ELEMENTS {
            return Err(self.limit(ELEMENTS, MAX_ELEMENTS));
        }
        Ok(())
    }
    fn check_depth(&self, depth: usize) -> GateResult<()> {
        if depth > MAX_DEPTH {
            return Err(self.limit(DEPTH, MAX_DEPTH as u64));
        }
        Ok(())
    }
    /// Pushes a value made from nothing on the stack (one element).
    fn push_new(&mut self, v: V) -> GateResult<()> {
        self.charge(1)?;
        self.stack.push(v);
        Ok(())
    }
    /// Pushes a new container of `items` (popped from the stack, so already counted).
    fn push_node(&mut self, make: fn(Rc<Node>) -> V, items: Vec<V>) -> GateResult<()> {
        let node = Node::new(items);
        self.check_depth(node.depth)?;
        self.push_new(make(Rc::new(node)))
    }
    /// Pushes a copy of `v` (a memo fetch or DUP): counted at its full size.
    fn push_copy(&mut self, v: V) -> GateResult<()> {
        self.charge(v.size())?;
        self.stack.push(v);
        Ok(())
    }

    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }
    fn pop(&mut self) -> GateResult<V> {
        if self.stack.len() > self.fence()
            && let Some(v) = self.stack.pop()
        {
            return Ok(v);
        }
        Err(self.malformed("stack underflow"))
    }
    fn top(&self) -> GateResult<&V> {
        if self.stack.len() > self.fence()
            && let Some(v) = self.stack.last()
        {
            return Ok(v);
        }
        Err(self.malformed("stack underflow"))
    }
    fn pop_mark(&mut self) -> GateResult<Vec<V>> {
        match self.marks.pop() {
            Some(m) if m <= self.stack.len() => Ok(self.stack.split_off(m)),
            _ => Err(self.malformed("no MARK to pop to")),
        }
    }

    /// Adds `items` to the container on top of the stack, which must be a list, dict or set as
    /// `op` requires (copied first if the memo or another container shares it).
    fn extend_top(&mut self, op: u8, items: Vec<V>) -> GateResult<()> {
        let at = self.at;
        if self.stack.len() <= self.fence() {
            return Err(self.malformed("stack underflow"));
        }
        let Some(top) = self.stack.last_mut() else {
            return Err(self.malformed("stack underflow"));
        };
        let rc = match (op, top) {
            (b'a' | b'e', V::List(rc)) | (b's' | b'u', V::Dict(rc)) | (0x90, V::Set(rc)) => rc,
            (_, other) => {
                return Err(GateError::Opcode {
                    opcode: opname(op),
                    at,
                    why: format!("its target is {}", other.kind()),
                });
            }
        };
        let node = Rc::make_mut(rc);
        node.extend(items);
        let depth = node.depth;
        self.check_depth(depth)
    }

    /// Dict keys must be strings (or integers, which burn-store names by their digits).
    fn check_keys(&self, op: u8, pairs: &[V]) -> GateResult<()> {
        if !pairs.len().is_multiple_of(2) {
            return Err(self.malformed(format!("{} with an odd number of items", opname(op))));
        }
        for k in pairs.iter().step_by(2) {
            if k.key().is_none() {
                return Err(self.refuse(op, format!("a dict key is {}", k.kind())));
            }
        }
        Ok(())
    }

    fn memo_get(&mut self, idx: u64) -> GateResult<()> {
        let v = match self.memo.get(&idx) {
            Some(v) => v.clone(),
            None => return Err(self.malformed(format!("memo key {idx} was never put"))),
        };
        self.push_copy(v)
    }
    fn memo_put(&mut self, idx: u64) -> GateResult<()> {
        let v = self.top()?.clone();
        self.charge(v.size())?;
        self.memo.insert(idx, v);
        if self.memo.len() > MAX_MEMO {
            return Err(self.limit(MEMO, MAX_MEMO as u64));
        }
        Ok(())
    }
    fn memo_index(&self, line: &[u8]) -> GateResult<u64> {
        match decimal(line) {
            Some(i) if i >= 0 => Ok(i as u64),
            _ => Err(self.malformed(format!(
                "memo index {:?} is not a plain decimal",
                String::from_utf8_lossy(line)
            ))),
        }
    }

    fn global(&self, opcode: &'static str, module: &str, name: &str) -> GateResult<V> {
        if !allowed(module, name) {
            return Err(GateError::Global {
                opcode,
                module: module.to_string(),
                name: name.to_string(),
            });
        }
        Ok(V::Global(Rc::new((module.to_string(), name.to_string()))))
    }

    /// `callee(*args)` for REDUCE, OBJ and INST.
    fn call(&mut self, op: u8, callee: V, args: V) -> GateResult<V> {
        let g = match callee {
            V::Global(g) => g,
            other => {
                return Err(GateError::Call {
                    opcode: opname(op),
                    at: self.at,
                    callee: other.kind().to_string(),
                });
            }
        };
        let V::Tuple(args) = args else {
            return Err(self.refuse(op, format!("its arguments are {}", args.kind())));
        };
        match (g.0.as_str(), g.1.as_str()) {
            ("collections", "OrderedDict") => self.ordered_dict(op, &args.items),
            ("torch._utils", "_rebuild_tensor_v2") => self.rebuild_tensor(op, &args.items),
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                match args.items.first() {
                    Some(data) => Ok(data.clone()),
                    None => Err(self.refuse(op, "a parameter rebuild without its tensor")),
                }
            }
            ("torch", "Size") => match args.items.as_slice() {
                [V::Tuple(t)] => Ok(V::Tuple(t.clone())),
                _ => Err(self.refuse(op, "torch.Size of something other than a tuple")),
            },
            (m, n) => Err(GateError::Call {
                opcode: opname(op),
                at: self.at,
                callee: format!("`{m}.{n}`"),
            }),
        }
    }

    /// `cls.__new__(cls, *args)` for NEWOBJ and NEWOBJ_EX: only `OrderedDict` and `torch.Size`.
    fn new_obj(&mut self, op: u8, cls: V, args: V) -> GateResult<V> {
        match &cls {
            V::Global(g) if g.0 == "collections" && g.1 == "OrderedDict" => {
                Ok(V::Dict(Rc::new(Node::new(Vec::new()))))
            }
            V::Global(g) if g.0 == "torch" && g.1 == "Size" => self.call(op, cls, args),
            V::Global(g) => Err(GateError::Call {
                opcode: opname(op),
                at: self.at,
                callee: format!("`{}.{}`", g.0, g.1),
            }),
            other => Err(GateError::Call {
                opcode: opname(op),
                at: self.at,
                callee: other.kind().to_string(),
            }),
        }
    }

    /// `OrderedDict()`, `OrderedDict([(key, value), ...])` or `OrderedDict(dict)`.
    fn ordered_dict(&mut self, op: u8, args: &[V]) -> GateResult<V> {
        let items = match args {
            [] => Vec::new(),
            [V::Dict(d)] => return Ok(V::Dict(d.clone())),
            [V::List(pairs) | V::Tuple(pairs)] => {
                let mut items = Vec::with_capacity(pairs.items.len() * 2);
                for p in &pairs.items {
                    match p {
                        V::List(kv) | V::Tuple(kv) if kv.items.len() == 2 => {
                            items.extend(kv.items.iter().cloned())
                        }
                        other => {
                            return Err(self.refuse(
                                op,
                                format!("an OrderedDict item is {}, not a pair", other.kind()),
                            ));
                        }
                    }
                }
                self.check_keys(op, &items)?;
                items
            }
            _ => return Err(self.refuse(op, "OrderedDict of something other than pairs")),
        };
        let node = Node::new(items);
        self.check_depth(node.depth)?;
        Ok(V::Dict(Rc::new(node)))
    }

    /// `_rebuild_tensor_v2(storage, offset, shape, stride, requires_grad, hooks[, metadata])`.
    fn rebuild_tensor(&mut self, op: u8, args: &[V]) -> GateResult<V> {
        if !(6..=7).contains(&args.len()) {
            return Err(self.refuse(
                op,
                format!("_rebuild_tensor_v2 with {} arguments", args.len()),
            ));
        }
        let V::Storage(storage) = &args[0] else {
            return Err(self.refuse(op, format!("a tensor whose storage is {}", args[0].kind())));
        };
        let V::Int(offset) = args[1] else {
            return Err(self.refuse(
                op,
                format!("a tensor whose storage offset is {}", args[1].kind()),
            ));
        };
        let shape = self.int_tuple(op, &args[2], "shape")?;
        let stride = self.int_tuple(op, &args[3], "stride")?;
        let bad = self
            .tensor_fault(storage, offset, &shape, &stride)
            .map(Rc::new);
        if let Some(b) = &bad
            && self.first_bad.is_none()
        {
            self.first_bad = Some(b.clone());
        }
        Ok(V::Tensor(bad))
    }

    fn int_tuple(&self, op: u8, v: &V, what: &str) -> GateResult<Vec<i64>> {
        let V::Tuple(t) = v else {
            return Err(self.refuse(op, format!("a tensor whose {what} is {}", v.kind())));
        };
        t.items
            .iter()
            .map(|x| match x {
                V::Int(i) => Ok(*i),
                other => {
                    Err(self.refuse(op, format!("a tensor whose {what} holds {}", other.kind())))
                }
            })
            .collect()
    }

    /// What is wrong with a tensor of `shape` and `stride` at `offset` in `storage`, if
    /// anything: it must reach no further than the storage's bytes, both as torch addresses it
    /// (offset + the furthest strided element) and as burn-store reads it (shape's elements
    /// contiguous from the offset).
    fn tensor_fault(
        &self,
        storage: &Storage,
        offset: i64,
        shape: &[i64],
        stride: &[i64],
    ) -> Option<Bad> {
        let invalid = |s: String| Some(Bad::Invalid(s));
        let Some(type_name) = &storage.type_name else {
            return invalid("its storage type is not a torch storage class".into());
        };
        let Some(elem) = storage_element_size(type_name) else {
            return invalid(format!("storage type `{type_name}` is not supported"));
        };
        if shape.len() != stride.len() {
            return invalid(format!(
                "shape {shape:?} and stride {stride:?} differ in length"
            ));
        }
        if offset < 0 || shape.iter().chain(stride).any(|x| *x < 0) {
            return invalid(format!(
                "negative offset, size or stride (offset {offset}, shape {shape:?}, stride \
                 {stride:?})"
            ));
        }
        let offset = offset as u64;
        let overflow = || {
            invalid(format!(
                "shape {shape:?} (offset {offset}, stride {stride:?}) overflows 64-bit sizes"
            ))
        };
        let Some(numel) = shape
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d as u64))
        else {
            return overflow();
        };
        let mut furthest = offset;
        if numel > 0 {
            for (d, s) in shape.iter().zip(stride) {
                let Some(f) = (*d as u64 - 1)
                    .checked_mul(*s as u64)
                    .and_then(|x| furthest.checked_add(x))
                else {
                    return overflow();
                };
                furthest = f;
            }
        }
        let strided = if numel > 0 {
            furthest.checked_add(1)
        } else {
            Some(offset)
        };
        let Some(needed) = offset
            .checked_add(numel)
            .zip(strided)
            .map(|(contiguous, strided)| contiguous.max(strided))
            .and_then(|n| n.checked_mul(elem))
        else {
            return overflow();
        };
        let lookup = self.storages?;
        match lookup(&storage.key) {
            None => invalid(format!(
                "its storage `{}` is missing from the zip (no data/{} entry)",
                storage.key, storage.key
            )),
            Some((entry, available)) if needed > available => Some(Bad::OutOfBounds {
                shape: shape.to_vec(),
                storage: entry,
                needed,
                available,
            }),
            Some(_) => None,
        }
    }

    /// `BINPERSID` of `('storage', type, key, location, numel)`.
    fn persistent(&mut self) -> GateResult<()> {
        let pid = self.pop()?;
        let storage = match &pid {
            V::Tuple(t) => match t.items.as_slice() {
                [V::Str(tag), ty, V::Str(key), _, _] if &**tag == "storage" => Storage {
                    key: key.to_string(),
                    type_name: match ty {
                        V::Global(g) if g.0 == "torch" => Some(g.1.clone()),
                        V::Str(s) => Some(s.to_string()),
                        _ => None,
                    },
                },
                _ => return Err(self.refuse(b'Q', "a persistent id that is not a torch storage")),
            },
            other => {
                return Err(self.refuse(b'Q', format!("a persistent id that is {}", other.kind())));
            }
        };
        self.push_new(V::Storage(Rc::new(storage)))
    }

    /// STOP: the pickle is accepted unless a tensor does not fit its storage.
    fn stop(&mut self) -> GateResult<()> {
        let result = self.pop()?;
        let Some(first) = self.first_bad.clone() else {
            return Ok(());
        };
        Err(match find_bad(&result) {
            Some((key, bad)) => bad.error(key),
            None => (*first)
                .clone()
                .error("(not under a state-dict key)".into()),
        })
    }

    fn run(&mut self) -> GateResult<()> {
        loop {
            self.at = self.r.pos;
            let op = self.r.byte().map_err(|e| self.malformed(e))?;
            if op == b'.' {
                return self.stop();
            }
            self.step(op)?;
        }
    }

    fn step(&mut self, op: u8) -> GateResult<()> {
        macro_rules! rd {
            ($e:expr) => {
                $e.map_err(|e| self.malformed(e))?
            };
        }
        match op {
            b'(' => {
                self.charge(1)?;
                self.marks.push(self.stack.len());
            }
            // POP: the top item, or the MARK itself when nothing is above it
            b'0' => {
                if self.stack.len() > self.fence() {
                    self.stack.pop();
                } else if self.marks.pop().is_none() {
                    return Err(self.malformed("stack underflow"));
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.push_copy(v)?;
            }
            0x80 => {
                let v = rd!(self.r.byte());
                if v > 5 {
                    return Err(self.malformed(format!("unknown protocol {v}")));
                }
            }
            0x95 => {
                rd!(self.r.take(8));
            }
            // scalars
            b'N' => self.push_new(V::Opaque("None"))?,
            0x88 | 0x89 => self.push_new(V::Opaque("a bool"))?,
            b'I' => {
                let line = rd!(self.r.line());
                let v = match line {
                    b"00" | b"01" => V::Opaque("a bool"),
                    _ => decimal(line).map_or(V::Opaque("an integer literal"), V::Int),
                };
                self.push_new(v)?;
            }
            b'L' => {
                let line = rd!(self.r.line());
                let digits = line.strip_suffix(b"L").unwrap_or(line);
                self.push_new(decimal(digits).map_or(V::Opaque("an integer literal"), V::Int))?;
            }
            b'J' => {
                let b = rd!(self.r.take(4));
                self.push_new(V::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64))?;
            }
            b'K' => {
                let v = rd!(self.r.uint(1));
                self.push_new(V::Int(v as i64))?;
            }
            b'M' => {
                let v = rd!(self.r.uint(2));
                self.push_new(V::Int(v as i64))?;
            }
            0x8a => {
                let n = rd!(self.r.len(1));
                let b = rd!(self.r.take(n));
                self.push_new(le_int(b))?;
            }
            0x8b => {
                let n = rd!(self.r.len(4));
                let b = rd!(self.r.take(n));
                self.push_new(le_int(b))?;
            }
            b'F' => {
                rd!(self.r.line());
                self.push_new(V::Opaque("a float"))?;
            }
            b'G' => {
                rd!(self.r.take(8));
                self.push_new(V::Opaque("a float"))?;
            }
            // strings: decoded only when no escape sequence is involved
            b'S' => {
                let line = rd!(self.r.line());
                let quoted = line.len() >= 2
                    && line[0] == line[line.len() - 1]
                    && (line[0] == b'\'' || line[0] == b'"');
                if !quoted {
                    return Err(self.malformed("STRING argument is not quoted"));
                }
                let inner = &line[1..line.len() - 1];
                let v = if inner.contains(&b'\\') {
                    V::Opaque("an escaped string")
                } else {
                    utf8(inner)
                };
                self.push_new(v)?;
            }
            b'V' => {
                let line = rd!(self.r.line());
                let v = if line.is_ascii() && !line.contains(&b'\\') {
                    utf8(line)
                } else {
                    V::Opaque("an escaped string")
                };
                self.push_new(v)?;
            }
            b'T' | b'X' => {
                let n = rd!(self.r.len(4));
                let b = rd!(self.r.take(n));
                self.push_new(utf8(b))?;
            }
            b'U' | 0x8c => {
                let n = rd!(self.r.len(1));
                let b = rd!(self.r.take(n));
                self.push_new(utf8(b))?;
            }
            0x8d => {
                let n = rd!(self.r.len(8));
                let b = rd!(self.r.take(n));
                self.push_new(utf8(b))?;
            }
            b'B' => {
                let n = rd!(self.r.len(4));
                rd!(self.r.take(n));
                self.push_new(V::Opaque("bytes"))?;
            }
            b'C' => {
                let n = rd!(self.r.len(1));
                rd!(self.r.take(n));
                self.push_new(V::Opaque("bytes"))?;
            }
            0x8e | 0x96 => {
                let n = rd!(self.r.len(8));
                rd!(self.r.take(n));
                self.push_new(V::Opaque("bytes"))?;
            }
            // containers
            b')' => self.push_node(V::Tuple, Vec::new())?,
            b']' => self.push_node(V::List, Vec::new())?,
            b'}' => self.push_node(V::Dict, Vec::new())?,
            0x8f => self.push_node(V::Set, Vec::new())?,
            b't' => {
                let items = self.pop_mark()?;
                self.push_node(V::Tuple, items)?;
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push_node(V::List, items)?;
            }
            0x91 => {
                let items = self.pop_mark()?;
                self.push_node(V::Set, items)?;
            }
            b'd' => {
                let items = self.pop_mark()?;
                self.check_keys(op, &items)?;
                self.push_node(V::Dict, items)?;
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push_node(V::Tuple, items)?;
            }
            b'a' => {
                let v = self.pop()?;
                self.extend_top(op, vec![v])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                self.extend_top(op, items)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let pair = vec![k, v];
                self.check_keys(op, &pair)?;
                self.extend_top(op, pair)?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.check_keys(op, &items)?;
                self.extend_top(op, items)?;
            }
            // memo
            b'g' => {
                let line = rd!(self.r.line());
                let idx = self.memo_index(line)?;
                self.memo_get(idx)?;
            }
            b'h' => {
                let idx = rd!(self.r.uint(1));
                self.memo_get(idx)?;
            }
            b'j' => {
                let idx = rd!(self.r.uint(4));
                self.memo_get(idx)?;
            }
            b'p' => {
                let line = rd!(self.r.line());
                let idx = self.memo_index(line)?;
                self.memo_put(idx)?;
            }
            b'q' => {
                let idx = rd!(self.r.uint(1));
                self.memo_put(idx)?;
            }
            b'r' => {
                let idx = rd!(self.r.uint(4));
                self.memo_put(idx)?;
            }
            0x94 => {
                let idx = self.memo.len() as u64;
                self.memo_put(idx)?;
            }
            // globals and calls
            b'c' => {
                let module = rd!(self.r.text_line());
                let name = rd!(self.r.text_line());
                let g = self.global("GLOBAL", module, name)?;
                self.push_new(g)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (V::Str(m), V::Str(n)) = (&module, &name) else {
                    let (which, v) = match module {
                        V::Str(_) => ("name", &name),
                        _ => ("module", &module),
                    };
                    return Err(GateError::Unresolved {
                        at: self.at,
                        which,
                        found: v.kind(),
                    });
                };
                let g = self.global("STACK_GLOBAL", m, n)?;
                self.push_new(g)?;
            }
            b'i' => {
                let module = rd!(self.r.text_line());
                let name = rd!(self.r.text_line());
                let g = self.global("INST", module, name)?;
                let args = self.pop_mark()?;
                let args = V::Tuple(Rc::new(Node::new(args)));
                let v = self.call(op, g, args)?;
                self.push_new(v)?;
            }
            b'o' => {
                let mut items = self.pop_mark()?;
                if items.is_empty() {
                    return Err(self.malformed("OBJ without a class"));
                }
                let cls = items.remove(0);
                let args = V::Tuple(Rc::new(Node::new(items)));
                let v = self.call(op, cls, args)?;
                self.push_new(v)?;
            }
            b'R' => {
                let args = self.pop()?;
                let callee = self.pop()?;
                let v = self.call(op, callee, args)?;
                self.push_new(v)?;
            }
            0x81 => {
                let args = self.pop()?;
                let cls = self.pop()?;
                let v = self.new_obj(op, cls, args)?;
                self.push_new(v)?;
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let cls = self.pop()?;
                let v = self.new_obj(op, cls, args)?;
                self.push_new(v)?;
            }
            // BUILD: a dict's state is merged into it (as burn-store does); a tensor's is
            // dropped. Setting state on anything else (a global, above all) is refused.
            b'b' => {
                let state = self.pop()?;
                let at = self.at;
                if self.stack.len() <= self.fence() {
                    return Err(self.malformed("stack underflow"));
                }
                match (self.stack.last_mut(), state) {
                    (Some(V::Dict(rc)), V::Dict(update)) => {
                        let node = Rc::make_mut(rc);
                        node.extend(update.items.clone());
                        let depth = node.depth;
                        self.check_depth(depth)?;
                    }
                    (Some(V::Dict(_) | V::Tensor(_)), _) => {}
                    (target, _) => {
                        return Err(GateError::Opcode {
                            opcode: "BUILD",
                            at,
                            why: format!(
                                "setting the state of {}",
                                target.map_or("nothing", |t| t.kind())
                            ),
                        });
                    }
                }
            }
            b'Q' => self.persistent()?,
            b'P' => return Err(self.refuse(op, "text persistent ids are not torch storages")),
            0x82..=0x84 => {
                return Err(self.refuse(op, "extension registry codes cannot be resolved"));
            }
            0x97 | 0x98 => return Err(self.refuse(op, "out-of-band buffers are not loaded")),
            other => {
                return Err(self.malformed(format!("unknown opcode 0x{other:02x}")));
            }
        }
        Ok(())
    }
}

/// The dotted state-dict key of a tensor in `v` that does not fit its storage, following only
/// dicts (as burn-store names tensors).
fn find_bad(v: &V) -> Option<(String, Bad)> {
    let mut todo: Vec<(String, &V)> = vec![(String::new(), v)];
    while let Some((prefix, v)) = todo.pop() {
        match v {
            V::Tensor(Some(bad)) if !prefix.is_empty() => return Some((prefix, (**bad).clone())),
            V::Dict(n) if n.bad => {
                for pair in n.items.chunks(2) {
                    if let [k, val] = pair
                        && val.bad()
                        && let Some(key) = k.key()
                    {
                        let path = if prefix.is_empty() {
                            key
                        } else {
                            format!("{prefix}.{key}")
                        };
                        todo.push((path, val));
                    }
                }
            }
            _ => {}
        }
    }
    None
}

fn walk(data: &[u8], storages: Option<StorageLookup<'_>>) -> GateResult<()> {
    Gate {
        r: Reader { data, pos: 0 },
        at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        elements: 0,
        storages,
        first_bad: None,
    }
    .run()
}

/// Walks one pickle stream and refuses anything but tensor construction within the budgets.
/// Tensors are checked for consistency but not against storage sizes (see
/// [`check_pickle_with_storages`]).
pub fn check_pickle(data: &[u8]) -> std::result::Result<(), GateError> {
    walk(data, None)
}

/// [`check_pickle`], and every tensor checked against its storage: `storages` gives the zip
/// entry and byte size of a storage key (`None` if the zip has no such storage).
pub fn check_pickle_with_storages(
    data: &[u8],
    storages: &dyn Fn(&str) -> Option<(String, u64)>,
) -> std::result::Result<(), GateError> {
    walk(data, Some(storages))
}

/// Checks a torch zip checkpoint before anything else parses it: every entry must be stored
/// uncompressed (as `torch.save` writes them) with its size consistent with the file, and every
/// `*.pkl` member must pass [`check_pickle_with_storages`] against the zip's storages. Files
/// that are not zips (the pre-1.6 raw pickle format) are refused.
pub fn check_torch_zip(path: &Path) -> Result<()> {
    let err = |reason: String| IoError::Pickle {
        path: path.to_path_buf(),
        reason,
    };
    let (file, file_len) = crate::files::open_regular(path)?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        err(format!(
            "not a torch zip checkpoint ({e}); legacy raw pickles are not read"
        ))
    })?;
    // Every entry's name and size; the pickles' indices.
    let mut sizes: Vec<(String, u64)> = Vec::with_capacity(zip.len());
    let mut pickles = Vec::new();
    for i in 0..zip.len() {
        let member = zip.by_index(i).map_err(|e| err(e.to_string()))?;
        let name = member.name().to_string();
        if member.compression() != zip::CompressionMethod::Stored {
            return Err(err(format!(
                "zip entry `{name}` is compressed ({}); torch writes every entry uncompressed, \
                 and a compressed one can expand without bound",
                member.compression()
            )));
        }
        let (size, stored) = (member.size(), member.compressed_size());
        if size != stored {
            return Err(err(format!(
                "zip entry `{name}` claims {size} bytes but stores {stored} bytes"
            )));
        }
        let end = member.data_start().and_then(|s| s.checked_add(stored));
        if end.is_none_or(|e| e > file_len) {
            return Err(err(format!(
                "zip entry `{name}` of {stored} bytes runs past the end of the {file_len}-byte \
                 file"
            )));
        }
        if name.ends_with(".pkl") {
            if size > MAX_PICKLE_BYTES {
                return Err(err(format!(
                    "{name}: pickle of {size} bytes, more than the {MAX_PICKLE_BYTES}-byte limit"
                )));
            }
            pickles.push(i);
        }
        sizes.push((name, size));
    }
    if pickles.is_empty() {
        return Err(err("no pickle inside the zip".into()));
    }
    // The entry burn-store reads for a storage key is `data/<key>`, else one ending in
    // `/data/<key>` or under a `/data/` folder named `<key>`: take the smallest of them.
    let lookup = |key: &str| -> Option<(String, u64)> {
        let exact = format!("data/{key}");
        let suffix = format!("/data/{key}");
        sizes
            .iter()
            .filter(|(n, _)| {
                *n == exact
                    || n.ends_with(&suffix)
                    || (n.contains("/data/") && n.rsplit('/').next() == Some(key))
            })
            .min_by_key(|(_, s)| *s)
            .cloned()
    };
    for i in pickles {
        let member = zip.by_index(i).map_err(|e| err(e.to_string()))?;
        let name = member.name().to_string();
        let mut bytes = Vec::new();
        member
            .take(MAX_PICKLE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| err(format!("{name}: {e}")))?;
        if bytes.len() as u64 > MAX_PICKLE_BYTES {
            return Err(err(format!(
                "{name}: pickle of more than the {MAX_PICKLE_BYTES}-byte limit"
            )));
        }
        check_pickle_with_storages(&bytes, &lookup).map_err(|source| IoError::PickleRefused {
            path: path.to_path_buf(),
            member: name,
            source: Box::new(source),
        })?;
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol-2 pickle: PROTO 2, `body`, STOP.
    fn proto2(body: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend_from_slice(body);
        p.push(b'.');
        p
    }

    /// GLOBAL 'module\nname\n'.
    fn global(module: &str, name: &str) -> Vec<u8> {
        let mut g = vec![b'c'];
        g.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        g
    }

    /// BINUNICODE (4-byte length).
    fn text(s: &str) -> Vec<u8> {
        let mut t = vec![b'X'];
        t.extend_from_slice(&(s.len() as u32).to_le_bytes());
        t.extend_from_slice(s.as_bytes());
        t
    }

    /// `module.name()`: GLOBAL, EMPTY_TUPLE, REDUCE.
    fn call(module: &str, name: &str) -> Vec<u8> {
        let mut c = global(module, name);
        c.extend_from_slice(b")R");
        c
    }

    #[test]
    fn tensor_globals_are_allowed() {
        for (module, name) in [
            ("collections", "OrderedDict"),
            ("torch._utils", "_rebuild_tensor_v2"),
            ("torch._utils", "_rebuild_parameter"),
            ("torch", "FloatStorage"),
            ("torch", "BFloat16Storage"),
            ("torch", "float32"),
        ] {
            // The reference alone: the gate checks calls' arguments separately (see
            // crates/peft-io/tests/pickle_gate.rs), so an empty call would be refused.
            let p = proto2(&global(module, name));
            assert_eq!(check_pickle(&p), Ok(()), "{module}.{name}");
        }
    }

    #[test]
    fn a_state_dict_as_torch_writes_it_passes() {
        // {"w": _rebuild_tensor_v2(pid("storage", FloatStorage, "0", "cpu", 4), 0, (2, 2),
        //  (2, 1), False, OrderedDict())}
        let mut b = vec![b'}', b'('];
        b.extend(text("w"));
        b.extend(global("torch._utils", "_rebuild_tensor_v2"));
        b.extend_from_slice(b"((");
        b.extend(text("storage"));
        b.extend(global("torch", "FloatStorage"));
        b.extend(text("0"));
        b.extend(text("cpu"));
        b.extend_from_slice(b"K\x04tQ"); // BININT1 4, TUPLE, BINPERSID
        b.extend_from_slice(b"K\x00K\x02K\x02\x86K\x02K\x01\x86\x89"); // 0, (2, 2), (2, 1), False
        b.extend(call("collections", "OrderedDict"));
        b.extend_from_slice(b"tRu"); // TUPLE, REDUCE, SETITEMS
        assert_eq!(check_pickle(&proto2(&b)), Ok(()));
    }

    #[test]
    fn code_execution_globals_are_refused_by_name() {
        for (module, name) in [
            ("os", "system"),
            ("builtins", "eval"),
            ("posix", "system"),
            ("torch", "load"),
            ("__builtin__", "eval"),
            ("subprocess", "Popen"),
            ("torch.nn", "FloatStorage"),
            ("torch._utils", "_rebuild_tensor_v2x"),
        ] {
            // Behind harmless data, so the refusal is not only about the first opcode.
            let mut body = text("echo pwned");
            body.extend(call(module, name));
            let err = check_pickle(&proto2(&body)).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{module}.{name}`")),
                "{module}.{name}: {err}"
            );
        }
    }

    #[test]
    fn stack_global_is_checked_like_global() {
        // Protocol 4: SHORT_BINUNICODE module, MEMOIZE, SHORT_BINUNICODE name, MEMOIZE,
        // STACK_GLOBAL.
        let stack_global = |module: &str, name: &str| {
            let mut p = vec![0x80, 4];
            for s in [module, name] {
                p.push(0x8c);
                p.push(s.len() as u8);
                p.extend_from_slice(s.as_bytes());
                p.push(0x94);
            }
            p.extend_from_slice(&[0x93, b')', b'R', b'.']);
            p
        };
        assert_eq!(
            check_pickle(&stack_global("collections", "OrderedDict")),
            Ok(())
        );
        let err = check_pickle(&stack_global("posix", "system"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`posix.system`"), "{err}");
        let err = check_pickle(&stack_global("builtins", "eval"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`builtins.eval`"), "{err}");
        // Names not pushed as literals just before (here: one from the memo) are refused.
        let mut p = vec![0x80, 4, 0x8c, 2];
        p.extend_from_slice(b"os");
        p.extend_from_slice(&[0x94, b'h', 0, 0x93, b'.']);
        let err = check_pickle(&p).unwrap_err().to_string();
        assert!(err.contains("STACK_GLOBAL"), "{err}");
    }

    #[test]
    fn other_constructions_and_broken_streams_are_refused() {
        let err = check_pickle(&proto2(b"(ios\nsystem\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("INST"), "{err}");
        let err = check_pickle(&proto2(&[0x82, 1])).unwrap_err().to_string();
        assert!(err.contains("extension"), "{err}");
        // No STOP: running off the end is an error, not a pass.
        let mut p = proto2(&call("collections", "OrderedDict"));
        p.pop();
        assert!(check_pickle(&p).is_err());
        assert!(check_pickle(b"").is_err());
        // A GLOBAL line without its newline.
        assert!(check_pickle(&[0x80, 2, b'c', b'o', b's']).is_err());
        let err = check_pickle(&proto2(&[0xff])).unwrap_err().to_string();
        assert!(err.contains("0xff"), "{err}");
    }
}
