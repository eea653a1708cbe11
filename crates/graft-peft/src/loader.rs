//! Finding and loading plugin libraries, refusing any that would not share graft's candle.
use crate::abi::{self, ABI, SYMBOL_ABI, SYMBOL_CREATE, SYMBOL_PROBE};
use crate::error::PluginError;
use crate::guard::{panic_message, GuardedMethod};
use crate::Method;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// File names of plugin libraries: `libgraft_plugin_<name>.so` (platform prefix and suffix).
pub const FILE_PREFIX: &str = "graft_plugin_";

/// Environment variable with extra plugin directories (separated like PATH).
pub const ENV_PLUGIN_PATH: &str = "GRAFT_PLUGIN_PATH";

/// A method loaded from a library.
pub struct LoadedPlugin {
    pub path: PathBuf,
    pub abi: String,
    pub method: Box<dyn Method>,
}

impl LoadedPlugin {
    /// A method linked into the binary (tests; builds without dynamic loading).
    pub fn statically_linked(method: Box<dyn Method>) -> Self {
        let path = PathBuf::from(format!("<statically linked {}>", method.name()));
        Self {
            method: Box::new(GuardedMethod::new(method, path.clone())),
            path,
            abi: ABI.to_string(),
        }
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.method.name())
            .field("path", &self.path)
            .finish()
    }
}

/// Loads one plugin library: ABI string check, tensor-id probe, then its constructor.
pub fn load_plugin(path: &Path) -> Result<LoadedPlugin, PluginError> {
    let path_buf = path.to_path_buf();
    if !path.is_file() {
        return Err(PluginError::NotFound { path: path_buf });
    }
    // SAFETY: loading a library runs its initialisers; graft only loads files named like
    // plugins from directories the user named (see docs/architecture.md, security).
    let library =
        unsafe { libloading::Library::new(path) }.map_err(|e| PluginError::NotALibrary {
            path: path_buf.clone(),
            reason: e.to_string(),
        })?;
    let missing = |symbol: &str| PluginError::MissingSymbol {
        path: path_buf.clone(),
        symbol: symbol.to_string(),
    };

    // SAFETY: the symbol's type is part of the plugin contract (export_plugin!).
    let abi_fn = unsafe { library.get::<extern "C" fn() -> *const c_char>(SYMBOL_ABI.as_bytes()) }
        .map_err(|_| missing(SYMBOL_ABI))?;
    let found = {
        let ptr = abi_fn();
        if ptr.is_null() {
            String::new()
        } else {
            // SAFETY: export_plugin! returns a pointer to a static NUL-terminated string.
            unsafe { CStr::from_ptr(ptr) }
                .to_string_lossy()
                .into_owned()
        }
    };
    if found != ABI {
        return Err(PluginError::AbiMismatch {
            path: path_buf,
            differs: abi::abi_differences(ABI, &found),
            expected: ABI.to_string(),
            found,
        });
    }

    // Equal ABI strings do not prove a shared candle: a plugin with its own static copy mints
    // tensor ids from its own counter. Ids minted host, plugin, host must strictly increase.
    let probe = unsafe { library.get::<extern "C" fn() -> u64>(SYMBOL_PROBE.as_bytes()) }
        .map_err(|_| missing(SYMBOL_PROBE))?;
    let host_before = abi::fresh_tensor_id();
    let plugin = probe();
    let host_after = abi::fresh_tensor_id();
    if !(host_before < plugin && plugin < host_after) {
        return Err(PluginError::ProbeFailed {
            path: path_buf,
            host_before,
            plugin,
            host_after,
        });
    }

    // SAFETY: ABI and probe agree, so the plugin was built by this compiler against this
    // graft-peft, and a Rust-ABI Box<dyn Method> crosses the boundary intact.
    let create = unsafe { library.get::<fn() -> Box<dyn Method>>(SYMBOL_CREATE.as_bytes()) }
        .map_err(|_| missing(SYMBOL_CREATE))?;
    let method = catch_unwind(AssertUnwindSafe(*create)).map_err(|p| PluginError::Panicked {
        path: path_buf.clone(),
        call: SYMBOL_CREATE.to_string(),
        message: panic_message(p),
    })?;
    // Plugins are never unloaded: adapters and tensors made by a plugin point into its code.
    std::mem::forget(library);
    // Every call into the plugin from here on is behind the guard.
    Ok(LoadedPlugin {
        method: Box::new(GuardedMethod::new(method, path_buf.clone())),
        path: path_buf,
        abi: found,
    })
}

