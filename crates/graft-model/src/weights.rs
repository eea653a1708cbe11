//! A checkpoint's tensors by name, whatever format they were read from (`formats`).
use crate::error::{Error, Result};
use crate::quant::{Quantization, QuantizedWeight};
use candle_core::{DType, Device, Tensor};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Which tensors a load keeps quantized (the projection weights by checkpoint name), and how.
pub struct Quantizing {
    pub family: Quantization,
    pub keys: HashSet<String>,
}

impl Quantizing {
    /// `tensor` (named `name`) quantized if it is one of the keys and a block of the family
    /// divides its rows; to be used in `dtype`.
    pub fn apply(
        &self,
        name: &str,
        tensor: &Tensor,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<QuantizedWeight>> {
        if !self.keys.contains(name) || tensor.rank() != 2 {
            return Ok(None);
        }
        QuantizedWeight::quantize(tensor, self.family, dtype, device)
    }
}

/// The tensors a reader has read so far, each converted as it arrives (floating-point ones to
/// `dtype` on `device`, those `quantizing` names quantized), so that no reader holds a file, or
/// the model in its stored dtype, beside the converted tensors.
pub struct Loading<'a> {
    dtype: DType,
    device: &'a Device,
    quantizing: Option<&'a Quantizing>,
    dense: HashMap<String, Tensor>,
    quantized: HashMap<String, QuantizedWeight>,
}

impl<'a> Loading<'a> {
    pub fn new(dtype: DType, device: &'a Device, quantizing: Option<&'a Quantizing>) -> Self {
        Self {
            dtype,
            device,
            quantizing,
            dense: HashMap::new(),
            quantized: HashMap::new(),
        }
    }

    /// Keeps `tensor` (read on the CPU) under `name`, converted; `path` names its file in errors.
    pub fn add(&mut self, path: &Path, name: String, tensor: Tensor) -> Result<()> {
        if let Some(q) = self.quantizing {
            if let Some(blocks) = q.apply(&name, &tensor, self.dtype, self.device)? {
                self.quantized.insert(name, blocks);
                return Ok(());
            }
        }
        let bad = |e: candle_core::Error| Error::Weights {
            path: path.to_path_buf(),
            reason: format!("tensor `{name}`: {e}"),
        };
        let tensor = if tensor.dtype().is_float() {
            tensor.to_dtype(self.dtype).map_err(bad)?
        } else {
            tensor
        };
        let tensor = tensor.to_device(self.device).map_err(bad)?;
        self.dense.insert(name, tensor);
        Ok(())
    }

    /// The weights read, `path` (a file or an index) naming them in errors.
    pub fn finish(self, path: &Path) -> Result<Weights> {
        Weights::from_parts(path, self.dense, self.quantized, self.dtype)
    }
}

/// All tensors of one checkpoint, converted to one dtype (or kept quantized), looked up by
/// name.
pub struct Weights {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    quantized: HashMap<String, QuantizedWeight>,
    /// Tried ahead of each name: checkpoints saved from a task model (`bert.` for
    /// BertForSequenceClassification) prefix the backbone's names.
    prefixes: Vec<String>,
}

impl Weights {
    /// Tensors read elsewhere (a GGUF file), floating-point ones converted to `dtype`, and
    /// quantized ones; `path` names their source in errors.
    pub fn from_parts(
        path: &Path,
        raw: HashMap<String, Tensor>,
        quantized: HashMap<String, QuantizedWeight>,
        dtype: DType,
    ) -> Result<Self> {
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
            quantized,
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

    /// The weight `name` if it is kept quantized, which must be `shape` (`[out, in]`).
    pub fn quantized(&self, name: &str, shape: &[usize]) -> Result<Option<&QuantizedWeight>> {
        let Some(blocks) = self
            .prefixes
            .iter()
            .find_map(|p| self.quantized.get(&format!("{p}{name}")))
        else {
            return Ok(None);
        };
        let (out, width) = blocks.dims();
        if shape != [out, width] {
            return Err(Error::TensorShape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: vec![out, width],
            });
        }
        Ok(Some(blocks))
    }

    /// The tensor `name` if the checkpoint has it (any shape).
    pub fn find(&self, name: &str) -> Option<&Tensor> {
        self.prefixes
            .iter()
            .find_map(|p| self.tensors.get(&format!("{p}{name}")))
    }
}
