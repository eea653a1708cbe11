//! The ABI stamp of graft-peft itself, so that this fixture claims exactly graft's ABI string.
#[path = "../../../crates/graft-peft/src/abi_stamp.rs"]
mod abi_stamp;

fn main() {
    let graft_peft =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../crates/graft-peft");
    abi_stamp::emit(&graft_peft);
}