/// Is `path` named like a plugin library on this platform?
pub fn is_plugin_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.strip_prefix(std::env::consts::DLL_PREFIX)
        .and_then(|n| n.strip_suffix(std::env::consts::DLL_SUFFIX))
        .is_some_and(|n| n.starts_with(FILE_PREFIX))
}

/// Directories searched for plugins, in order: those given (flag, config), then
/// `$GRAFT_PLUGIN_PATH`, then the running binary's directory and its `plugins/` subdirectory.
pub fn search_dirs(explicit: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = explicit.to_vec();
    if let Some(paths) = std::env::var_os(ENV_PLUGIN_PATH) {
        dirs.extend(std::env::split_paths(&paths));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.join("plugins"));
        dirs.push(exe_dir);
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.canonicalize().unwrap_or_else(|_| d.clone())));
    dirs
}

/// The methods found in a set of directories, and the libraries that were refused.
#[derive(Default)]
pub struct Registry {
    pub plugins: Vec<LoadedPlugin>,
    /// Libraries that failed to load; they only matter if their method is asked for.
    pub refused: Vec<PluginError>,
    /// Plugins hidden by one of the same name in an earlier directory (PATH semantics).
    pub shadowed: Vec<PathBuf>,
}

impl Registry {
    /// Loads every plugin file in `dirs` (missing directories are skipped); earlier
    /// directories take precedence. Two plugins of one name in the same directory are a
    /// conflict: asking for that method is then an error.
    pub fn discover(dirs: &[PathBuf]) -> Self {
        let mut registry = Self::default();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_plugin_file(p))
                .collect();
            files.sort();
            for file in files {
                match load_plugin(&file) {
                    Ok(plugin) => match registry.add(plugin) {
                        Ok(()) => {}
                        Err(PluginError::DuplicateName { first, second, .. })
                            if first.parent() != second.parent() =>
                        {
                            registry.shadowed.push(second)
                        }
                        Err(e) => registry.refused.push(e),
                    },
                    Err(e) => registry.refused.push(e),
                }
            }
        }
        registry
    }

    /// Adds a plugin; another with the same method name is an error.
    pub fn add(&mut self, plugin: LoadedPlugin) -> Result<(), PluginError> {
        if let Some(existing) = self
            .plugins
            .iter()
            .find(|p| p.method.name() == plugin.method.name())
        {
            let same_file = existing.path.canonicalize().ok() == plugin.path.canonicalize().ok();
            if same_file {
                return Ok(());
            }
            return Err(PluginError::DuplicateName {
                name: plugin.method.name().to_string(),
                first: existing.path.clone(),
                second: plugin.path,
            });
        }
        self.plugins.push(plugin);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<&LoadedPlugin, PluginError> {
        if let Some(conflict) = self
            .refused
            .iter()
            .find(|e| matches!(e, PluginError::DuplicateName { name: n, .. } if n == name))
        {
            return Err(conflict.clone());
        }
        self.plugins
            .iter()
            .find(|p| p.method.name() == name)
            .ok_or_else(|| PluginError::UnknownMethod {
                name: name.to_string(),
                available: self.names().join(", "),
                refused: self
                    .refused
                    .iter()
                    .map(|e| format!("\nrefused: {e}"))
                    .collect(),
            })
    }

    /// The plugin whose method writes adapters of this `peft_type`.
    pub fn by_peft_type(&self, peft_type: &str) -> Result<&LoadedPlugin, PluginError> {
        let plugin = self
            .plugins
            .iter()
            .find(|p| p.method.peft_type() == peft_type)
            .ok_or_else(|| PluginError::UnknownMethod {
                name: format!("(peft_type {peft_type})"),
                available: self.names().join(", "),
                refused: String::new(),
            })?;
        self.get(plugin.method.name())
    }

    pub fn names(&self) -> Vec<&str> {
        self.plugins.iter().map(|p| p.method.name()).collect()
    }
}
