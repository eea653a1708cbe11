//! A GGUF file written one tensor at a time: every tensor's name, shape and type is known
//! before any is converted, so the header (metadata, tensor infos with their offsets) goes
//! first and each tensor's data follows as it is made, then is dropped. Peak memory is about
//! the largest tensor rather than the model (candle's `gguf_file::write` takes them all at once).
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use std::io::Write;
use std::path::{Path, PathBuf};

/// llama.cpp's default `general.alignment`: tensor data starts at multiples of it.
const ALIGNMENT: u64 = 32;

/// One tensor of the file, before its data exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorInfo {
    pub name: String,
    /// Row-major, as candle has them (GGUF stores them innermost first).
    pub dims: Vec<usize>,
    pub format: GgmlDType,
}

impl TensorInfo {
    /// Bytes of the data: whole blocks of the format along rows.
    fn bytes(&self, path: &Path) -> Result<u64> {
        let width = self.dims.last().copied().unwrap_or(1);
        if !width.is_multiple_of(self.format.block_size()) {
            return Err(Error::Export {
                path: path.to_path_buf(),
                reason: format!(
                    "tensor `{}`: rows of {width} are no whole blocks of {:?}",
                    self.name, self.format
                ),
            });
        }
        let elements: usize = self.dims.iter().product();
        Ok((elements / self.format.block_size() * self.format.type_size()) as u64)
    }
}

/// ggml's `ggml_type` number of a format.
fn ggml_type(format: GgmlDType) -> u32 {
    match format {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// GGUF's `gguf_type` number of a metadata value.
fn value_type(value: &Value) -> u32 {
    match value {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A value without its type tag; an array's elements must share one type.
fn put_value(out: &mut Vec<u8>, key: &str, value: &Value) -> std::result::Result<(), String> {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend(v.to_le_bytes()),
        Value::U16(v) => out.extend(v.to_le_bytes()),
        Value::I16(v) => out.extend(v.to_le_bytes()),
        Value::U32(v) => out.extend(v.to_le_bytes()),
        Value::I32(v) => out.extend(v.to_le_bytes()),
        Value::U64(v) => out.extend(v.to_le_bytes()),
        Value::I64(v) => out.extend(v.to_le_bytes()),
        Value::F32(v) => out.extend(v.to_le_bytes()),
        Value::F64(v) => out.extend(v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(v) => put_string(out, v),
        Value::Array(items) => {
            let ty = items.first().map_or(value_type(&Value::U32(0)), value_type);
            if items.iter().any(|v| value_type(v) != ty) {
                return Err(format!("metadata `{key}` mixes value types in one array"));
            }
            out.extend(ty.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, key, item)?;
            }
        }
    }
    Ok(())
}

/// The header: magic, version 3, counts, metadata, tensor infos with offsets, padding up to
/// the data.
fn header(path: &Path, metadata: &[(String, Value)], tensors: &[TensorInfo]) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::Export {
        path: path.to_path_buf(),
        reason,
    };
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        out.extend(value_type(value).to_le_bytes());
        put_value(&mut out, key, value).map_err(bad)?;
    }
    let mut offset = 0u64;
    for info in tensors {
        put_string(&mut out, &info.name);
        out.extend((info.dims.len() as u32).to_le_bytes());
        for &dim in info.dims.iter().rev() {
            out.extend((dim as u64).to_le_bytes());
        }
        out.extend(ggml_type(info.format).to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += info.bytes(path)?.next_multiple_of(ALIGNMENT);
    }
    out.resize((out.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);
    Ok(out)
}

/// Writes `path` (through a sibling `.partial` file, renamed when complete): `metadata`, then
/// `tensors`, the data of tensor `i` made by `data(i)` only when its turn comes, in order.
/// Returns the file's size.
pub(crate) fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorInfo],
    mut data: impl FnMut(usize) -> Result<QTensor>,
) -> Result<u64> {
    let partial = PathBuf::from(format!("{}.partial", path.display()));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    let result = (|| -> Result<u64> {
        let head = header(path, metadata, tensors)?;
        let mut file =
            std::io::BufWriter::new(std::fs::File::create(&partial).map_err(io(&partial))?);
        file.write_all(&head).map_err(io(&partial))?;
        let mut written = head.len() as u64;
        for (i, info) in tensors.iter().enumerate() {
            let tensor = data(i)?;
            if tensor.dtype() != info.format || tensor.shape().dims() != info.dims.as_slice() {
                return Err(Error::Export {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tensor `{}` came as {:?} {:?}, announced as {:?} {:?}",
                        info.name,
                        tensor.dtype(),
                        tensor.shape().dims(),
                        info.format,
                        info.dims
                    ),
                });
            }
            let bytes = tensor.data()?;
            file.write_all(&bytes).map_err(io(&partial))?;
            let padded = (bytes.len() as u64).next_multiple_of(ALIGNMENT);
            let padding = vec![0u8; (padded - bytes.len() as u64) as usize];
            file.write_all(&padding).map_err(io(&partial))?;
            written += padded;
        }
        file.flush().map_err(io(&partial))?;
        Ok(written)
    })();
    match result {
        Ok(bytes) => {
            std::fs::rename(&partial, path).map_err(io(path))?;
            Ok(bytes)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// candle's reader reads a streamed file back: metadata, a quantized and an f32 tensor.
    #[test]
    fn streamed_file_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let a = Tensor::arange(0f32, 64.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 32))
            .unwrap();
        let b = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let tensors = [
            QTensor::quantize(&a, GgmlDType::Q8_0).unwrap(),
            QTensor::quantize(&b, GgmlDType::F32).unwrap(),
        ];
        let infos = [
            TensorInfo {
                name: "a".into(),
                dims: vec![2, 32],
                format: GgmlDType::Q8_0,
            },
            TensorInfo {
                name: "b".into(),
                dims: vec![3],
                format: GgmlDType::F32,
            },
        ];
        let metadata = vec![
            ("k.s".to_string(), Value::String("x".into())),
            (
                "k.a".to_string(),
                Value::Array(vec![Value::I32(1), Value::I32(2)]),
            ),
        ];
        let bytes = write(&path, &metadata, &infos, |i| {
            Ok(QTensor::quantize(
                &tensors[i].dequantize(&Device::Cpu)?,
                tensors[i].dtype(),
            )?)
        })
        .unwrap();
        assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
        let mut file = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        assert_eq!(content.metadata["k.s"].to_string().unwrap(), "x");
        let back = content.tensor(&mut file, "a", &Device::Cpu).unwrap();
        assert_eq!(back.dtype(), GgmlDType::Q8_0);
        let back = back.dequantize(&Device::Cpu).unwrap();
        let diff: f32 = (back - &a)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 0.5, "{diff}");
        let b_back = content.tensor(&mut file, "b", &Device::Cpu).unwrap();
        assert_eq!(
            b_back
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![1.0, 2.0, 3.0]
        );
        // A tensor that comes other than announced is refused, and no file is left.
        let other = dir.path().join("u.gguf");
        let err = write(&other, &metadata, &infos[1..], |_| {
            Ok(QTensor::quantize(&a, GgmlDType::F32)?)
        })
        .unwrap_err();
        assert!(err.to_string().contains("announced"), "{err}");
        assert!(!other.exists() && !dir.path().join("u.gguf.partial").exists());
    }
}
