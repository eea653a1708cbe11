//! Reading a Hugging Face model folder's safetensors weights by module path.
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// All tensors of one checkpoint, converted to one dtype, looked up by name.
pub struct Weights {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    /// Tried ahead of each name: checkpoints saved from a task model (`bert.` for
    /// BertForSequenceClassification) prefix the backbone's names.
    prefixes: Vec<String>,
}

impl Weights {
    /// One safetensors file.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_tensors(path, read_file(path, device)?, dtype)
    }

    /// The weights of a Hugging Face model folder: `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`.
    pub fn load_folder(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if !index.is_file() {
            return Self::load(&dir.join("model.safetensors"), dtype, device);
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
        let mut tensors = HashMap::new();
        for shard in shards {
            tensors.extend(read_file(&dir.join(shard), device)?);
        }
        Self::from_tensors(&index, tensors, dtype)
    }

    /// Tensors read elsewhere (a GGUF file), floating-point ones converted to `dtype`; `path`
    /// names their source in errors.
    pub fn from_tensors(path: &Path, raw: HashMap<String, Tensor>, dtype: DType) -> Result<Self> {
        let mut tensors = HashMap::with_capacity(raw.len());
        for (name, tensor) in raw {
            let tensor = if tensor.dtype().is_float() {
                tensor.to_dtype(dtype)?
            } else {
                tensor
            };
            tensors.insert(name, tensor);
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            prefixes: vec![String::new()],
        })
    }

    /// Also look names up under `prefix` (e.g. `bert.`), tried first.
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefixes.insert(0, prefix.to_string());
        self
    }

    /// The key `name` has in the model as a whole: under the first prefix (`bert.` + `name`),
    /// the names that adapters, full fine-tuning and saved checkpoints use.
    pub fn canonical(&self, name: &str) -> String {
        format!("{}{name}", self.prefixes[0])
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor `name`, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self.find(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
            tried: self
                .prefixes
                .iter()
                .map(|p| format!("`{p}{name}`"))
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        if !tensor.dtype().is_float() {
            return Err(Error::TensorDtype {
                path: self.path.clone(),
                name: name.to_string(),
                found: format!("{:?}", tensor.dtype()),
            });
        }
        if tensor.dims() != shape {
            return Err(Error::TensorShape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: tensor.dims().to_vec(),
            });
        }
        Ok(tensor.clone())
    }

    /// The tensor `name` if the checkpoint has it (any shape).
    pub fn find(&self, name: &str) -> Option<&Tensor> {
        self.prefixes
            .iter()
            .find_map(|p| self.tensors.get(&format!("{p}{name}")))
    }
}

fn read_file(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            what: "model weights",
        });
    }
    candle_core::safetensors::load(path, device).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Writes `tensors` as one safetensors file, through a temporary file and a rename so that a
/// crash never leaves half a checkpoint.
pub fn save_safetensors(tensors: Vec<(String, Tensor)>, path: &Path) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `json` pretty-printed to `path`.
pub fn save_json(json: &serde_json::Value, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(json).map_err(|source| Error::Config {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}
