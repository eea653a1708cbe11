//! A deliberately broken plugin for graft's loader tests: it compiles graft-peft's own `abi.rs`
//! and exports its symbols exactly as a real plugin does (so it claims graft's exact ABI string),
//! but links its own static copy of candle. Only the tensor-id probe can tell, and must.
#[path = "../../../../crates/graft-peft/src/abi.rs"]
pub mod abi;

export_plugin_abi!();
