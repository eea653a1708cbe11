//! A run directory: resolved config, metrics.jsonl (and its TensorBoard event file),
//! checkpoints, eval.json, train.json, curves.svg and the adapter.
use crate::error::io_error;
use crate::tensorboard::EventFile;
use crate::Result;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct RunDir {
    pub root: PathBuf,
    metrics: std::fs::File,
    events: EventFile,
}

impl RunDir {
    pub const CONFIG: &'static str = "config.toml";
    pub const METRICS: &'static str = "metrics.jsonl";
    pub const EVAL: &'static str = "eval.json";
    pub const TRAIN: &'static str = "train.json";
    pub const ADAPTER: &'static str = "adapter";
    pub const CURVES: &'static str = "curves.svg";

    /// Creates the directory; an existing one must not hold `finished` (the adapter a run
    /// writes: nothing is written over a run, which `--resume` continues instead).
    pub fn create(root: &Path, finished: &str) -> Result<Self> {
        if root.join(finished).exists() {
            return Err(crate::Error::Config(format!(
                "{} already holds a run ({finished} exists); choose another --out, or continue it with --resume",
                root.display()
            )));
        }
        std::fs::create_dir_all(root).map_err(io_error(root))?;
        let path = root.join(Self::METRICS);
        let metrics = std::fs::File::create(&path).map_err(io_error(&path))?;
        Ok(Self {
            root: root.to_path_buf(),
            metrics,
            events: EventFile::rewrite(root, [])?,
        })
    }

    /// Reopens a run to continue it after `step`: metrics logged after that step (by the
    /// interrupted process) are dropped, so the file reads as one uninterrupted run, and the
    /// event file is written anew from the lines kept.
    pub fn reopen(root: &Path, step: usize) -> Result<Self> {
        let path = root.join(Self::METRICS);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let kept: Vec<(&str, serde_json::Value)> = text
            .lines()
            .filter_map(|line| Some((line, serde_json::from_str::<serde_json::Value>(line).ok()?)))
            .filter(|(_, v)| v["step"].as_u64().is_some_and(|s| s as usize <= step))
            .collect();
        let lines: String = kept.iter().map(|(line, _)| format!("{line}\n")).collect();
        graft_model::formats::safetensors::write_atomic(&path, lines.as_bytes())?;
        let metrics = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        Ok(Self {
            root: root.to_path_buf(),
            metrics,
            events: EventFile::rewrite(root, kept.iter().map(|(_, v)| v))?,
        })
    }

    pub fn adapter_dir(&self) -> PathBuf {
        self.root.join(Self::ADAPTER)
    }

    /// Appends one JSON line and flushes it, so a crash loses no logged step.
    pub fn log(&mut self, line: &serde_json::Value) -> Result<()> {
        let path = self.root.join(Self::METRICS);
        writeln!(self.metrics, "{line}").map_err(io_error(&path))?;
        self.metrics.flush().map_err(io_error(&path))?;
        self.events.log(line)
    }

    pub fn write(&self, name: &str, text: &str) -> Result<()> {
        Ok(graft_model::formats::safetensors::write_atomic(
            &self.root.join(name),
            text.as_bytes(),
        )?)
    }
}

/// A fresh directory name under `runs/`: `runs/<method>-<unix seconds>`.
pub fn default_run_dir(method: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{method}-{secs}"))
}
