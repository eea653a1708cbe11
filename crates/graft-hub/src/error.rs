//! graft-hub's one error type.
use crate::id::HubId;
use std::path::PathBuf;

/// Errors of graft-hub: reaching the hub, what it answered, what the cache holds.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{repo}: no such model repository on {endpoint} (a private one needs HF_TOKEN set to a token that can read it)")]
    RepoNotFound { repo: String, endpoint: String },
    #[error("{repo} is a gated model: accept its terms at {endpoint}/{repo}, {advice}")]
    Gated {
        repo: String,
        endpoint: String,
        advice: &'static str,
    },
    #[error("{}: {} fails its {} check (the hub names {}, the download hashes to {}); the file was removed", .0.repo, .0.file, .0.algorithm, .0.expected, .0.actual)]
    HashMismatch(Box<Mismatch>),
    #[error("{}: the cached {} fails its {} check (its blob is named {}, its bytes hash to {}); it was removed: run again without HF_HUB_OFFLINE to fetch it", .0.repo, .0.file, .0.algorithm, .0.expected, .0.actual)]
    CacheCorrupt(Box<Mismatch>),
    #[error("{repo}: {reason}")]
    Hub { repo: String, reason: String },
    #[error("`{alias}` is neither in graft's cache ({graft}) nor in the Hugging Face cache, and HF_HUB_OFFLINE is set: fetch it once without HF_HUB_OFFLINE", graft = graft.display())]
    OfflineAlias { alias: String, graft: PathBuf },
    #[error("{name}={value}: {reason}")]
    Setting {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("`{spec}` is no file or folder, no model graft knows ({known}), and no hub id (owner/name, optionally @revision)", spec = spec.display())]
    UnknownModel { spec: PathBuf, known: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a shard index: {reason}")]
    Index { path: PathBuf, reason: String },
    /// Fetching a model graft knows by alias.
    #[error(transparent)]
    Model(#[from] graft_model::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A file whose bytes are not the ones its hash names (boxed in [`Error`]: five strings).
#[derive(Debug)]
pub struct Mismatch {
    pub repo: String,
    pub file: String,
    pub algorithm: &'static str,
    pub expected: String,
    pub actual: String,
}

/// A failure of `id` in words.
pub(crate) fn hub_error(id: &HubId, reason: String) -> Error {
    Error::Hub {
        repo: id.to_string(),
        reason,
    }
}
