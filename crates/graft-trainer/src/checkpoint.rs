//! Checkpoints: everything a run needs to continue exactly where it stopped, written so that a
//! crash at any moment leaves the previous checkpoint usable.
//!
//! `checkpoints/step-000050/` holds `trainable.safetensors` (every trained tensor by its adapter
//! key), `optimizer.safetensors`, `adapter_state.safetensors` (the method's own state) and
//! `state.json` (the loop's position, RNG, best evaluation so far). Each file is written through a
//! temporary file, fsync and rename; `checkpoints/latest` names the newest complete folder and is
//! replaced the same way only after the folder is complete; older folders are removed after.
use crate::error::io_error;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use graft_model::formats::safetensors::{save_safetensors, write_atomic};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const DIR: &str = "checkpoints";
const LATEST: &str = "latest";
const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const ADAPTER_STATE: &str = "adapter_state.safetensors";
const STATE: &str = "state.json";

/// A checkpoint as read back.
pub struct Checkpoint<S> {
    pub dir: PathBuf,
    pub trainable: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub adapter_state: HashMap<String, Tensor>,
    pub state: S,
}

/// The parts of a checkpoint, as written.
pub struct Parts<'a, S> {
    pub step: usize,
    pub trainable: &'a [(String, Tensor)],
    pub optimizer: &'a [(String, Tensor)],
    pub adapter_state: &'a [(String, Tensor)],
    pub state: &'a S,
}

/// Writes a checkpoint of `parts.step` under `run/checkpoints`, then points `latest` at it.
pub fn write<S: Serialize>(run: &Path, parts: Parts<'_, S>) -> Result<()> {
    let root = run.join(DIR);
    let name = format!("step-{:06}", parts.step);
    let dir = root.join(&name);
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    save_safetensors(&dir.join(TRAINABLE), parts.trainable)?;
    save_safetensors(&dir.join(OPTIMIZER), parts.optimizer)?;
    save_safetensors(&dir.join(ADAPTER_STATE), parts.adapter_state)?;
    let json = serde_json::to_string_pretty(parts.state)
        .map_err(|e| Error::Config(format!("checkpoint state: {e}")))?;
    write_atomic(&dir.join(STATE), json.as_bytes())?;
    write_atomic(&root.join(LATEST), name.as_bytes())?;
    // Only now is an older checkpoint unnecessary.
    for entry in std::fs::read_dir(&root).map_err(io_error(&root))? {
        let path = entry.map_err(io_error(&root))?.path();
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() && file_name.starts_with("step-") && file_name != name {
            std::fs::remove_dir_all(&path).map_err(io_error(&path))?;
        }
    }
    Ok(())
}

fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| Error::Adapter {
        path: path.to_path_buf(),
        reason: format!("unreadable checkpoint file: {e}"),
    })
}

/// The newest complete checkpoint of `run`, or `None` if it has none.
pub fn read_latest<S: DeserializeOwned>(
    run: &Path,
    device: &Device,
) -> Result<Option<Checkpoint<S>>> {
    let root = run.join(DIR);
    let latest = root.join(LATEST);
    if !latest.is_file() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&latest).map_err(io_error(&latest))?;
    let dir = root.join(name.trim());
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(io_error(&state_path))?;
    let state = serde_json::from_str(&text).map_err(|e| Error::Adapter {
        path: state_path.clone(),
        reason: format!("not a graft checkpoint state: {e}"),
    })?;
    Ok(Some(Checkpoint {
        trainable: read_tensors(&dir.join(TRAINABLE), device)?,
        optimizer: read_tensors(&dir.join(OPTIMIZER), device)?,
        adapter_state: read_tensors(&dir.join(ADAPTER_STATE), device)?,
        state,
        dir,
    }))
}
