//! THUDM parity on the CPU's fused kernels (see `thudm/mod.rs`).
mod thudm;

use graft_peft::candle::DType;

#[test]
fn thudm_chatglm2_logits_at_every_position_fused_f32() {
    assert!(!graft_peft::graft_model::ops::reference_forced());
    thudm::check(DType::F32, "fused");
}

#[test]
fn thudm_chatglm2_logits_at_every_position_fused_bf16() {
    thudm::check(DType::BF16, "fused");
}
