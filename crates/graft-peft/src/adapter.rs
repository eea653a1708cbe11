//! Hugging Face PEFT's on-disk adapter layout: `adapter_config.json` and
//! `adapter_model.safetensors`, written atomically.
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use graft_model::formats::safetensors::{save_safetensors, write_atomic};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Where PEFT saves a sequence classifier's head `head` (`classifier`, decoders' `score`):
/// prompt-learning methods wrap the model one level less deep.
pub fn head_prefix(prompt_learning: bool, head: &str) -> String {
    if prompt_learning {
        format!("base_model.{head}.")
    } else {
        format!("base_model.model.{head}.")
    }
}

/// The heads' module names (PEFT's SEQ_CLS `modules_to_save`).
pub const HEAD_NAMES: [&str; 2] = ["classifier", "score"];

/// Whether `key` belongs to a classification head rather than to the method.
fn is_head_key(key: &str) -> bool {
    HEAD_NAMES.iter().any(|h| {
        [true, false]
            .iter()
            .any(|&p| key.starts_with(&head_prefix(p, h)))
    })
}

/// Saves an adapter folder, each file atomically.
pub fn save(dir: &Path, config: &serde_json::Value, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    save_safetensors(&dir.join(WEIGHTS_FILE), tensors)?;
    let text = serde_json::to_string_pretty(config).map_err(|source| Error::Json {
        path: dir.join(CONFIG_FILE),
        source,
    })?;
    Ok(write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?)
}

/// The adapter_config.json of the adapter folder `dir`, as JSON.
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
        path: config_path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: config_path,
        source,
    })
}

/// A saved adapter folder, read.
pub struct SavedAdapter {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
}

impl SavedAdapter {
    pub fn read(dir: &Path, device: &Device) -> Result<Self> {
        let config = read_config(dir)?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.is_file() {
            return Err(Error::Io {
                path: weights,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "adapter weights missing",
                ),
            });
        }
        let tensors = candle_core::safetensors::load(&weights, device).map_err(|e| Error::Io {
            path: weights.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tensors,
        })
    }

    /// `peft_type` of adapter_config.json.
    pub fn peft_type(&self) -> Result<&str> {
        self.config["peft_type"]
            .as_str()
            .ok_or_else(|| Error::Config {
                method: "adapter".into(),
                reason: format!(
                    "{}: `peft_type` is missing",
                    self.dir.join(CONFIG_FILE).display()
                ),
            })
    }

    /// The saved head `head` (`classifier`, `score`) by module-relative name (`weight`,
    /// `bias`), under either PEFT prefix; empty when it is not there.
    pub fn head(&self, head: &str) -> HashMap<String, Tensor> {
        for prompt_learning in [false, true] {
            let prefix = head_prefix(prompt_learning, head);
            let found: HashMap<String, Tensor> = self
                .tensors
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v.clone())))
                .collect();
            if !found.is_empty() {
                return found;
            }
        }
        HashMap::new()
    }

    /// Tensors that belong to the method (every key but the head's).
    pub fn method_tensors(&self) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter(|(k, _)| !is_head_key(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Takes `key` from `tensors`, checking its shape.
pub fn take_tensor(
    tensors: &HashMap<String, Tensor>,
    key: &str,
    shape: &[usize],
) -> Result<Tensor> {
    let t = tensors.get(key).ok_or_else(|| Error::MissingTensor {
        key: key.to_string(),
    })?;
    if t.dims() != shape {
        return Err(Error::TensorShape {
            key: key.to_string(),
            expected: shape.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    Ok(t.clone())
}
