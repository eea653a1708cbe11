//! PyTorch checkpoints as `torch.save` writes them (`pytorch_model.bin`, and the shards
//! THUDM and older transformers ship): a zip of `<name>/data.pkl`, the state dict pickled, and
//! one uncompressed entry `<name>/data/<key>` per storage. The pickle is read as data
//! ([`super::pickle`]), and each tensor's bytes are read from its entry straight into the
//! tensor: a 2 GB shard is never held in memory. Every entry must be stored, as torch.save
//! writes them: a deflated one could inflate past what it declares.
use super::pickle::{self, TensorRef};
use crate::error::{Error, Result};
use crate::weights::Loading;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use zip::ZipArchive;

/// The largest `data.pkl` read. torch.save's pickle is about 100 bytes a tensor (measured on
/// THUDM's ChatGLM2 shards), so 16 MiB is over 100 000 tensors, past what the pickle reader's
/// own cap ([`pickle::MAX_CELLS`]) lets a file hold.
pub const MAX_PICKLE: u64 = 16 << 20;

/// How many times its own size a file's tensors may hold together: tied weights (T5's three
/// embeddings) view one storage under several names, and nothing else does; more means
/// storages viewed over and over, or zip entries that overlap in the file.
pub const MAX_SHARING: u64 = 4;

/// `entry` of `path`, refused unless it is stored uncompressed.
fn stored<'a>(
    path: &Path,
    archive: &'a mut ZipArchive<BufReader<File>>,
    entry: &str,
) -> Result<zip::read::ZipFile<'a, BufReader<File>>> {
    let found = archive.by_name(entry).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        reason: format!("zip entry {entry}: {e}"),
    })?;
    if found.compression() != zip::CompressionMethod::Stored {
        return Err(Error::CheckpointRefused {
            path: path.to_path_buf(),
            what: format!(
                "zip entry {entry} is compressed ({}), where torch.save stores every entry as \
                 is; a compressed entry may inflate past the size it declares",
                found.compression()
            ),
        });
    }
    Ok(found)
}

/// One `torch.save` file: its tensors' names and places, read on demand.
pub struct PytorchFile {
    path: PathBuf,
    archive: ZipArchive<BufReader<File>>,
    /// The archive's top folder with its slash (`pytorch_model/`).
    dir: String,
    tensors: Vec<(String, TensorRef)>,
}

impl PytorchFile {
    /// Opens `path` and reads its pickle (no tensor yet): refuses one that names a global or
    /// an opcode outside what a state dict needs.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Weights {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(Error::opening(path, "model weights"))?;
        let mut archive = ZipArchive::new(BufReader::new(file)).map_err(|e| {
            bad(format!(
                "not a zip archive as torch.save writes ({e}): cut short, or in the format of \
                 PyTorch before 1.6, which graft does not read"
            ))
        })?;
        let pickles: Vec<String> = archive
            .file_names()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .map(str::to_string)
            .collect();
        let [pkl] = pickles.as_slice() else {
            return Err(bad(format!(
                "expected one `<name>/data.pkl` entry as torch.save writes, found {}",
                pickles.len()
            )));
        };
        let dir = pkl.trim_end_matches("data.pkl").to_string();
        let byteorder = format!("{dir}byteorder");
        if archive.index_for_name(&byteorder).is_some() {
            let mut order = String::new();
            stored(path, &mut archive, &byteorder)?
                .take(16)
                .read_to_string(&mut order)
                .map_err(|e| bad(format!("{dir}byteorder: {e}")))?;
            if order != "little" {
                return Err(bad(format!(
                    "the tensors are stored {order}-endian; graft reads little-endian ones"
                )));
            }
        }
        let entry = stored(path, &mut archive, pkl)?;
        if entry.size() > MAX_PICKLE {
            return Err(Error::CheckpointRefused {
                path: path.to_path_buf(),
                what: format!(
                    "{pkl} is {} bytes; graft reads state-dict pickles of {MAX_PICKLE} at most",
                    entry.size()
                ),
            });
        }
        let mut bytes = Vec::new();
        entry
            .take(MAX_PICKLE)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("{pkl}: {e}")))?;
        let tensors = pickle::state_dict(&bytes).map_err(|p| match p {
            pickle::Problem::Refused(what) => Error::PickleRefused {
                path: path.to_path_buf(),
                what,
            },
            pickle::Problem::Hostile(what) => Error::CheckpointRefused {
                path: path.to_path_buf(),
                what: format!("{pkl}: {what}"),
            },
            pickle::Problem::Malformed(reason) => bad(format!("{pkl}: {reason}")),
        })?;
        shared_at_most(path, &tensors)?;
        Ok(Self {
            path: path.to_path_buf(),
            archive,
            dir,
            tensors,
        })
    }

    /// The tensors' names, in the file's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }

    /// Reads every tensor in turn (on the CPU, in its stored dtype) and hands it to `keep`.
    pub fn read_each(mut self, mut keep: impl FnMut(String, Tensor) -> Result<()>) -> Result<()> {
        for (name, place) in std::mem::take(&mut self.tensors) {
            let tensor = self.read(&name, &place)?;
            keep(name, tensor)?;
        }
        Ok(())
    }

    fn read(&mut self, name: &str, t: &TensorRef) -> Result<Tensor> {
        let bad = |reason: String| Error::Weights {
            path: self.path.clone(),
            reason: format!("tensor `{name}`: {reason}"),
        };
        let dtype = t.storage.dtype.ok_or_else(|| {
            bad(format!(
                "stored as torch.{}, which graft does not read",
                t.storage.name
            ))
        })?;
        // torch.save writes a state dict's tensors contiguous; a dimension of one may have any
        // stride.
        let mut expected = 1usize;
        for (&size, &stride) in t.shape.iter().zip(&t.stride).rev() {
            if size != 1 && stride != expected {
                return Err(bad(format!(
                    "size {:?} with stride {:?} is not contiguous",
                    t.shape, t.stride
                )));
            }
            expected = expected.saturating_mul(size);
        }
        let count = t
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|_| t.shape.len() == t.stride.len());
        let end = count.and_then(|n| n.checked_add(t.offset));
        let (Some(count), Some(end)) = (count, end) else {
            return Err(bad(format!(
                "size {:?} and stride {:?} do not describe a tensor",
                t.shape, t.stride
            )));
        };
        if end > t.storage_len {
            return Err(bad(format!(
                "elements {}..{end} of a storage of {}",
                t.offset, t.storage_len
            )));
        }
        let entry_name = format!("{}data/{}", self.dir, t.key);
        let entry_error = |e: zip::result::ZipError| bad(format!("zip entry {entry_name}: {e}"));
        // (zip's seekable entry reports positions in the archive, not in the entry.)
        let size = stored(&self.path, &mut self.archive, &entry_name)?.size();
        let mut entry = self
            .archive
            .by_name_seek(&entry_name)
            .map_err(entry_error)?;
        let elem = t.storage.size as u64;
        if Some(size) != (t.storage_len as u64).checked_mul(elem) {
            return Err(bad(format!(
                "zip entry {entry_name} holds {size} bytes, not the {} elements of torch.{}",
                t.storage_len, t.storage.name
            )));
        }
        entry
            .seek(SeekFrom::Start(t.offset as u64 * elem))
            .map_err(|e| bad(format!("zip entry {entry_name}: {e}")))?;
        let (r, shape) = (&mut entry, t.shape.as_slice());
        match dtype {
            DType::F16 => decode(r, count, shape, half::f16::from_le_bytes),
            DType::BF16 => decode(r, count, shape, half::bf16::from_le_bytes),
            DType::F32 => decode(r, count, shape, f32::from_le_bytes),
            DType::F64 => decode(r, count, shape, f64::from_le_bytes),
            DType::I64 => decode(r, count, shape, i64::from_le_bytes),
            DType::I32 => decode(r, count, shape, i32::from_le_bytes),
            DType::I16 => decode(r, count, shape, i16::from_le_bytes),
            DType::U8 => decode(r, count, shape, u8::from_le_bytes),
            other => Err(format!("dtype {other:?}")),
        }
        .map_err(|e| bad(format!("zip entry {entry_name}: {e}")))
    }
}

