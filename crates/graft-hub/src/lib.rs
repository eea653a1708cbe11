//! Models named by their Hugging Face hub id (`owner/name`, optionally `@revision`): fetched
//! with the hf-hub crate into the standard Hugging Face cache, only the files a model needs,
//! every LFS file checked against the sha256 the hub names it by.
//!
//! The environment is read as `huggingface_hub` reads it: `HF_ENDPOINT`, `HF_HOME` (and
//! `HF_HUB_CACHE`, `XDG_CACHE_HOME`), `HF_TOKEN` (else the token file `hf auth login` writes),
//! `HF_HUB_OFFLINE`. hf-hub itself reads only `HF_HOME`, `HF_ENDPOINT` and the token file, so
//! [`Hub::from_env`] reads them all and hands them over explicitly.
//!
//! A crate of its own, apart from graft-model: its HTTP and TLS stack (ureq, rustls, ring)
//! stays out of libgraft_peft, which every plugin links.
use graft_model::zoo::{find_known, hf_cache_dir, hf_home, KNOWN};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Errors of graft-hub: reaching the hub, and what it answered.
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
    #[error("{repo}: {file} fails its sha256 check (the hub names {expected}, the download hashes to {actual}); the file was removed")]
    HashMismatch {
        repo: String,
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{repo}: {reason}")]
    Hub { repo: String, reason: String },
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

/// How often hf-hub retries a file whose download broke off; each retry asks a `Range` from
/// the bytes already written.
const RETRIES: usize = 3;

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

/// A model repository on the hub at a revision (a branch, tag or commit; `main` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

impl HubId {
    /// `owner/name` or `owner/name@revision`, with the hub's rules for names (letters, digits,
    /// `-`, `_`, `.`; not starting or ending with `-` or `.`, no `--` or `..`); `None` for
    /// anything else, so that `./runs/x`, `/data/m` or `a/b/c` are never taken for one.
    pub fn parse(text: &str) -> Option<HubId> {
        let (repo, revision) = match text.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (text, "main"),
        };
        let (owner, name) = repo.split_once('/')?;
        let valid_revision = !revision.is_empty()
            && !revision.starts_with('/')
            && !revision.split('/').any(|part| part == ".." || part == ".")
            && !revision.chars().any(|c| c.is_whitespace() || c == '\\');
        (valid_name(owner) && valid_name(name) && valid_revision).then(|| HubId {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 96
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && !name.contains("--")
        && !name.contains("..")
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

/// Where and how to reach the hub.
#[derive(Debug, Clone)]
pub struct Hub {
    /// [`ENDPOINT`], or `HF_ENDPOINT`.
    pub endpoint: String,
    /// The hub cache (`models--owner--name/{blobs,refs,snapshots}`).
    pub cache: PathBuf,
    pub token: Option<String>,
    /// Never touch the network: a model must be in the cache.
    pub offline: bool,
}

impl Hub {
    pub fn from_env() -> Hub {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let token = var("HF_TOKEN").or_else(|| {
            let file = var("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home().join("token"));
            let text = std::fs::read_to_string(file).ok()?;
            Some(text.trim().to_string()).filter(|t| !t.is_empty())
        });
        Hub {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| ENDPOINT.into())
                .trim_end_matches('/')
                .to_string(),
            cache: hf_cache_dir(),
            token,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")
            }),
        }
    }

    /// The repository's folder in the cache.
    fn repo_dir(&self, id: &HubId) -> PathBuf {
        self.cache
            .join(Repo::new(id.repo.clone(), RepoType::Model).folder_name())
    }

    /// The snapshot of `id` in the cache if it holds what `files` asks for; reads only local
    /// files. A fetch writes the weights last, so a snapshot with complete weights is complete.
    pub fn cached(&self, id: &HubId, files: Files) -> Option<PathBuf> {
        let dir = self.repo_dir(id);
        let commit = match std::fs::read_to_string(dir.join("refs").join(&id.revision)) {
            Ok(commit) => commit.trim().to_string(),
            // A commit hash names its snapshot directly.
            Err(_) => id.revision.clone(),
        };
        let snapshot = dir.join("snapshots").join(commit);
        let complete = snapshot.join(CONFIG).is_file()
            && match files {
                Files::Config => true,
                Files::Model => WEIGHTS.iter().any(|w| match *w {
                    Weights::Single(file) => snapshot.join(file).is_file(),
                    Weights::Index(file) => shards(&snapshot.join(file))
                        .is_ok_and(|s| s.iter().all(|s| snapshot.join(s).is_file())),
                }),
            };
        complete.then_some(snapshot)
    }

    /// The snapshot folder of `id` holding `files`, from the cache when it has them (no
    /// request at all), else fetched. `log` receives what is fetched from where.
    pub fn fetch(&self, id: &HubId, files: Files, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
        if let Some(snapshot) = self.cached(id, files) {
            return Ok(snapshot);
        }
        if self.offline {
            return Err(self.error(
                id,
                format!(
                    "not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
                    self.cache.display()
                ),
            ));
        }
        let api = ApiBuilder::from_cache(Cache::new(self.cache.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(false)
            .with_retries(RETRIES)
            .build()
            .map_err(|e| self.api_error(id, e))?;
        let repo = api.repo(Repo::with_revision(
            id.repo.clone(),
            RepoType::Model,
            id.revision.clone(),
        ));
        let info = repo.info().map_err(|e| self.api_error(id, e))?;
        let listed: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        if !listed.contains(CONFIG) {
            return Err(self.error(id, "holds no config.json: not a transformers model".into()));
        }
        let mut wanted = vec![CONFIG];
        let weights = match files {
            Files::Config => None,
            Files::Model => {
                wanted.extend(TOKENIZER_FILES.iter().filter(|f| listed.contains(*f)));
                let found = WEIGHTS.iter().find(|w| listed.contains(w.file()));
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
        let snapshot = self.repo_dir(id).join("snapshots").join(&info.sha);
        log(&format!(
            "fetching {id} from {} into {}",
            self.endpoint,
            snapshot.display()
        ));
        let fetch = |file: &str| self.fetch_file(&repo, id, &snapshot, file);
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
                if let Some(missing) = shards.iter().find(|s| !listed.contains(s.as_str())) {
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

    /// One file into `snapshot`, unless an interrupted fetch left it there already; an LFS file
    /// (its blob named by a sha256) is hashed and removed if the hash differs.
    fn fetch_file(
        &self,
        repo: &ApiRepo,
        id: &HubId,
        snapshot: &Path,
        file: &str,
    ) -> Result<PathBuf> {
        let path = snapshot.join(file);
        if path.is_file() {
            return Ok(path);
        }
        let fetched = repo
            .download_with_progress(file, Bar::new())
            .map_err(|e| self.api_error(id, e))?;
        if fetched != path {
            // hf-hub files it under the commit each response names.
            let _ = std::fs::remove_file(&fetched);
            return Err(self.error(
                id,
                format!("changed while it was fetched ({file} came from another commit than {}); run again", snapshot.display()),
            ));
        }
        let blob = std::fs::canonicalize(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let expected = blob
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if is_sha256(&expected) {
            let actual = sha256(&blob)?;
            if actual != expected {
                let _ = std::fs::remove_file(&blob);
                let _ = std::fs::remove_file(&path);
                return Err(Error::HashMismatch {
                    repo: id.to_string(),
                    file: file.to_string(),
                    expected,
                    actual,
                });
            }
        }
        Ok(path)
    }

    fn error(&self, id: &HubId, reason: String) -> Error {
        Error::Hub {
            repo: id.to_string(),
            reason,
        }
    }

    /// The hub's answer in words: `x-error-code` says which refusal it is.
    fn api_error(&self, id: &HubId, error: ApiError) -> Error {
        let ApiError::RequestError(error) = error else {
            return self.error(id, error.to_string());
        };
        match *error {
            ureq::Error::Status(status, response) => {
                let code = response.header("x-error-code").unwrap_or_default();
                match (code, status) {
                    ("RepoNotFound", _) | ("", 404) => Error::RepoNotFound {
                        repo: id.repo.clone(),
                        endpoint: self.endpoint.clone(),
                    },
                    ("GatedRepo", _) | ("", 401 | 403) => Error::Gated {
                        repo: id.repo.clone(),
                        endpoint: self.endpoint.clone(),
                        advice: if self.token.is_some() {
                            "the token given (HF_TOKEN or the token file) was refused: use one of an account that has accepted them"
                        } else {
                            "then set HF_TOKEN to a token of that account"
                        },
                    },
                    ("RevisionNotFound", _) => {
                        self.error(id, format!("no revision `{}`", id.revision))
                    }
                    _ => self.error(
                        id,
                        format!("HTTP {status} {code} from {}", response.get_url()),
                    ),
                }
            }
            ureq::Error::Transport(transport) => {
                self.error(id, format!("cannot reach {}: {transport}", self.endpoint))
            }
        }
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

fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

fn sha256(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// A download's progress on stderr (drawn only when stderr is a terminal).
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new() -> Self {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Bar(bar)
    }
}

impl hf_hub::api::Progress for Bar {
    // hf-hub calls this again before each retry, then reports the bytes already on disk.
    fn init(&mut self, size: usize, filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_position(0);
        self.0.set_message(filename.to_string());
    }

    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
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
        return Ok(known.ensure(log)?);
    }
    match HubId::parse(text) {
        Some(id) => Hub::from_env().fetch(&id, files, log),
        None => Err(Error::UnknownModel {
            spec: spec.to_path_buf(),
            known: KNOWN.iter().map(|m| m.alias).collect::<Vec<_>>().join(", "),
        }),
    }
}
