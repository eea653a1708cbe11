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

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .unwrap()
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
