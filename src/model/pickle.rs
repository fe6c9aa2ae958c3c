//! PyTorch checkpoints (`torch.save`: `pytorch_model.bin`, `.pth`, `.pt`) read without Python's
//! pickle: a reader that only reads. It imports nothing and calls nothing, cannot panic on any
//! input, bounds the memory a file can make it use, and never prints.
//!
//! A `torch.save` file is a zip archive: `<archive>/data.pkl` (a pickle, protocol 2) describes
//! the object saved, each tensor's bytes sit in an entry `<archive>/data/<key>`, and the optional
//! `<archive>/byteorder` says `little` or `big`. The pickle is run on a small virtual machine
//! that knows the opcodes a state dict uses: `PROTO`, `FRAME`, `GLOBAL`, `STACK_GLOBAL`, `MARK`,
//! `POP`, `POP_MARK`, `DUP`, `EMPTY_DICT`, `EMPTY_LIST`, `EMPTY_TUPLE`, `TUPLE`, `TUPLE1`-`3`,
//! `SETITEM(S)`, `APPEND(S)`, `BININT`, `BININT1`, `BININT2`, `LONG1`, `LONG4`,
//! `(SHORT_)BINUNICODE(8)`, `(SHORT_)BINBYTES(8)`, `NONE`, `NEWTRUE`, `NEWFALSE`, `BINFLOAT`,
//! `BINPUT`, `LONG_BINPUT`, `MEMOIZE`, `BINGET`, `LONG_BINGET`, `BINPERSID`, `REDUCE`, `BUILD`,
//! `STOP`. Any other opcode is an error.
//!
//! A global must be one of `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter` or a `torch.<Type>Storage`; any other (`os.system`, ...) is
//! an error naming it. `REDUCE` never calls anything: `OrderedDict()` becomes an empty dict, the
//! two rebuild functions become a record of their arguments, read later as a tensor. `BUILD`
//! (an `OrderedDict`'s `_metadata`) is dropped.
//!
//! Objects live in one arena and refer to each other by index, so a memo `GET` copies an index,
//! never an object, and a list appended into itself is a cycle of indices, not a copy. At most
//! [`MAX_OBJECTS`] objects, container items, memo entries and stack slots, [`MAX_DEPTH`] nested
//! `MARK`s, and a pickle of [`MAX_PICKLE_BYTES`]; going past any of them is an error.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// The most objects, container items, memo entries (together) and stack slots a pickle may make.
pub(crate) const MAX_OBJECTS: usize = 10_000_000;
/// The deepest nesting of `MARK`s a pickle may use.
pub(crate) const MAX_DEPTH: usize = 1_000;
/// The largest `data.pkl` read (a state dict's is about 100 bytes per tensor).
pub(crate) const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// The most dimensions a tensor may have.
const MAX_RANK: usize = 64;

type Res<T> = std::result::Result<T, String>;

/// Index of an object in the arena.
type Id = u32;

/// A storage type the pickle may name (`torch.FloatStorage`), and what vitcx reads it as.
/// Integer storages are read so that the caller can drop the integer buffers it knows
/// (`position_ids`, `num_batches_tracked`) and refuse the others by name.
const STORAGES: [(&str, Option<DType>); 14] = [
    ("FloatStorage", Some(DType::F32)),
    ("HalfStorage", Some(DType::F16)),
    ("BFloat16Storage", Some(DType::BF16)),
    ("DoubleStorage", Some(DType::F64)),
    ("LongStorage", Some(DType::I64)),
    ("ByteStorage", Some(DType::U8)),
    ("IntStorage", None),
    ("ShortStorage", None),
    ("CharStorage", None),
    ("BoolStorage", None),
    ("ComplexFloatStorage", None),
    ("ComplexDoubleStorage", None),
    ("QInt8Storage", None),
    ("QUInt8Storage", None),
];

/// The globals a pickle may name. None is ever imported or called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    /// Index into [`STORAGES`].
    Storage(usize),
}

/// One object of the pickle.
#[derive(Debug)]
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float,
    Str(Box<str>),
    /// Bytes objects are never needed; their content is not kept.
    Bytes,
    Tuple(Box<[Id]>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global(Global),
    /// A persistent id (`BINPERSID`): the tuple naming a storage.
    PersId(Id),
    /// A call to a rebuild function, not made: the function and its argument tuple.
    Call(Global, Id),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "a bool",
            Obj::Int(_) => "an int",
            Obj::Float => "a float",
            Obj::Str(_) => "a str",
            Obj::Bytes => "bytes",
            Obj::Tuple(_) => "a tuple",
            Obj::List(_) => "a list",
            Obj::Dict(_) => "a dict",
            Obj::Global(_) => "a global",
            Obj::PersId(_) => "a persistent id",
            Obj::Call(..) => "a tensor",
        }
    }
}

/// The pickle virtual machine: the arena, the stack, the marks and the memo.
struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    objs: Vec<Obj>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    /// Objects, container items and memo entries made so far.
    used: usize,
}

const NONE: Id = 0;
const TRUE: Id = 1;
const FALSE: Id = 2;

impl<'a> Vm<'a> {
    fn new(data: &'a [u8]) -> Self {
        Vm {
            data,
            pos: 0,
            objs: vec![Obj::None, Obj::Bool(true), Obj::Bool(false)],
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            used: 3,
        }
    }

