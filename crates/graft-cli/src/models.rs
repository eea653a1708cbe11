//! Where a run's plugins, model and default data come from.
use anyhow::{bail, Context, Result};
use clap::Args;
use graft_hub::Files;
use graft_peft::loader::{search_dirs, Registry};
use graft_trainer::TrainConfig;
use std::path::{Path, PathBuf};

#[derive(Args, Clone)]
pub struct PluginArgs {
    /// Directory to search for method plugins (repeatable; searched before $GRAFT_PLUGIN_PATH
    /// and the binary's own directory).
    #[arg(long = "plugin-dir", global = true)]
    pub plugin_dirs: Vec<PathBuf>,
}

pub fn registry(args: &PluginArgs) -> Result<Registry> {
    registry_with(args, &[])
}

/// The plugins of `--plugin-dir`, then of a training config's `[plugins] dirs`, then the
/// environment's and the binary's.
pub fn registry_with(args: &PluginArgs, config_dirs: &[PathBuf]) -> Result<Registry> {
    let dirs: Vec<PathBuf> = args
        .plugin_dirs
        .iter()
        .chain(config_dirs)
        .cloned()
        .collect();
    Ok(Registry::discover(&search_dirs(&dirs)))
}

/// Default training data: the challenge substitute beside the checkout, else the demo set.
pub fn default_data() -> Result<PathBuf> {
    let candidates = [
        PathBuf::from("../shared/data/abstracts/train.csv"),
        PathBuf::from("data/demo.csv"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!("no --data given and none of {candidates:?} exists (relative to the current directory)")
        })
}

/// The model a training config names: `--model`, else `model.dir`, else `model.name`.
pub fn model_dir(config: &TrainConfig, flag: Option<PathBuf>) -> Result<PathBuf> {
    let spec = flag
        .or_else(|| config.model.dir.clone())
        .unwrap_or_else(|| PathBuf::from(&config.model.name));
    resolve_model(&spec, Files::Model)
}

/// Every model argument's way to a local path: an existing path as given, else an alias
/// (`minilm`) or a hub id (`owner/name[@revision]`) fetched into its cache.
pub fn resolve_model(spec: &Path, files: Files) -> Result<PathBuf> {
    Ok(graft_hub::locate(spec, files, &mut |m| eprintln!("{m}"))?)
}

/// A decoder's model argument as the file or folder to open: [`resolve_model`], then
/// [`model_file`].
pub fn resolve_model_file(spec: &Path) -> Result<PathBuf> {
    model_file(&resolve_model(spec, Files::Model)?)
}

/// A model path as given, or, for a folder without config.json (a fetched GGUF model), the
/// one `.gguf` file in it.
fn model_file(path: &Path) -> Result<PathBuf> {
    if path.is_file() || path.join("config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading the model folder {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "{} holds no config.json and not exactly one .gguf file",
            path.display()
        ),
    }
}
