//! Hugging Face's safetensors checkpoints: a model folder's file or shards read into
//! [`Weights`], and tensors and configs written back.
use crate::error::{Error, Result};
use crate::quant::QuantizedWeight;
use crate::weights::{Quantizing, Weights};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

impl Weights {
    /// One safetensors file.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_quantizing(path, dtype, device, None)
    }

    /// One safetensors file, the tensors `quantizing` names kept quantized.
    fn load_quantizing(
        path: &Path,
        dtype: DType,
        device: &Device,
        quantizing: Option<&Quantizing>,
    ) -> Result<Self> {
        let (dense, quantized) = read_file(path, dtype, device, quantizing)?;
        Self::from_parts(path, dense, quantized, dtype)
    }

    /// The weights of a Hugging Face model folder: `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`; the tensors `quantizing` names are quantized as they
    /// are read, so the model is never held whole unquantized.
    pub fn load_folder(
        dir: &Path,
        dtype: DType,
        device: &Device,
        quantizing: Option<&Quantizing>,
    ) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if !index.is_file() {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                refuse_pickles(dir)?;
            }
            return Self::load_quantizing(&single, dtype, device, quantizing);
        }
        let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
            path: index.clone(),
            source,
        })?;
        let parsed: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Config {
                path: index.clone(),
                source,
            })?;
        let map = parsed
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Weights {
                path: index.clone(),
                reason: "no `weight_map` object".into(),
            })?;
        let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shards.sort_unstable();
        shards.dedup();
        let (mut tensors, mut quantized) = (HashMap::new(), HashMap::new());
        for shard in shards {
            let (dense, blocks) = read_file(&dir.join(shard), dtype, device, quantizing)?;
            tensors.extend(dense);
            quantized.extend(blocks);
        }
        Self::from_parts(&index, tensors, quantized, dtype)
    }
}

/// The dense and the quantized tensors of one safetensors file.
type Read = (HashMap<String, Tensor>, HashMap<String, QuantizedWeight>);

/// The tensors of one safetensors file, floating-point ones in `dtype`, those `quantizing`
/// names quantized. The file is memory-mapped and read tensor by tensor, each converted as it
/// is read: a shard is never held whole in memory, nor the model in its stored dtype beside
/// the converted one.
fn read_file(
    path: &Path,
    dtype: DType,
    device: &Device,
    quantizing: Option<&Quantizing>,
) -> Result<Read> {
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
    let (mut tensors, mut quantized) = (HashMap::new(), HashMap::new());
    for (name, _) in file.tensors() {
        let tensor = file.load(&name, &Device::Cpu).map_err(bad)?;
        if let Some(q) = quantizing {
            if let Some(blocks) = q.apply(&name, &tensor, dtype, device)? {
                quantized.insert(name, blocks);
                continue;
            }
        }
        let tensor = if tensor.dtype().is_float() {
            tensor.to_dtype(dtype).map_err(bad)?
        } else {
            tensor
        };
        tensors.insert(name, tensor.to_device(device).map_err(bad)?);
    }
    Ok((tensors, quantized))
}

/// Converts a folder's `pytorch_model*.bin` shards (and their index) to safetensors, run in it.
pub const PICKLE_CONVERSION: &str = "python3 -c \"import glob, json, torch; \
from safetensors.torch import save_file; \
st = lambda f: f.replace('pytorch_model', 'model').replace('.bin', '.safetensors'); \
[save_file({k: v.clone().contiguous() for k, v in torch.load(f, map_location='cpu', \
weights_only=True).items()}, st(f), metadata={'format': 'pt'}) \
for f in sorted(glob.glob('pytorch_model*.bin'))]; \
i = glob.glob('pytorch_model.bin.index.json'); \
i and json.dump(dict(json.load(open(i[0])), weight_map={k: st(v) for k, v in \
json.load(open(i[0]))['weight_map'].items()}), open('model.safetensors.index.json', 'w'))\"";

/// A folder with no safetensors but PyTorch `.bin` checkpoints (ChatGLM2-6B ships
/// `pytorch_model-0000N-of-00007.bin`) gets an error that says how to convert them.
fn refuse_pickles(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(()); // the missing-file error that follows names the folder
    };
    let mut bins: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("pytorch_model") && n.ends_with(".bin"))
        .collect();
    if bins.is_empty() {
        return Ok(());
    }
    bins.sort();
    Err(Error::PickleWeights {
        dir: dir.to_path_buf(),
        files: bins.join(", "),
        command: PICKLE_CONVERSION,
    })
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

#[cfg(test)]
mod pickle_tests {
    use super::*;

    #[test]
    fn pytorch_bin_shards_are_refused_with_the_conversion_command() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "pytorch_model-00002-of-00002.bin",
            "pytorch_model-00001-of-00002.bin",
        ] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let err = Weights::load_folder(dir.path(), DType::F32, &Device::Cpu, None)
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(matches!(err, Error::PickleWeights { .. }), "{msg}");
        assert!(
            msg.contains("pytorch_model-00001-of-00002.bin, pytorch_model-00002-of-00002.bin"),
            "{msg}"
        );
        assert!(msg.contains("safetensors.torch import save_file"), "{msg}");
        assert!(msg.contains("safe_serialization=True"), "{msg}");

        // Without them, the plain missing-file error as before.
        let empty = tempfile::tempdir().unwrap();
        let err = Weights::load_folder(empty.path(), DType::F32, &Device::Cpu, None)
            .err()
            .unwrap();
        assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    }
}