    fn spend(&mut self, n: usize) -> Res<()> {
        self.used = self.used.saturating_add(n);
        if self.used > MAX_OBJECTS {
            return Err(format!(
                "the pickle makes more than {MAX_OBJECTS} objects (a state dict needs a few per tensor)"
            ));
        }
        Ok(())
    }

    fn alloc(&mut self, o: Obj) -> Res<Id> {
        self.spend(1)?;
        let id = Id::try_from(self.objs.len()).map_err(|_| "too many objects".to_string())?;
        self.objs.push(o);
        Ok(id)
    }

    fn obj(&self, id: Id) -> &Obj {
        // Every id in the stack, the memo and containers came from `alloc`.
        self.objs.get(id as usize).unwrap_or(&Obj::None)
    }

    fn push(&mut self, id: Id) -> Res<()> {
        if self.stack.len() >= MAX_OBJECTS {
            return Err(format!(
                "the pickle's stack grows past {MAX_OBJECTS} entries"
            ));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push_new(&mut self, o: Obj) -> Res<()> {
        let id = self.alloc(o)?;
        self.push(id)
    }

    /// Where the current `MARK` fences the stack.
    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self, op: &str) -> Res<Id> {
        if self.stack.len() <= self.fence() {
            return Err(format!("stack underflow at {op} (byte {})", self.pos));
        }
        self.stack
            .pop()
            .ok_or_else(|| format!("stack underflow at {op}"))
    }

    fn top(&self, op: &str) -> Res<Id> {
        if self.stack.len() <= self.fence() {
            return Err(format!("stack underflow at {op} (byte {})", self.pos));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| format!("stack underflow at {op}"))
    }

    /// The items pushed since the last `MARK`, which is removed.
    fn pop_mark(&mut self, op: &str) -> Res<Vec<Id>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| format!("{op} without a MARK (byte {})", self.pos))?;
        if m > self.stack.len() {
            return Err(format!("stack underflow at {op}"));
        }
        Ok(self.stack.split_off(m))
    }

    fn take(&mut self, n: usize, op: &str) -> Res<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(format!(
                "truncated pickle: {op} at byte {} needs {n} more bytes",
                self.pos
            ));
        };
        let s = self.data.get(self.pos..end).unwrap_or_default();
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, op: &str) -> Res<u8> {
        Ok(self.take(1, op)?.first().copied().unwrap_or(0))
    }

    fn le<const N: usize>(&mut self, op: &str) -> Res<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, op)?);
        Ok(out)
    }

    fn len_u32(&mut self, op: &str) -> Res<usize> {
        Ok(u32::from_le_bytes(self.le::<4>(op)?) as usize)
    }

    fn len_u64(&mut self, op: &str) -> Res<usize> {
        usize::try_from(u64::from_le_bytes(self.le::<8>(op)?))
            .map_err(|_| format!("truncated pickle: {op} length too large"))
    }

    /// A line of `GLOBAL` (module or name), without its newline.
    fn line(&mut self, op: &str) -> Res<String> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let Some(n) = rest.iter().take(1024).position(|&b| b == b'\n') else {
            return Err(format!(
                "truncated pickle: {op} at byte {} has no end of line",
                self.pos
            ));
        };
        let s = self.take(n + 1, op)?;
        Ok(String::from_utf8_lossy(s.get(..n).unwrap_or_default()).into_owned())
    }

    fn string(&mut self, n: usize, op: &str) -> Res<()> {
        let b = self.take(n, op)?;
        let s = std::str::from_utf8(b)
            .map_err(|_| format!("{op} at byte {} is not UTF-8", self.pos))?;
        self.push_new(Obj::Str(s.into()))
    }

    fn int(&mut self, v: i64) -> Res<()> {
        self.push_new(Obj::Int(v))
    }

    /// A little-endian two's-complement integer of `b.len()` bytes (`LONG1`, `LONG4`).
    fn long(&mut self, b: &[u8], op: &str) -> Res<()> {
        if b.len() > 8 {
            return Err(format!(
                "{op}: an integer of {} bytes is too large",
                b.len()
            ));
        }
        let mut v: i64 = 0;
        for (i, &x) in b.iter().enumerate() {
            v |= i64::from(x) << (8 * i);
        }
        if let Some(&last) = b.last() {
            if b.len() < 8 && last & 0x80 != 0 {
                v -= 1i64 << (8 * b.len());
            }
        }
        self.int(v)
    }

    fn memo_put(&mut self, key: u32, op: &str) -> Res<()> {
        let top = self.top(op)?;
        if self.memo.insert(key, top).is_none() {
            self.spend(1)?;
        }
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Res<()> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| format!("memo key {key} read before it was stored"))?;
        self.push(id)
    }

    fn global(&mut self, module: &str, name: &str) -> Res<()> {
        let g = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch", s) if STORAGES.iter().any(|(n, _)| *n == s) => {
                Global::Storage(STORAGES.iter().position(|(n, _)| *n == s).unwrap_or(0))
            }
            _ => {
                return Err(format!(
                    "the pickle refers to '{}.{}', which vitcx refuses: it reads tensors only \
                     and never imports or runs anything a pickle names",
                    module.escape_debug(),
                    name.escape_debug()
                ))
            }
        };
        self.push_new(Obj::Global(g))
    }

    fn tuple_of(&self, id: Id) -> Option<&[Id]> {
        match self.obj(id) {
            Obj::Tuple(t) => Some(t),
            _ => None,
        }
    }

    /// `REDUCE`: records the call, making nothing but an empty `OrderedDict`.
    fn reduce(&mut self) -> Res<()> {
        let args = self.pop("REDUCE")?;
        let func = self.pop("REDUCE")?;
        let g = match self.obj(func) {
            Obj::Global(g) => *g,
            o => return Err(format!("REDUCE calls {}, not a global", o.kind())),
        };
        let Some(a) = self.tuple_of(args) else {
            return Err(format!(
                "REDUCE with {} as arguments, not a tuple",
                self.obj(args).kind()
            ));
        };
        match g {
            Global::OrderedDict if a.is_empty() => self.push_new(Obj::Dict(Vec::new())),
            Global::OrderedDict => Err("OrderedDict called with arguments".into()),
            Global::RebuildTensorV2 | Global::RebuildParameter => self.push_new(Obj::Call(g, args)),
            Global::Storage(i) => Err(format!(
                "REDUCE calls torch.{}",
                STORAGES.get(i).map_or("?", |s| s.0)
            )),
        }
    }

    fn set_items(&mut self, items: &[Id], op: &str) -> Res<()> {
        if !items.len().is_multiple_of(2) {
            return Err(format!("{op} with an odd number of items"));
        }
        let target = self.top(op)?;
        self.spend(items.len() / 2)?;
        match self.objs.get_mut(target as usize) {
            Some(Obj::Dict(d)) => {
                d.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
                Ok(())
            }
            _ => Err(format!("{op} on {}, not a dict", self.obj(target).kind())),
        }
    }

    fn append(&mut self, items: &[Id], op: &str) -> Res<()> {
        let target = self.top(op)?;
        self.spend(items.len())?;
        match self.objs.get_mut(target as usize) {
            Some(Obj::List(l)) => {
                l.extend_from_slice(items);
                Ok(())
            }
            _ => Err(format!("{op} on {}, not a list", self.obj(target).kind())),
        }
    }

    /// Runs the pickle to its `STOP`; the object it returns.
    fn run(&mut self) -> Res<Id> {
        loop {
            let at = self.pos;
            let op = self.u8("an opcode")?;
            match op {
                0x80 => {
                    let p = self.u8("PROTO")?;
                    if p > 5 {
                        return Err(format!("unsupported pickle protocol {p}"));
                    }
                }
                0x95 => {
                    self.le::<8>("FRAME")?;
                }
                b'c' => {
                    let module = self.line("GLOBAL")?;
                    let name = self.line("GLOBAL")?;
                    self.global(&module, &name)?;
                }
                0x93 => {
                    let name = self.pop("STACK_GLOBAL")?;
                    let module = self.pop("STACK_GLOBAL")?;
                    match (self.obj(module), self.obj(name)) {
                        (Obj::Str(m), Obj::Str(n)) => {
                            let (m, n) = (m.to_string(), n.to_string());
                            self.global(&m, &n)?;
                        }
                        _ => return Err("STACK_GLOBAL of objects that are not strings".into()),
                    }
                }
                b'(' => {
                    if self.marks.len() >= MAX_DEPTH {
                        return Err(format!("the pickle nests more than {MAX_DEPTH} MARKs"));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    // POP drops the topmost MARK when nothing was pushed after it.
                    if !self.marks.is_empty() && self.stack.len() == self.fence() {
                        self.marks.pop();
                    } else {
                        self.pop("POP")?;
                    }
                }
                b'1' => {
                    self.pop_mark("POP_MARK")?;
                }
                b'2' => {
                    let t = self.top("DUP")?;
                    self.push(t)?;
                }
                b'}' => self.push_new(Obj::Dict(Vec::new()))?,
                b']' => self.push_new(Obj::List(Vec::new()))?,
                b')' => self.push_new(Obj::Tuple(Box::new([])))?,
                b't' => {
                    let items = self.pop_mark("TUPLE")?;
                    self.spend(items.len())?;
                    self.push_new(Obj::Tuple(items.into_boxed_slice()))?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = vec![0; n];
                    for slot in items.iter_mut().rev() {
                        *slot = self.pop("TUPLE1-3")?;
                    }
                    self.spend(n)?;
                    self.push_new(Obj::Tuple(items.into_boxed_slice()))?;
                }
                b's' => {
                    let v = self.pop("SETITEM")?;
                    let k = self.pop("SETITEM")?;
                    self.set_items(&[k, v], "SETITEM")?;
                }
                b'u' => {
                    let items = self.pop_mark("SETITEMS")?;
                    self.set_items(&items, "SETITEMS")?;
                }
                b'a' => {
                    let v = self.pop("APPEND")?;
                    self.append(&[v], "APPEND")?;
                }
                b'e' => {
                    let items = self.pop_mark("APPENDS")?;
                    self.append(&items, "APPENDS")?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.le::<4>("BININT")?);
                    self.int(i64::from(v))?;
                }
                b'K' => {
                    let v = self.u8("BININT1")?;
                    self.int(i64::from(v))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le::<2>("BININT2")?);
                    self.int(i64::from(v))?;
                }
                0x8a => {
                    let n = usize::from(self.u8("LONG1")?);
                    let b = self.take(n, "LONG1")?;
                    self.long(b, "LONG1")?;
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.le::<4>("LONG4")?);
                    let n = usize::try_from(n).map_err(|_| "LONG4 of negative length")?;
                    let b = self.take(n, "LONG4")?;
                    self.long(b, "LONG4")?;
                }
                b'X' => {
                    let n = self.len_u32("BINUNICODE")?;
                    self.string(n, "BINUNICODE")?;
                }
                0x8c => {
                    let n = usize::from(self.u8("SHORT_BINUNICODE")?);
                    self.string(n, "SHORT_BINUNICODE")?;
                }
                0x8d => {
                    let n = self.len_u64("BINUNICODE8")?;
                    self.string(n, "BINUNICODE8")?;
                }
                b'B' => {
                    let n = self.len_u32("BINBYTES")?;
                    self.take(n, "BINBYTES")?;
                    self.push_new(Obj::Bytes)?;
                }
                b'C' => {
                    let n = usize::from(self.u8("SHORT_BINBYTES")?);
                    self.take(n, "SHORT_BINBYTES")?;
                    self.push_new(Obj::Bytes)?;
                }
                0x8e => {
                    let n = self.len_u64("BINBYTES8")?;
                    self.take(n, "BINBYTES8")?;
                    self.push_new(Obj::Bytes)?;
                }
                b'N' => self.push(NONE)?,
                0x88 => self.push(TRUE)?,
                0x89 => self.push(FALSE)?,
                b'G' => {
                    self.le::<8>("BINFLOAT")?;
                    self.push_new(Obj::Float)?;
                }
                b'q' => {
                    let k = self.u8("BINPUT")?;
                    self.memo_put(u32::from(k), "BINPUT")?;
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le::<4>("LONG_BINPUT")?);
                    self.memo_put(k, "LONG_BINPUT")?;
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).unwrap_or(u32::MAX);
                    self.memo_put(k, "MEMOIZE")?;
                }
                b'h' => {
                    let k = self.u8("BINGET")?;
                    self.memo_get(u32::from(k))?;
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le::<4>("LONG_BINGET")?);
                    self.memo_get(k)?;
                }
                b'Q' => {
                    let pid = self.pop("BINPERSID")?;
                    self.push_new(Obj::PersId(pid))?;
                }
                b'R' => self.reduce()?,
                b'b' => {
                    // The state (an OrderedDict's `_metadata`) is dropped; nothing is set.
                    self.pop("BUILD")?;
                    self.top("BUILD")?;
                }
                b'.' => return self.pop("STOP"),
                _ => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{op:02x} ({:?}) at byte {at}",
                        char::from(op)
                    ))
                }
            }
        }
    }
}

