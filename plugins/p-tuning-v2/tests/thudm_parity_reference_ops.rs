//! THUDM parity on the composed reference ops, which a `--features cuda` build runs: this
//! binary sets `GRAFT_REFERENCE_OPS=1` before any op runs (see `thudm/mod.rs`).
mod thudm;

use graft_peft::candle::DType;

fn force_reference_ops() {
    std::env::set_var("GRAFT_REFERENCE_OPS", "1");
    assert!(
        graft_peft::graft_model::ops::reference_forced(),
        "an op ran before GRAFT_REFERENCE_OPS was set"
    );
}

#[test]
fn thudm_chatglm2_logits_at_every_position_reference_ops_f32() {
    force_reference_ops();
    thudm::check(DType::F32, "reference ops");
}

#[test]
fn thudm_chatglm2_logits_at_every_position_reference_ops_bf16() {
    force_reference_ops();
    thudm::check(DType::BF16, "reference ops");
}
