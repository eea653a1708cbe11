//! Stamps the ABI string's parts (compiler, candle features, source hash, candle version) into
//! this crate's build environment; `src/abi_stamp.rs` computes them.
#[path = "src/abi_stamp.rs"]
mod abi_stamp;

fn main() {
    abi_stamp::emit(std::path::Path::new(env!("CARGO_MANIFEST_DIR")));
}