/// A tensor as the pickle describes it, before its bytes are read.
#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    name: String,
    /// The entry under `<archive>/data/`.
    key: String,
    /// Index into [`STORAGES`].
    storage: usize,
    /// Element offset into the storage.
    offset: usize,
    shape: Vec<usize>,
    /// Whether the strides are column-major (Fortran order) rather than row-major.
    fortran: bool,
    /// Elements of the storage, as the persistent id declares.
    storage_numel: usize,
}

impl Vm<'_> {
    fn usize_of(&self, id: Id, what: &str, name: &str) -> Res<usize> {
        match self.obj(id) {
            Obj::Int(v) => {
                usize::try_from(*v).map_err(|_| format!("tensor '{name}': {what} {v} is negative"))
            }
            Obj::Bool(b) => Ok(usize::from(*b)),
            o => Err(format!(
                "tensor '{name}': {what} is {}, not an int",
                o.kind()
            )),
        }
    }

    fn str_of(&self, id: Id) -> Option<&str> {
        match self.obj(id) {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }

    fn dims_of(&self, id: Id, what: &str, name: &str) -> Res<Vec<usize>> {
        let Some(t) = self.tuple_of(id) else {
            return Err(format!(
                "tensor '{name}': {what} is {}, not a tuple",
                self.obj(id).kind()
            ));
        };
        if t.len() > MAX_RANK {
            return Err(format!("tensor '{name}': more than {MAX_RANK} dimensions"));
        }
        t.iter().map(|&d| self.usize_of(d, what, name)).collect()
    }

    /// The tensor `id` holds, `None` when it is not a tensor (an int, a nested dict, ...).
    fn tensor(&self, name: &str, id: Id) -> Res<Option<TensorRef>> {
        let args = match self.obj(id) {
            Obj::Call(Global::RebuildTensorV2, args) => *args,
            Obj::Call(Global::RebuildParameter, args) => {
                let a = self.tuple_of(*args).unwrap_or_default();
                let inner = match a.first() {
                    Some(&t) if a.len() <= 3 => t,
                    _ => {
                        return Err(format!(
                            "tensor '{name}': _rebuild_parameter takes (data, requires_grad, \
                             backward_hooks), got {} arguments",
                            a.len()
                        ))
                    }
                };
                match self.obj(inner) {
                    Obj::Call(Global::RebuildTensorV2, args) => *args,
                    o => {
                        return Err(format!(
                            "tensor '{name}': _rebuild_parameter of {}, not a tensor",
                            o.kind()
                        ))
                    }
                }
            }
            _ => return Ok(None),
        };
        let a = self.tuple_of(args).unwrap_or_default();
        let &[pid, offset, size, stride, ..] = a else {
            return Err(format!(
                "tensor '{name}': _rebuild_tensor_v2 takes (storage, storage_offset, size, \
                 stride, requires_grad, backward_hooks), got {} arguments",
                a.len()
            ));
        };
        if a.len() > 7 {
            return Err(format!(
                "tensor '{name}': _rebuild_tensor_v2 with {} arguments",
                a.len()
            ));
        }
        let pid = match self.obj(pid) {
            Obj::PersId(p) => self.tuple_of(*p),
            _ => None,
        };
        let bad_pid = || {
            format!(
                "tensor '{name}': its storage is not a persistent id \
                 ('storage', <Type>Storage, key, location, numel)"
            )
        };
        let &[tag, ty, key, _location, numel] = pid.ok_or_else(bad_pid)? else {
            return Err(bad_pid());
        };
        if self.str_of(tag) != Some("storage") {
            return Err(bad_pid());
        }
        let storage = match self.obj(ty) {
            Obj::Global(Global::Storage(s)) => *s,
            _ => return Err(bad_pid()),
        };
        let key = self.str_of(key).ok_or_else(bad_pid)?.to_string();
        let storage_numel = self.usize_of(numel, "storage size", name)?;
        let offset = self.usize_of(offset, "storage offset", name)?;
        let shape = self.dims_of(size, "size", name)?;
        let stride = self.dims_of(stride, "stride", name)?;
        if stride.len() != shape.len() {
            return Err(format!(
                "tensor '{name}': {} strides for {} dimensions",
                stride.len(),
                shape.len()
            ));
        }
        let row = contiguous(&shape, &stride, false);
        let fortran = !row && shape.len() > 1 && contiguous(&shape, &stride, true);
        if !row && !fortran {
            return Err(format!(
                "tensor '{name}': strides {stride:?} for size {shape:?} are not contiguous \
                 (vitcx reads contiguous tensors only)"
            ));
        }
        Ok(Some(TensorRef {
            name: name.to_string(),
            key,
            storage,
            offset,
            shape,
            fortran,
            storage_numel,
        }))
    }

    /// The tensors of a dict, by name; its other values are not weights and are skipped.
    fn tensors_in(&self, dict: Id) -> Res<Vec<TensorRef>> {
        let Obj::Dict(items) = self.obj(dict) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<TensorRef> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for &(k, v) in items {
            let Some(name) = self.str_of(k) else {
                if matches!(self.obj(v), Obj::Call(..)) {
                    return Err(format!(
                        "a tensor under {} key, not a str",
                        self.obj(k).kind()
                    ));
                }
                continue;
            };
            if let Some(t) = self.tensor(name, v)? {
                match index.get(name) {
                    Some(&i) => {
                        if let Some(slot) = out.get_mut(i) {
                            *slot = t;
                        }
                    }
                    None => {
                        index.insert(name.to_string(), out.len());
                        out.push(t);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The value under a str key of a dict (the last one set, as Python keeps).
    fn lookup(&self, dict: Id, key: &str) -> Option<Id> {
        let Obj::Dict(items) = self.obj(dict) else {
            return None;
        };
        items
            .iter()
            .rev()
            .find(|(k, _)| self.str_of(*k) == Some(key))
            .map(|&(_, v)| v)
    }
}

/// Whether strides are those of a dense layout, row-major (C order) or, with `fortran`,
/// column-major. Dimensions of size 1 may have any stride, as in PyTorch; an empty tensor is
/// contiguous.
fn contiguous(shape: &[usize], stride: &[usize], fortran: bool) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let dims = shape.iter().zip(stride);
    let dims: Box<dyn Iterator<Item = (&usize, &usize)>> = if fortran {
        Box::new(dims)
    } else {
        Box::new(dims.rev())
    };
    let mut expected = 1usize;
    for (&size, &stride) in dims {
        if size != 1 && stride != expected {
            return false;
        }
        expected = match expected.checked_mul(size) {
            Some(e) => e,
            None => return false,
        };
    }
    true
}

/// The state dict a pickle holds: the tensors of the top-level dict or, when it holds none, of
/// the first of `nested_keys` (`"state_dict"`, `"model"`) whose dict holds some.
fn state_dict(pickle: &[u8], nested_keys: &[&str]) -> Res<Vec<TensorRef>> {
    let mut vm = Vm::new(pickle);
    let root = vm.run()?;
    if !matches!(vm.obj(root), Obj::Dict(_)) {
        return Err(format!(
            "the pickle holds {}, not a state dict (a dict of tensors)",
            vm.obj(root).kind()
        ));
    }
    let mut found = vm.tensors_in(root)?;
    for key in nested_keys {
        if !found.is_empty() {
            break;
        }
        if let Some(inner) = vm.lookup(root, key) {
            found = vm.tensors_in(inner)?;
        }
    }
    Ok(found)
}

/// Reads the tensors of a `torch.save` checkpoint (on the CPU, in their stored dtype): those
/// of the top-level dict or, when it holds none, of the first of `nested_keys` that holds some.
/// The error is the reason, for the caller to wrap with the path.
pub(crate) fn read_state_dict(path: &Path, nested_keys: &[&str]) -> Res<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    // No entry can hold more than the file: a size the zip claims beyond it is never allocated.
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        format!("not a torch.save zip archive ({e}); PyTorch's legacy non-zip format is not read")
    })?;
    let pkl_names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| {
            n.strip_suffix("/data.pkl")
                .is_some_and(|d| !d.is_empty() && !d.contains('/'))
        })
        .map(|n| n.into_owned())
        .collect();
    let pkl_name = match pkl_names.as_slice() {
        [one] => one.clone(),
        [] => return Err("no <archive>/data.pkl in the zip (not a torch.save checkpoint)".into()),
        _ => return Err(format!("{} data.pkl entries in the zip", pkl_names.len())),
    };
    let dir = pkl_name
        .strip_suffix("data.pkl")
        .unwrap_or_default()
        .to_string();
    if zip.index_for_name(&format!("{dir}byteorder")).is_some() {
        let order = read_entry(&mut zip, &format!("{dir}byteorder"), 16)?;
        if order.as_slice() != b"little" {
            return Err(format!(
                "byte order '{}' (vitcx reads little-endian checkpoints)",
                String::from_utf8_lossy(&order).escape_debug()
            ));
        }
    }
    let pickle = read_entry(&mut zip, &pkl_name, MAX_PICKLE_BYTES)?;
    let refs = state_dict(&pickle, nested_keys)?;
    drop(pickle);
    refs.iter()
        .map(|t| Ok((t.name.clone(), load(&mut zip, &dir, t, file_len)?)))
        .collect()
}

