//! The pickle of a `torch.save` checkpoint (`data.pkl`) read as data: a small stack machine
//! that knows the opcodes a state dict is written with and builds values for the few globals
//! that rebuild tensors, and calls nothing. Any other opcode or global is refused by name,
//! since Python's unpickler would import and call it (`posix.system`, `builtins.eval`).
//!
//! What the machine builds is capped too ([`MAX_CELLS`], [`MAX_RANK`], [`MAX_KEY`]), so that a
//! small forged pickle (millions of MARKs, one tensor under a million names through the memo)
//! costs no more memory than a real state dict's.
use candle_core::DType;
use std::collections::HashMap;

/// Why a pickle is not read: something it would run, bytes that are not a state dict, or a
/// pickle that would make the reader build more than a state dict needs.
#[derive(Debug)]
pub enum Problem {
    Refused(String),
    Malformed(String),
    Hostile(String),
}

/// The most cells the machine builds for one pickle: a cell is a value, a container's slot,
/// a stack slot from the memo, a MARK or a memo entry, each at most a [`Node`] (32 bytes) or a
/// map entry, so the machine stays under about 64 MiB. torch.save's pickle costs about 45
/// cells a tensor (measured on THUDM's ChatGLM2 shards), so this reads some 20 000 tensors a
/// file, several times the largest torch.save shards (a few thousand tensors). Each opcode
/// builds at most one value, so a short pickle never reaches it; a long one stops here.
pub const MAX_CELLS: usize = 1 << 20;

/// Cells a tensor is charged: its boxed view, shape, stride and storage key, about 300 bytes.
const TENSOR_CELLS: usize = 8;

/// The highest rank read. Weights are rank 1 to 4 (a 3-D convolution's kernel is rank 5), and
/// PyTorch's CUDA kernels stop at 25; 8 leaves room and keeps every view small.
pub const MAX_RANK: usize = 8;

/// The longest storage key read: torch.save names storages by number (`"0"`, `"731"`), and
/// each tensor keeps a copy of its storage's key.
pub const MAX_KEY: usize = 64;

type Res<T> = std::result::Result<T, Problem>;

fn malformed<T>(what: impl Into<String>) -> Res<T> {
    Err(Problem::Malformed(what.into()))
}

fn hostile<T>(what: impl Into<String>) -> Res<T> {
    Err(Problem::Hostile(what.into()))
}

/// A `torch.<Name>Storage` class, which `torch.save` names as a storage's element type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StorageType {
    pub name: &'static str,
    /// None: a type candle has no dtype for.
    pub dtype: Option<DType>,
    pub size: usize,
}

static STORAGES: [StorageType; 10] = [
    storage("HalfStorage", Some(DType::F16), 2),
    storage("BFloat16Storage", Some(DType::BF16), 2),
    storage("FloatStorage", Some(DType::F32), 4),
    storage("DoubleStorage", Some(DType::F64), 8),
    storage("LongStorage", Some(DType::I64), 8),
    storage("IntStorage", Some(DType::I32), 4),
    storage("ShortStorage", Some(DType::I16), 2),
    storage("ByteStorage", Some(DType::U8), 1),
    storage("CharStorage", None, 1),
    storage("BoolStorage", None, 1),
];

const fn storage(name: &'static str, dtype: Option<DType>, size: usize) -> StorageType {
    StorageType { name, dtype, size }
}

/// A tensor as `torch._utils._rebuild_tensor_v2` would make it: a view of a storage, whose
/// bytes are the zip entry `data/<key>`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub key: String,
    pub storage: StorageType,
    /// Elements in the storage.
    pub storage_len: usize,
    /// Elements before the tensor's first.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// The globals a state dict's pickle names, and the only ones read.
