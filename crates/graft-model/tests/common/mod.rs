//! What several of graft-model's test files need: the shared models, a decoder's logits, and
//! how far apart two tensors are.
#![allow(dead_code)] // each test file uses part of this
use candle_core::{Device, Tensor};
use graft_model::decoder::{Decoder, DecoderInputs};
use graft_model::NoHooks;
use std::path::{Path, PathBuf};

/// A model folder of `../shared/models`.
pub fn shared_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models")
        .join(name)
}

/// The largest absolute difference of two tensors of any float dtype (compared in f64).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| {
            let d = d.to_dtype(candle_core::DType::F64)?;
            d.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
        })
        .unwrap() as f32
}

/// Logits `[1, t, vocab]` of every position of `ids`, without an adapter.
pub fn all_logits(model: &Decoder, ids: &[u32]) -> Tensor {
    let inputs = DecoderInputs {
        input_ids: Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        attention_mask: None,
    };
    let hidden = model.forward(&inputs, &NoHooks, None).unwrap();
    model.lm_head(&hidden, &NoHooks).unwrap()
}

/// A `pytorch_model.bin` in `dir` as torch.save lays it out: `archive/data.pkl` (`pickle`),
/// `archive/byteorder` and the storage `archive/data/0` holding 1, 2, 3, 4 as f32, each entry
/// stored unless `deflated` names it. Returns its path.
pub fn write_torch_checkpoint(dir: &Path, pickle: &[u8], deflated: &[&str]) -> PathBuf {
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("pytorch_model.bin");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let data: Vec<u8> = [1f32, 2., 3., 4.]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    for (name, bytes) in [
        ("archive/data.pkl", pickle),
        ("archive/byteorder", b"little".as_slice()),
        ("archive/data/0", &data),
    ] {
        let method = if deflated.contains(&name) {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let options = zip::write::SimpleFileOptions::default().compression_method(method);
        zip.start_file(name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
    path
}