/// A whole small entry, refused past `max` bytes.
fn read_entry<R: Read + Seek>(zip: &mut zip::ZipArchive<R>, name: &str, max: u64) -> Res<Vec<u8>> {
    let entry = zip.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    if entry.size() > max {
        return Err(format!("{name} is larger than {max} bytes"));
    }
    let mut out = Vec::new();
    entry
        .take(max)
        .read_to_end(&mut out)
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(out)
}

/// Reads one tensor's bytes from its storage entry.
fn load<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    dir: &str,
    t: &TensorRef,
    file_len: u64,
) -> Res<Tensor> {
    let name = &t.name;
    let (storage, dtype) = STORAGES.get(t.storage).copied().unwrap_or(("?", None));
    let Some(dtype) = dtype else {
        return Err(format!(
            "tensor '{name}': torch.{storage} is not supported (vitcx reads float32, float16, \
             bfloat16 and float64 weights)"
        ));
    };
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("tensor '{name}': size {:?} overflows", t.shape))?;
    let elem = dtype.size_in_bytes();
    let end = if numel == 0 {
        Some(t.offset)
    } else {
        t.offset.checked_add(numel)
    };
    if end.is_none_or(|e| e > t.storage_numel) {
        return Err(format!(
            "tensor '{name}': {numel} elements from offset {} do not fit its storage of {} \
             elements",
            t.offset, t.storage_numel
        ));
    }
    let entry_name = format!("{dir}data/{}", t.key);
    let mut entry = zip.by_name_seek(&entry_name).map_err(|e| {
        format!(
            "tensor '{name}': storage entry '{}': {e}",
            entry_name.escape_debug()
        )
    })?;
    let have = entry.size();
    if have > file_len {
        return Err(format!(
            "tensor '{name}': storage entry '{}' claims {have} bytes, more than the file's \
             {file_len}",
            entry_name.escape_debug()
        ));
    }
    let want = (t.storage_numel as u64).checked_mul(elem as u64);
    if want.is_none_or(|w| w > have) {
        return Err(format!(
            "tensor '{name}': storage entry '{}' holds {have} bytes, less than its {} elements \
             of {elem} bytes",
            entry_name.escape_debug(),
            t.storage_numel
        ));
    }
    // Fits: offset + numel <= storage_numel and storage_numel * elem <= have.
    let start = (t.offset * elem) as u64;
    let mut bytes = vec![0u8; numel * elem];
    entry
        .seek(SeekFrom::Start(start))
        .and_then(|_| entry.read_exact(&mut bytes))
        .map_err(|e| {
            format!(
                "tensor '{name}': reading storage '{}': {e}",
                t.key.escape_debug()
            )
        })?;
    let shape: Vec<usize> = if t.fortran {
        t.shape.iter().rev().copied().collect()
    } else {
        t.shape.clone()
    };
    let tensor =
        from_le_bytes(&bytes, dtype, shape).map_err(|e| format!("tensor '{name}': {e}"))?;
    if t.fortran {
        let dims: Vec<usize> = (0..t.shape.len()).rev().collect();
        return tensor
            .permute(dims)
            .and_then(|x| x.contiguous())
            .map_err(|e| format!("tensor '{name}': {e}"));
    }
    Ok(tensor)
}