#[derive(Debug, Clone, Copy)]
enum Global {
    RebuildTensor,
    RebuildParameter,
    OrderedDict,
    Storage(&'static StorageType),
}

/// The allowed globals by module and name, for the refusal's message too.
fn global(module: &str, name: &str) -> Res<Global> {
    let found = match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch", _) => STORAGES
            .iter()
            .find(|s| s.name == name)
            .map(Global::Storage),
        _ => None,
    };
    found.ok_or_else(|| {
        Problem::Refused(format!(
            "the pickle names the global `{module}.{name}`, which a state dict does not need \
             (read: torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, \
             collections.OrderedDict, torch.*Storage)"
        ))
    })
}

/// A value the machine has built; containers hold indices into its arena, so that a memo
/// entry and the stack share one value, as in Python, and nothing is deep to drop.
#[derive(Debug)]
enum Node {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<usize>),
    List(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global(Global),
    Storage(Box<StorageRef>),
    // Boxed, as the storage, to keep every node at 32 bytes (what MAX_CELLS counts on).
    Tensor(Box<TensorRef>),
}

/// A persistent id's storage: its element type, its zip entry's key and its element count.
#[derive(Debug)]
struct StorageRef {
    ty: StorageType,
    key: String,
    len: usize,
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::None => "None",
            Node::Bool => "bool",
            Node::Int(_) => "int",
            Node::Float => "float",
            Node::Str(_) => "str",
            Node::Tuple(_) => "tuple",
            Node::List(_) => "list",
            Node::Dict(_) => "dict",
            Node::Global(_) => "global",
            Node::Storage(..) => "storage",
            Node::Tensor(_) => "tensor",
        }
    }
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<usize>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u64, usize>,
    /// Cells built so far, against [`MAX_CELLS`].
    cells: usize,
}

