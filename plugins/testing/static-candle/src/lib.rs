//! A deliberately broken plugin for graft's loader tests: it claims graft's exact ABI string but
//! links its own static copy of candle. Only the tensor-id probe can tell, and must.
use std::ffi::{c_char, CStr};

const ABI: &CStr = match CStr::from_bytes_with_nul(
    concat!(
        "graft-peft ",
        env!("CARGO_PKG_VERSION"),
        "; ",
        env!("GRAFT_RUSTC_VERSION"),
        "; features ",
        env!("GRAFT_FEATURES"),
        "\0"
    )
    .as_bytes(),
) {
    Ok(s) => s,
    Err(_) => panic!("NUL in ABI string"),
};

#[no_mangle]
pub extern "C" fn graft_plugin_abi() -> *const c_char {
    ABI.as_ptr()
}

/// A tensor id from this library's own candle: its counter is not the host's.
#[no_mangle]
pub extern "C" fn graft_plugin_probe() -> u64 {
    match candle_core::Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu) {
        Ok(t) => format!("{:?}", t.id())
            .trim_start_matches("TensorId(")
            .trim_end_matches(')')
            .parse()
            .unwrap_or(0),
        Err(_) => 0,
    }
}
