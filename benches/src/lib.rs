//! Criterion benchmarks live in `benches/`; `cargo bench -p graft-benches` runs them. What the
//! timing examples in `examples/` share is here.
use candle_core::{DType, Device, Tensor};
use graft_model::models::bert::{BertForSequenceClassification, Inputs, Pooling};

/// The MiniLM classifier in `dir` (2 labels, BERT's pooler, f32, on the CPU).
pub fn minilm(dir: &str) -> graft_model::Result<BertForSequenceClassification> {
    BertForSequenceClassification::load(
        dir.as_ref(),
        2,
        Pooling::Pooler,
        DType::F32,
        &Device::Cpu,
        0,
    )
}

/// A full batch of `batch` x `seq` fixed, spread token ids, no padding.
pub fn inputs(batch: usize, seq: usize) -> candle_core::Result<Inputs> {
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| (1000 + i * 7919 % 20000) as u32)
        .collect();
    Ok(Inputs {
        input_ids: Tensor::from_vec(ids, (batch, seq), &Device::Cpu)?,
        attention_mask: Tensor::ones((batch, seq), DType::U32, &Device::Cpu)?,
        token_type_ids: None,
    })
}

/// The median of some timings.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
