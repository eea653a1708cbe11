//! Hugging Face's safetensors checkpoints: a file read into [`Weights`], and tensors and
//! configs written back.
use crate::error::{Error, Result};
use crate::weights::{Loading, Weights};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

impl Weights {
    /// One safetensors file.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let mut loading = Loading::new(dtype, device, None);
        read_file(path, &mut loading)?;
        loading.finish(path)
    }
}

/// The tensors of one safetensors file, into `loading`. The file is memory-mapped and read
/// tensor by tensor, each converted as it is read: a shard is never held whole in memory, nor
/// the model in its stored dtype beside the converted one.
pub fn read_file(path: &Path, loading: &mut Loading) -> Result<()> {
    if !path.exists() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            what: "model weights",
        });
    }
    let bad = |e: candle_core::Error| Error::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    // SAFETY: the file is only read, and each tensor is copied out before the map is dropped;
    // as with every memory map, a file truncated by another process meanwhile is undefined.
    let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(bad)?;
    for (name, _) in file.tensors() {
        let tensor = file.load(&name, &Device::Cpu).map_err(bad)?;
        loading.add(path, name, tensor)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename: a crash leaves either
/// the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Writes `tensors` (each in its own dtype) as one safetensors file, through a temporary file,
/// fsync and rename, as [`write_atomic`] does.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let map: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    let tmp = tmp_path(path);
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Writes `json` pretty-printed to `path`, as [`write_atomic`] does.
pub fn save_json(json: &serde_json::Value, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(json).map_err(|source| Error::Config {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, text.as_bytes())
}

/// `path`'s name with `.tmp-<pid>` appended, beside it.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// An I/O error on `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { path, source }
}
