//! What a plugin must share with the host, and the check that it does.
use std::ffi::CStr;

/// The ABI string as a literal, for `concat!`; expanded here so that `env!` reads this crate's
/// build environment.
macro_rules! abi_literal {
    () => {
        concat!(
            "graft-peft ",
            env!("CARGO_PKG_VERSION"),
            "; ",
            env!("GRAFT_RUSTC_VERSION"),
            "; features ",
            env!("GRAFT_FEATURES")
        )
    };
}

/// graft-peft version, compiler and candle features; host and plugin must agree exactly.
pub const ABI: &str = abi_literal!();

/// [`ABI`], NUL-terminated for the C-ABI symbol `graft_plugin_abi`.
pub const ABI_CSTR: &CStr =
    match CStr::from_bytes_with_nul(concat!(abi_literal!(), "\0").as_bytes()) {
        Ok(s) => s,
        Err(_) => panic!("ABI string holds a NUL byte"),
    };

pub const SYMBOL_ABI: &str = "graft_plugin_abi";
pub const SYMBOL_PROBE: &str = "graft_plugin_probe";
pub const SYMBOL_CREATE: &str = "graft_plugin_create";

/// candle's tensor id as a number. TensorId has no public accessor, only Debug (`TensorId(7)`).
pub fn tensor_id_number(id: candle_core::TensorId) -> u64 {
    let text = format!("{id:?}");
    text.trim_start_matches("TensorId(")
        .trim_end_matches(')')
        .parse()
        .unwrap_or(0)
}

/// A fresh tensor's id, as minted by the candle this code is linked against.
pub fn fresh_tensor_id() -> u64 {
    match candle_core::Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu) {
        Ok(t) => tensor_id_number(t.id()),
        Err(_) => 0,
    }
}

/// Which `;`-separated parts of two ABI strings differ, for the refusal message.
pub fn abi_differences(expected: &str, found: &str) -> String {
    let names = ["graft-peft version", "compiler", "features"];
    let parts: Vec<&str> = expected.split("; ").collect();
    let other: Vec<&str> = found.split("; ").collect();
    let differs: Vec<&str> = names
        .iter()
        .enumerate()
        .filter(|(i, _)| parts.get(*i) != other.get(*i))
        .map(|(_, n)| *n)
        .collect();
    if differs.is_empty() {
        "format".to_string()
    } else {
        differs.join(", ")
    }
}

/// Exports a method from a plugin library: its ABI string, the tensor-id probe and its
/// constructor. Use once per plugin crate, with an expression that builds the method.
#[macro_export]
macro_rules! export_plugin {
    ($method:expr) => {
        #[no_mangle]
        pub extern "C" fn graft_plugin_abi() -> *const ::std::ffi::c_char {
            $crate::abi::ABI_CSTR.as_ptr()
        }

        /// Mints a tensor id with the candle this library is linked against.
        #[no_mangle]
        pub extern "C" fn graft_plugin_probe() -> u64 {
            $crate::abi::fresh_tensor_id()
        }

        #[no_mangle]
        pub extern "Rust" fn graft_plugin_create() -> ::std::boxed::Box<dyn $crate::Method> {
            ::std::boxed::Box::new($method)
        }
    };
}