/// The tensors of a state dict pickled by `torch.save` (a dict or OrderedDict of name to
/// tensor), in the pickle's order.
pub fn state_dict(input: &[u8]) -> Res<Vec<(String, TensorRef)>> {
    let mut m = Machine {
        input,
        pos: 0,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        cells: 0,
    };
    let top = m.run()?;
    let Node::Dict(items) = &m.nodes[top] else {
        return malformed(format!(
            "the pickle holds a {}, not a state dict",
            m.nodes[top].kind()
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    // Each name once and each tensor under one name, as torch.save writes a state dict: a
    // tensor the memo hands to many names would be read once for each.
    let mut names = std::collections::HashSet::new();
    let mut tensors: HashMap<usize, &str> = HashMap::new();
    for &(k, v) in items {
        let Node::Str(name) = &m.nodes[k] else {
            return malformed(format!("a state-dict key is a {}", m.nodes[k].kind()));
        };
        if !names.insert(name.as_str()) {
            return hostile(format!("the state dict names `{name}` twice"));
        }
        if let Some(first) = tensors.insert(v, name) {
            return hostile(format!(
                "`{name}` is the tensor of `{first}` again, through the pickle's memo; \
                 torch.save writes each name its own tensor"
            ));
        }
        match &m.nodes[v] {
            Node::Tensor(t) => out.push((name.clone(), TensorRef::clone(t))),
            other => return malformed(format!("`{name}` holds a {}, not a tensor", other.kind())),
        }
    }
    Ok(out)
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Res<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.input.len());
        let Some(end) = end else {
            return malformed(format!(
                "the pickle ends inside an opcode at byte {}",
                self.pos
            ));
        };
        let bytes = &self.input[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn line(&mut self) -> Res<String> {
        let rest = &self.input[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return malformed("a GLOBAL's name has no end of line");
        };
        let text = self.take(n)?.to_vec();
        self.pos += 1;
        String::from_utf8(text).or_else(|_| malformed("a GLOBAL's name is not UTF-8"))
    }

    fn string(&mut self, len: u64) -> Res<String> {
        let len = usize::try_from(len).or_else(|_| malformed("a string longer than memory"))?;
        let bytes = self.take(len)?.to_vec();
        String::from_utf8(bytes).or_else(|_| malformed("a string is not UTF-8"))
    }

    /// Counts `n` more cells built, refusing the pickle past [`MAX_CELLS`].
    fn charge(&mut self, n: usize) -> Res<()> {
        self.cells = self.cells.saturating_add(n);
        if self.cells > MAX_CELLS {
            return hostile(format!(
                "the pickle builds more than {MAX_CELLS} values, MARKs and memo entries (at \
                 byte {} of {}); a state dict needs about 45 a tensor",
                self.pos,
                self.input.len()
            ));
        }
        Ok(())
    }

    fn push(&mut self, node: Node) -> Res<()> {
        self.charge(1)?;
        self.nodes.push(node);
        self.stack.push(self.nodes.len() - 1);
        Ok(())
    }

    /// Pushes a value already built (from the memo, or a parameter's tensor).
    fn push_again(&mut self, id: usize) -> Res<()> {
        self.charge(1)?;
        self.stack.push(id);
        Ok(())
    }

    /// A tuple of the values `items`, each a cell.
    fn push_tuple(&mut self, items: Vec<usize>) -> Res<()> {
        self.charge(items.len())?;
        self.push(Node::Tuple(items))
    }

    fn pop(&mut self) -> Res<usize> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return malformed("an opcode takes a value from below a MARK");
        }
        self.stack.pop().map_or_else(
            || malformed("an opcode takes a value from an empty stack"),
            Ok,
        )
    }

    fn pop_mark(&mut self) -> Res<Vec<usize>> {
        let Some(mark) = self.marks.pop() else {
            return malformed("an opcode needs a MARK that is not there");
        };
        Ok(self.stack.split_off(mark))
    }

    fn top(&self) -> Res<usize> {
        match self.stack.last() {
            Some(&top) if self.marks.last().is_none_or(|&m| m < self.stack.len()) => Ok(top),
            _ => malformed("an opcode needs a value on the stack"),
        }
    }

    fn memo_put(&mut self, key: u64) -> Res<()> {
        self.charge(1)?;
        let top = self.top()?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Res<()> {
        let Some(&id) = self.memo.get(&key) else {
            return malformed(format!("memo entry {key} is read before it is written"));
        };
        self.push_again(id)
    }

    fn int(&self, id: usize, what: &str) -> Res<usize> {
        match self.nodes[id] {
            Node::Int(v) if v >= 0 => usize::try_from(v).or_else(|_| malformed(what.to_string())),
            _ => malformed(format!("{what} is a {}", self.nodes[id].kind())),
        }
    }

    fn ints(&self, id: usize, what: &str) -> Res<Vec<usize>> {
        let Node::Tuple(items) = &self.nodes[id] else {
            return malformed(format!("{what} is a {}", self.nodes[id].kind()));
        };
        if items.len() > MAX_RANK {
            return hostile(format!(
                "{what} has {} dimensions; graft reads tensors of rank {MAX_RANK} at most",
                items.len()
            ));
        }
        items.iter().map(|&i| self.int(i, what)).collect()
    }

    fn empty_or_none(&self, id: usize, what: &str) -> Res<()> {
        match &self.nodes[id] {
            Node::None => Ok(()),
            Node::Dict(items) if items.is_empty() => Ok(()),
            other => malformed(format!("{what} is a non-empty {}", other.kind())),
        }
    }

    /// Runs to STOP and returns the pickled value.
    fn run(&mut self) -> Res<usize> {
        loop {
            let at = self.pos;
            let op = self.array::<1>()?[0];
            match op {
                0x80 => {
                    self.take(1)?; // PROTO: the opcodes themselves say what is read
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint
                }
                b'.' => return self.pop(),
                b'(' => {
                    self.charge(1)?;
                    self.marks.push(self.stack.len());
                }
                b'}' => self.push(Node::Dict(Vec::new()))?,
                b']' => self.push(Node::List(Vec::new()))?,
                b')' => self.push(Node::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_tuple(items)?;
                }
                0x85..=0x87 => {
                    let mut items = vec![0; usize::from(op - 0x84)];
                    for slot in items.iter_mut().rev() {
                        *slot = self.pop()?;
                    }
                    self.push_tuple(items)?;
                }
                b'X' => {
                    let len = u32::from_le_bytes(self.array()?);
                    let s = self.string(len.into())?;
                    self.push(Node::Str(s))?;
                }
                0x8c => {
                    let len = self.array::<1>()?[0];
                    let s = self.string(len.into())?;
                    self.push(Node::Str(s))?;
                }
                0x8d => {
                    let len = u64::from_le_bytes(self.array()?);
                    let s = self.string(len)?;
                    self.push(Node::Str(s))?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Node::Int(v.into()))?;
                }
                b'K' => {
                    let v = self.array::<1>()?[0];
                    self.push(Node::Int(v.into()))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Node::Int(v.into()))?;
                }
                0x8a => {
                    let n = usize::from(self.array::<1>()?[0]);
                    if n > 8 {
                        return malformed(format!("an integer of {n} bytes at byte {at}"));
                    }
                    let bytes = self.take(n)?;
                    // Little-endian two's complement, sign-extended from its top byte.
                    let fill = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                        0xff
                    } else {
                        0
                    };
                    let mut full = [fill; 8];
                    full[..n].copy_from_slice(bytes);
                    self.push(Node::Int(i64::from_le_bytes(full)))?;
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Node::Float)?;
                }
                b'N' => self.push(Node::None)?,
                0x88 | 0x89 => self.push(Node::Bool)?,
                b'q' => {
                    let key = self.array::<1>()?[0];
                    self.memo_put(key.into())?;
                }
                b'r' => {
                    let key = u32::from_le_bytes(self.array()?);
                    self.memo_put(key.into())?;
                }
                0x94 => self.memo_put(self.memo.len() as u64)?,
                b'h' => {
                    let key = self.array::<1>()?[0];
                    self.memo_get(key.into())?;
                }
                b'j' => {
                    let key = u32::from_le_bytes(self.array()?);
                    self.memo_get(key.into())?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = global(&module, &name)?;
                    self.push(Node::Global(g))?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Node::Str(module), Node::Str(name)) =
                        (&self.nodes[module], &self.nodes[name])
                    else {
                        return malformed("STACK_GLOBAL's module and name are not strings");
                    };
                    let g = global(module, name)?;
                    self.push(Node::Global(g))?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let node = self.persistent(pid)?;
                    self.push(node)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.reduce(callable, args)?;
                }
                b'b' => {
                    // An OrderedDict's attributes (state_dict()'s `_metadata`): not items.
                    self.pop()?;
                    let obj = self.top()?;
                    if !matches!(self.nodes[obj], Node::Dict(_)) {
                        return Err(Problem::Refused(format!(
                            "BUILD sets the state of a {} (byte {at})",
                            self.nodes[obj].kind()
                        )));
                    }
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.extend_dict(&[key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return malformed("SETITEMS with a key and no value");
                    }
                    self.extend_dict(&items)?;
                }
                b'a' => {
                    let value = self.pop()?;
                    self.extend_list(&[value])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_list(&items)?;
                }
                other => {
                    return Err(Problem::Refused(format!(
                        "the pickle has opcode {} at byte {at}, which a state dict does not \
                         need",
                        opcode_name(other)
                    )))
                }
            }
        }
    }

    fn extend_dict(&mut self, items: &[usize]) -> Res<()> {
        self.charge(items.len())?;
        let top = self.top()?;
        let Node::Dict(d) = &mut self.nodes[top] else {
            return malformed(format!("SETITEM on a {}", self.nodes[top].kind()));
        };
        d.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
        Ok(())
    }

    fn extend_list(&mut self, items: &[usize]) -> Res<()> {
        self.charge(items.len())?;
        let top = self.top()?;
        let Node::List(l) = &mut self.nodes[top] else {
            return malformed(format!("APPEND on a {}", self.nodes[top].kind()));
        };
        l.extend_from_slice(items);
        Ok(())
    }

    /// torch.save's storage reference: `('storage', torch.<T>Storage, key, location, numel)`.
    fn persistent(&self, pid: usize) -> Res<Node> {
        let parts = match &self.nodes[pid] {
            Node::Tuple(parts) if parts.len() == 5 => parts,
            other => {
                return malformed(format!(
                    "a persistent id is a {}, not torch.save's storage tuple",
                    other.kind()
                ))
            }
        };
        let (Node::Str(tag), Node::Global(Global::Storage(ty)), Node::Str(key)) = (
            &self.nodes[parts[0]],
            &self.nodes[parts[1]],
            &self.nodes[parts[2]],
        ) else {
            return malformed("a persistent id is not ('storage', torch.<T>Storage, key, ...)");
        };
        if tag != "storage" {
            return malformed(format!("a persistent id of kind `{tag}`"));
        }
        if key.len() > MAX_KEY {
            return hostile(format!(
                "a storage key of {} bytes; torch.save names storages by number",
                key.len()
            ));
        }
        let len = self.int(parts[4], "a storage's size")?;
        Ok(Node::Storage(Box::new(StorageRef {
            ty: **ty,
            key: key.clone(),
            len,
        })))
    }

    fn reduce(&mut self, callable: usize, args: usize) -> Res<()> {
        let Node::Global(g) = self.nodes[callable] else {
            return Err(Problem::Refused(format!(
                "REDUCE calls a {}",
                self.nodes[callable].kind()
            )));
        };
        let Node::Tuple(args) = &self.nodes[args] else {
            return malformed(format!(
                "REDUCE's arguments are a {}",
                self.nodes[args].kind()
            ));
        };
        let args = args.clone();
        match g {
            Global::OrderedDict if args.is_empty() => self.push(Node::Dict(Vec::new()))?,
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            Global::RebuildTensor if args.len() == 6 || args.len() == 7 => {
                let Node::Storage(storage) = &self.nodes[args[0]] else {
                    return malformed("_rebuild_tensor_v2's storage is not a storage");
                };
                let (storage, key, storage_len) = (storage.ty, storage.key.clone(), storage.len);
                self.empty_or_none(args[5], "a tensor's backward hooks")?;
                if let Some(&meta) = args.get(6) {
                    self.empty_or_none(meta, "a tensor's metadata")?;
                }
                let tensor = TensorRef {
                    key,
                    storage,
                    storage_len,
                    offset: self.int(args[1], "a tensor's storage offset")?,
                    shape: self.ints(args[2], "a tensor's size")?,
                    stride: self.ints(args[3], "a tensor's stride")?,
                };
                self.charge(TENSOR_CELLS)?;
                self.push(Node::Tensor(Box::new(tensor)))?;
            }
            // (data, requires_grad, backward_hooks): the tensor itself.
            Global::RebuildParameter if args.len() == 3 => {
                if !matches!(self.nodes[args[0]], Node::Tensor(_)) {
                    return malformed("_rebuild_parameter's data is not a tensor");
                }
                self.empty_or_none(args[2], "a parameter's backward hooks")?;
                self.push_again(args[0])?;
            }
            Global::Storage(s) => {
                return Err(Problem::Refused(format!("REDUCE calls torch.{}", s.name)))
            }
            _ => return malformed(format!("REDUCE calls {g:?} with {} arguments", args.len())),
        }
        Ok(())
    }
}

/// Pickle's name for an opcode byte, for refusals.
fn opcode_name(op: u8) -> String {
    let name = match op {
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        0x82..=0x84 => "EXT",
        b'P' => "PERSID",
        b'I' => "INT",
        b'L' => "LONG",
        0x8b => "LONG4",
        b'F' => "FLOAT",
        b'S' | b'T' | b'U' => "STRING",
        b'B' | b'C' | 0x8e => "BYTES",
        b'V' => "UNICODE",
        b'p' => "PUT",
        b'g' => "GET",
        b'l' => "LIST",
        b'd' => "DICT",
        b'0' => "POP",
        b'2' => "DUP",
        b'1' => "POP_MARK",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "",
    };
    if name.is_empty() {
        format!("{op:#04x}")
    } else {
        format!("{name} ({op:#04x})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_32_bytes_as_max_cells_assumes() {
        assert!(
            std::mem::size_of::<Node>() <= 32,
            "{}",
            std::mem::size_of::<Node>()
        );
    }
}