/// Refuses tensors that together hold more than [`MAX_SHARING`] times the file's bytes.
fn shared_at_most(path: &Path, tensors: &[(String, TensorRef)]) -> Result<()> {
    let file_len = std::fs::metadata(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut total = 0u64;
    for (_, t) in tensors {
        // A view past its storage is refused when read; here it only counts as huge.
        let bytes = t
            .shape
            .iter()
            .try_fold(t.storage.size as u64, |n, &d| n.checked_mul(d as u64))
            .unwrap_or(u64::MAX);
        total = total.saturating_add(bytes);
    }
    if total > file_len.saturating_mul(MAX_SHARING) {
        return Err(Error::CheckpointRefused {
            path: path.to_path_buf(),
            what: format!(
                "its tensors hold {total} bytes, over {MAX_SHARING} times the file's \
                 {file_len}: storages viewed by many tensors, or zip entries that overlap"
            ),
        });
    }
    Ok(())
}

/// A tensor of `shape` from `count` little-endian values of `N` bytes, decoded through a small
/// buffer into the vector the tensor takes over (the bytes are never held twice).
fn decode<T: candle_core::WithDType, const N: usize>(
    reader: &mut impl Read,
    count: usize,
    shape: &[usize],
    decode: fn([u8; N]) -> T,
) -> std::result::Result<Tensor, String> {
    const CHUNK: usize = 1 << 14;
    let mut out = Vec::with_capacity(count);
    let mut buf = vec![0u8; CHUNK * N];
    while out.len() < count {
        let bytes = &mut buf[..(count - out.len()).min(CHUNK) * N];
        reader.read_exact(bytes).map_err(|e| e.to_string())?;
        out.extend(bytes.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            decode(a)
        }));
    }
    Tensor::from_vec(out, shape, &Device::Cpu).map_err(|e| e.to_string())
}

/// Every tensor of one `torch.save` file, into `loading`.
pub fn read_file(path: &Path, loading: &mut Loading) -> Result<()> {
    PytorchFile::open(path)?.read_each(|name, tensor| loading.add(path, name, tensor))
}

/// Every tensor of one `torch.save` file, on the CPU in its stored dtype (an adapter's few).
pub fn read_all(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    PytorchFile::open(path)?.read_each(|name, tensor| {
        tensors.insert(name, tensor);
        Ok(())
    })?;
    Ok(tensors)
}
