//! What a plugin must share with the host, and the check that it does. Self-contained (candle
//! and the build environment only) so that the static-candle test fixture compiles this very
//! file and exports the same symbols a real plugin does.
use std::ffi::CStr;
use std::hash::{Hash, Hasher};

/// The ABI string as a literal, for `concat!`; expanded here so that `env!` reads this crate's
/// build environment (`abi_stamp.rs` sets it).
macro_rules! abi_literal {
    () => {
        concat!(
            "graft-peft ",
            env!("CARGO_PKG_VERSION"),
            "; ",
            env!("GRAFT_RUSTC_VERSION"),
            "; features ",
            env!("GRAFT_FEATURES"),
            "; source ",
            env!("GRAFT_SOURCE_HASH"),
            "; candle-core ",
            env!("GRAFT_CANDLE_VERSION")
        )
    };
}

/// graft-peft version, compiler, candle features, the hash of the source a plugin compiles
/// against (graft-peft and graft-model) and candle's version; host and plugin must agree exactly.
pub const ABI: &str = abi_literal!();

/// What each `; `-separated part of [`ABI`] is, in order, for the refusal message.
pub const ABI_PARTS: [&str; 5] = [
    "graft-peft version",
    "compiler",
    "features",
    "graft-peft/graft-model source",
    "candle version",
];

/// [`ABI`], NUL-terminated for the C-ABI symbol `graft_plugin_abi`.
pub const ABI_CSTR: &CStr =
    match CStr::from_bytes_with_nul(concat!(abi_literal!(), "\0").as_bytes()) {
        Ok(s) => s,
        Err(_) => panic!("ABI string holds a NUL byte"),
    };

pub const SYMBOL_ABI: &str = "graft_plugin_abi";
pub const SYMBOL_PROBE: &str = "graft_plugin_probe";
pub const SYMBOL_CREATE: &str = "graft_plugin_create";

/// Keeps the last `usize` a value hashes: candle's `TensorId` is a derived-`Hash` newtype over
/// its counter and has no public accessor.
#[derive(Default)]
struct LastUsize(Option<usize>);

impl Hasher for LastUsize {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, _: &[u8]) {}
    fn write_usize(&mut self, value: usize) {
        self.0 = Some(value);
    }
}

/// candle's tensor id as a number; 0 (which the probe refuses) if candle stops hashing it as one
/// `usize`.
pub fn tensor_id_number(id: candle_core::TensorId) -> u64 {
    let mut hasher = LastUsize::default();
    id.hash(&mut hasher);
    hasher.0.map_or(0, |n| n as u64)
}

/// A fresh tensor's id, as minted by the candle this code is linked against.
pub fn fresh_tensor_id() -> u64 {
    match candle_core::Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu) {
        Ok(t) => tensor_id_number(t.id()),
        Err(_) => 0,
    }
}

/// Which parts of two ABI strings differ, for the refusal message.
pub fn abi_differences(expected: &str, found: &str) -> String {
    let parts: Vec<&str> = expected.split("; ").collect();
    let other: Vec<&str> = found.split("; ").collect();
    let differs: Vec<&str> = ABI_PARTS
        .iter()
        .enumerate()
        .filter(|(i, _)| parts.get(*i) != other.get(*i))
        .map(|(_, n)| *n)
        .collect();
    if differs.is_empty() || other.len() != parts.len() {
        [differs, vec!["format"]].concat().join(", ")
    } else {
        differs.join(", ")
    }
}

/// Exports the two C-ABI symbols the loader checks before anything else: the ABI string and the
/// tensor-id probe. [`export_plugin!`] calls it; nothing else should.
#[macro_export]
macro_rules! export_plugin_abi {
    () => {
        #[no_mangle]
        pub extern "C" fn graft_plugin_abi() -> *const ::std::ffi::c_char {
            $crate::abi::ABI_CSTR.as_ptr()
        }

        /// Mints a tensor id with the candle this library is linked against.
        #[no_mangle]
        pub extern "C" fn graft_plugin_probe() -> u64 {
            $crate::abi::fresh_tensor_id()
        }
    };
}

/// Exports a method from a plugin library: its ABI string, the tensor-id probe and its
/// constructor. Use once per plugin crate, with an expression that builds the method.
#[macro_export]
macro_rules! export_plugin {
    ($method:expr) => {
        $crate::export_plugin_abi!();

        #[no_mangle]
        pub extern "Rust" fn graft_plugin_create() -> ::std::boxed::Box<dyn $crate::Method> {
            ::std::boxed::Box::new($method)
        }
    };
}
