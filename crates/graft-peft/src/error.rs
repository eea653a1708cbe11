use std::path::PathBuf;

/// Errors of graft-peft: method configs, adapter files and plugins.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] graft_model::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{method}: invalid config: {reason}")]
    Config { method: String, reason: String },
    #[error("{method}: target_modules {pattern} matches no linear site of this model (sites look like `{example}`)")]
    NoTargetMatch {
        method: String,
        pattern: String,
        example: String,
    },
    #[error("adapter tensor `{key}` is missing")]
    MissingTensor { key: String },
    #[error("the base weight `{key}` is kept quantized, and this method needs it unquantized; load the base without `quantize`")]
    QuantizedBase { key: String },
    #[error("adapter tensor `{key}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("adapter holds tensors this method and model do not use: {keys:?}")]
    UnexpectedTensors { keys: Vec<String> },
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// Everything that can be wrong with a plugin library; each names the file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    #[error("{path}: plugin file not found")]
    NotFound { path: PathBuf },
    #[error("{path}: not a loadable library: {reason}")]
    NotALibrary { path: PathBuf, reason: String },
    #[error("{path}: not a graft plugin: symbol `{symbol}` is missing (plugins export it with graft_peft::export_plugin!)")]
    MissingSymbol { path: PathBuf, symbol: String },
    #[error("{path}: built for another ABI and refused; differs in {differs}:\n  plugin: {found}\n  graft:  {expected}\nrebuild this plugin against this graft's source with its toolchain and features (`cargo xtask build` for in-tree plugins, `cargo build` in the plugin's folder for others)")]
    AbiMismatch {
        path: PathBuf,
        expected: String,
        found: String,
        differs: String,
    },
    #[error("{path}: refused: the plugin does not share graft's candle (tensor ids host {host_before}, plugin {plugin}, host {host_after} are not increasing). It links its own copy of candle, which corrupts gradients; build it as a Rust `dylib` that depends on graft-peft, with -C prefer-dynamic")]
    ProbeFailed {
        path: PathBuf,
        host_before: u64,
        plugin: u64,
        host_after: u64,
    },
    #[error("{path}: plugin panicked in `{call}`: {message}")]
    Panicked {
        path: PathBuf,
        call: String,
        message: String,
    },
    #[error("{path}: the plugin's `{hook}` hook returned {found}, expected {expected}")]
    BadHookOutput {
        path: PathBuf,
        hook: String,
        expected: String,
        found: String,
    },
    #[error("two plugins claim the method `{name}`: {first} and {second}")]
    DuplicateName {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("no plugin provides the method `{name}`; available: {available}{refused}")]
    UnknownMethod {
        name: String,
        available: String,
        refused: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