/// A CPU tensor from little-endian bytes.
fn from_le_bytes(b: &[u8], dtype: DType, shape: Vec<usize>) -> candle_core::Result<Tensor> {
    macro_rules! conv {
        ($t:ty, $n:literal) => {{
            let v: Vec<$t> = b
                .chunks_exact($n)
                .map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    <$t>::from_le_bytes(a)
                })
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu)
        }};
    }
    match dtype {
        DType::F32 => conv!(f32, 4),
        DType::F64 => conv!(f64, 8),
        DType::F16 => conv!(half::f16, 2),
        DType::BF16 => conv!(half::bf16, 2),
        DType::I64 => conv!(i64, 8),
        DType::U8 => Tensor::from_vec(b.to_vec(), shape, &Device::Cpu),
        other => Err(candle_core::Error::Msg(format!("dtype {other:?} not read"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds pickles by hand, opcode by opcode.
    #[derive(Default)]
    struct P(Vec<u8>);

    impl P {
        fn new() -> Self {
            P(vec![0x80, 2])
        }
        fn op(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn str(mut self, s: &str) -> Self {
            self.0.push(b'X');
            self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        fn int(mut self, x: i32) -> Self {
            self.0.push(b'J');
            self.0.extend_from_slice(&x.to_le_bytes());
            self
        }
        fn global(self, module: &str, name: &str) -> Self {
            self.op(format!("c{module}\n{name}\n").as_bytes())
        }
        /// `('storage', torch.<ty>, key, 'cpu', numel)` as a persistent id.
        fn pid(self, ty: &str, key: &str, numel: i32) -> Self {
            self.op(b"(")
                .str("storage")
                .global("torch", ty)
                .str(key)
                .str("cpu")
                .int(numel)
                .op(b"tQ")
        }
        fn ints(mut self, v: &[i32]) -> Self {
            self.0.push(b'(');
            for &x in v {
                self = self.int(x);
            }
            self.op(b"t")
        }
        /// `name: _rebuild_tensor_v2(pid, offset, size, stride, False, OrderedDict())`.
        fn tensor(self, name: &str, key: &str, size: &[i32], stride: &[i32]) -> Self {
            let numel: i32 = size.iter().product();
            self.str(name)
                .global("torch._utils", "_rebuild_tensor_v2")
                .op(b"(")
                .pid("FloatStorage", key, numel)
                .int(0)
                .ints(size)
                .ints(stride)
                .op(&[0x89])
                .global("collections", "OrderedDict")
                .op(b")R")
                .op(b"tR")
        }
    }

    fn tiny() -> Vec<u8> {
        P::new()
            .op(b"}(")
            .tensor("a", "0", &[2, 3], &[3, 1])
            .tensor("b", "1", &[4], &[1])
            .op(b"u.")
            .0
    }

    fn zip_of(
        pkl: &[u8],
        storages: &[(&str, Vec<u8>)],
    ) -> zip::ZipArchive<std::io::Cursor<Vec<u8>>> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        w.start_file("archive/data.pkl", opts).unwrap();
        std::io::Write::write_all(&mut w, pkl).unwrap();
        for (k, b) in storages {
            w.start_file(format!("archive/data/{k}"), opts).unwrap();
            std::io::Write::write_all(&mut w, b).unwrap();
        }
        let bytes = w.finish().unwrap().into_inner();
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap()
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn a_tiny_state_dict_reads() {
        let refs = state_dict(&tiny(), &[]).unwrap();
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0].name, "a");
        assert_eq!(refs[0].shape, vec![2, 3]);
        assert_eq!(refs[1].key, "1");
        assert!(!refs[0].fortran);
        let a: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let mut z = zip_of(
            &tiny(),
            &[("0", f32_bytes(&a)), ("1", f32_bytes(&[9.0; 4]))],
        );
        let t = load(&mut z, "archive/", &refs[0], u64::MAX).unwrap();
        assert_eq!(t.dims(), &[2, 3]);
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), a);
        // A storage shorter than its persistent id declares.
        let mut z = zip_of(&tiny(), &[("0", f32_bytes(&a[..5]))]);
        let e = load(&mut z, "archive/", &refs[0], u64::MAX).unwrap_err();
        assert!(
            e.contains("tensor 'a'") && e.contains("holds 20 bytes"),
            "{e}"
        );
        // A storage entry claiming more bytes than the file holds is not read.
        let mut z = zip_of(&tiny(), &[("0", f32_bytes(&a))]);
        let e = load(&mut z, "archive/", &refs[0], 10).unwrap_err();
        assert!(e.contains("claims 24 bytes"), "{e}");
        // A storage missing from the archive.
        let e = load(&mut z, "archive/", &refs[1], u64::MAX).unwrap_err();
        assert!(e.contains("tensor 'b'"), "{e}");
    }

    #[test]
    fn a_state_dict_nested_under_a_key_is_found() {
        let p = P::new()
            .op(b"}(")
            .str("epoch")
            .int(3)
            .str("model")
            .op(b"}(")
            .tensor("w", "0", &[2], &[1])
            .op(b"uu.")
            .0;
        assert!(state_dict(&p, &[]).unwrap().is_empty());
        let refs = state_dict(&p, &["state_dict", "model"]).unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].name, "w");
    }

    fn err(p: &[u8]) -> String {
        state_dict(p, &["state_dict", "model"]).unwrap_err()
    }

    #[test]
    fn a_rebuild_with_two_arguments_is_an_error() {
        let p = P::new()
            .op(b"}(")
            .str("w")
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b"(")
            .pid("FloatStorage", "0", 2)
            .int(0)
            .op(b"tRu.")
            .0;
        let e = err(&p);
        assert!(
            e.contains("tensor 'w'") && e.contains("got 2 arguments"),
            "{e}"
        );
    }

    #[test]
    fn a_short_persistent_id_is_an_error() {
        let p = P::new()
            .op(b"}(")
            .str("w")
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((")
            .str("storage")
            .global("torch", "FloatStorage")
            .op(b"tQ")
            .int(0)
            .ints(&[2])
            .ints(&[1])
            .op(&[0x89, b'N'])
            .op(b"tRu.")
            .0;
        let e = err(&p);
        assert!(
            e.contains("tensor 'w'") && e.contains("persistent id"),
            "{e}"
        );
    }

    #[test]
    fn malformed_pickles_are_errors() {
        // Unknown opcode (INST, protocol 0's way to call a class).
        let e = err(&P::new().op(b"}i").0);
        assert!(e.contains("unsupported pickle opcode 0x69"), "{e}");
        // Truncated everywhere.
        let t = tiny();
        for n in 0..t.len() {
            let e = err(&t[..n]);
            assert!(e.contains("truncated"), "{n}: {e}");
        }
        // Stack underflow: SETITEM on an empty stack, POP past a MARK, TUPLE without MARK.
        for p in [
            &b"\x80\x02s."[..],
            b"\x80\x02}(.",
            b"\x80\x02\x85.",
            b"\x80\x02N.",
        ] {
            let e = err(p);
            assert!(
                e.contains("underflow") || e.contains("not a state dict"),
                "{p:?}: {e}"
            );
        }
        let e = err(b"\x80\x02Nt.");
        assert!(e.contains("without a MARK"), "{e}");
        // A memo key read before it was stored; APPEND to a dict; SETITEM to a list.
        assert!(err(b"\x80\x02h\x05.").contains("memo key 5"));
        assert!(err(b"\x80\x02}Na.").contains("not a list"));
        assert!(err(b"\x80\x02]NNs.").contains("not a dict"));
        // Too deep.
        let mut deep = vec![0x80, 2];
        deep.extend(std::iter::repeat_n(b'(', MAX_DEPTH + 1));
        assert!(err(&deep).contains("MARKs"));
        // A huge LONG4 length, a negative dimension, a non-contiguous stride.
        assert!(err(b"\x80\x02\x8b\xff\xff\xff\x7f.").contains("truncated"));
        let p = P::new()
            .op(b"}(")
            .tensor("w", "0", &[2, -1], &[1, 1])
            .op(b"u.")
            .0;
        assert!(err(&p).contains("is negative"), "{}", err(&p));
        let p = P::new()
            .op(b"}(")
            .tensor("w", "0", &[2, 3], &[6, 2])
            .op(b"u.")
            .0;
        let e = err(&p);
        assert!(
            e.contains("tensor 'w'") && e.contains("not contiguous"),
            "{e}"
        );
    }

    #[test]
    fn other_globals_are_refused_by_name() {
        let marker = std::env::temp_dir().join(format!("vitcx_pickle_unit_{}", std::process::id()));
        let cmd = format!("touch {}", marker.display());
        let p = P::new()
            .op(b"}(")
            .str("x")
            .global("os", "system")
            .str(&cmd)
            .op(&[0x85, b'R', b'u', b'.'])
            .0;
        let e = err(&p);
        assert!(e.contains("'os.system'"), "{e}");
        assert!(!marker.exists());
        // STACK_GLOBAL too, and a storage type only known by name.
        let p = P::new().str("builtins").str("eval").op(&[0x93, b'.']).0;
        assert!(err(&p).contains("'builtins.eval'"));
        let p = P::new().global("torch", "UntypedStorage").op(b".").0;
        assert!(err(&p).contains("'torch.UntypedStorage'"));
        // A supported global may not be called with arbitrary arguments.
        let p = P::new()
            .global("collections", "OrderedDict")
            .op(b"]")
            .op(&[0x85, b'R', b'.'])
            .0;
        assert!(err(&p).contains("OrderedDict called with arguments"));
    }

    /// `{name: _rebuild_tensor_v2(('storage', storage, '0', ..., numel), offset, (2,), (1,),
    /// False, None)}`.
    fn one_tensor(name: &str, storage: &str, numel: i32, offset: i32) -> Vec<u8> {
        P::new()
            .op(b"}(")
            .str(name)
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b"(")
            .pid(storage, "0", numel)
            .int(offset)
            .ints(&[2])
            .ints(&[1])
            .op(&[0x89, b'N'])
            .op(b"tRu.")
            .0
    }

    #[test]
    fn unsupported_storage_types_name_the_tensor() {
        let p = one_tensor("ids", "IntStorage", 2, 0);
        let refs = state_dict(&p, &[]).unwrap();
        let mut z = zip_of(&p, &[("0", vec![0; 8])]);
        let e = load(&mut z, "archive/", &refs[0], u64::MAX).unwrap_err();
        assert!(
            e.contains("tensor 'ids'") && e.contains("IntStorage"),
            "{e}"
        );
    }

    #[test]
    fn offsets_past_the_storage_are_errors() {
        let p = one_tensor("w", "FloatStorage", 4, 3);
        let refs = state_dict(&p, &[]).unwrap();
        let mut z = zip_of(&p, &[("0", vec![0; 16])]);
        let e = load(&mut z, "archive/", &refs[0], u64::MAX).unwrap_err();
        assert!(e.contains("tensor 'w'") && e.contains("do not fit"), "{e}");
    }

    /// candle's reader deep-copies a list on every memo GET: appending a list into itself
    /// doubles it each time, so this 669-byte pickle needed 2^133 objects.
    fn memo_bomb(rounds: usize) -> Vec<u8> {
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..rounds {
            p.extend_from_slice(b"h\x00h\x00a0");
        }
        p.push(b'h');
        p.push(0);
        p.push(b'.');
        p
    }

    #[test]
    fn the_memo_bomb_is_refused_quickly() {
        let start = std::time::Instant::now();
        let p = memo_bomb(133);
        let e = err(&p);
        assert!(e.contains("a list, not a state dict"), "{e}");
        // A bomb as large as the pickle bound allows still stops at the object bound.
        let e = err(&memo_bomb(MAX_OBJECTS + 10));
        assert!(e.contains("more than 10000000 objects"), "{e}");
        assert!(start.elapsed().as_secs() < 10, "{:?}", start.elapsed());
    }

    #[test]
    fn fortran_order_and_size_one_strides_are_contiguous() {
        let s = |shape: &[usize], stride: &[usize]| {
            (
                contiguous(shape, stride, false),
                contiguous(shape, stride, true),
            )
        };
        assert_eq!(s(&[2, 3], &[3, 1]), (true, false));
        assert_eq!(s(&[2, 3], &[1, 2]), (false, true));
        assert_eq!(s(&[1, 3], &[99, 1]), (true, true));
        assert_eq!(s(&[0, 3], &[5, 7]), (true, true));
        assert_eq!(s(&[], &[]), (true, true));
        assert_eq!(s(&[2, 3], &[6, 2]), (false, false));
    }
}
