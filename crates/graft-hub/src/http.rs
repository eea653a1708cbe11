//! The requests graft makes of the hub: one listing per run (the commit a revision names,
//! every file's hash and size), and files fetched by commit, resumed with `Range` after a
//! broken or stalled transfer.
use crate::error::{hub_error, Error, Result};
use crate::id::{HubId, Token};
use crate::verify::Hash;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// How often a request that failed on the way (no connection, a stall, a cut, a 5xx) is made
/// again; a download resumes from the bytes already written.
const RETRIES: u32 = 3;

/// The most a listing may weigh (a repository of many thousand files is a few MB).
const LISTING_LIMIT: u64 = 64 << 20;

/// A file as the hub lists it.
#[derive(Debug, Clone)]
pub(crate) struct Remote {
    /// `None` where the hub named none (a mirror that omits `blobId`).
    pub hash: Option<Hash>,
    pub size: Option<u64>,
}

/// A revision resolved: its commit and its files.
#[derive(Debug)]
pub(crate) struct Listing {
    pub commit: String,
    pub files: BTreeMap<String, Remote>,
}

/// The hub client: ureq with timeouts, and the token for the endpoint's host only.
pub(crate) struct Client {
    endpoint: String,
    token: Option<Token>,
    agent: ureq::Agent,
}

/// Percent-encodes one URL path segment (a revision's `/` included, as the hub wants it).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Whether a failed request is worth making again.
fn transient(error: &ureq::Error) -> bool {
    match error {
        ureq::Error::Status(status, _) => *status == 429 || *status >= 500,
        ureq::Error::Transport(_) => true,
    }
}

/// The wait before retry `attempt` (1, 2, ...): short, a stall already took its timeout.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250 << attempt.min(4))
}

impl Client {
    pub(crate) fn new(
        endpoint: String,
        token: Option<Token>,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(connect_timeout)
            .timeout_read(read_timeout)
            .try_proxy_from_env(true)
            // The hub redirects LFS files to its CDN: the token stays with the hub's host.
            .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
            .user_agent(concat!("graft/", env!("CARGO_PKG_VERSION")))
            .build();
        Client {
            endpoint,
            token,
            agent,
        }
    }

    fn get(&self, url: &str) -> ureq::Request {
        let request = self.agent.get(url);
        match &self.token {
            Some(token) => request.set("authorization", &format!("Bearer {}", token.secret())),
            None => request,
        }
    }

    /// The one metadata request of a run: what `id` names now.
    pub(crate) fn listing(&self, id: &HubId, log: &mut dyn FnMut(&str)) -> Result<Listing> {
        let url = format!(
            "{}/api/models/{}/revision/{}?blobs=true",
            self.endpoint,
            id.repo,
            encode(&id.revision)
        );
        let mut attempt = 0;
        let response = loop {
            match self.get(&url).call() {
                Ok(response) => break response,
                Err(error) if attempt < RETRIES && transient(&error) => {
                    attempt += 1;
                    log(&format!(
                        "{id}: listing failed ({error}); retry {attempt} of {RETRIES}"
                    ));
                    std::thread::sleep(backoff(attempt));
                }
                Err(error) => return Err(self.request_error(id, error)),
            }
        };
        let mut text = String::new();
        response
            .into_reader()
            .take(LISTING_LIMIT)
            .read_to_string(&mut text)
            .map_err(|e| hub_error(id, format!("reading the listing from {url}: {e}")))?;
        parse_listing(&text).map_err(|reason| {
            hub_error(
                id,
                format!("the listing from {url} is not the hub's: {reason}"),
            )
        })
    }

    /// `file` of `commit` into `part`, resuming from what `part` holds already; retried on
    /// failures on the way. Returns when `part` holds `size` bytes (or, size unknown, when a
    /// transfer ended whole).
    pub(crate) fn download(
        &self,
        id: &HubId,
        commit: &str,
        file: &str,
        size: Option<u64>,
        part: &Path,
        log: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let url = format!(
            "{}/{}/resolve/{commit}/{}",
            self.endpoint,
            id.repo,
            file.split('/').map(encode).collect::<Vec<_>>().join("/")
        );
        let io = |source| Error::Io {
            path: part.to_path_buf(),
            source,
        };
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .map_err(io)?;
        let mut attempt = 0;
        loop {
            let mut start = out.metadata().map_err(io)?.len();
            if size.is_some_and(|size| start > size) {
                out.set_len(0).map_err(io)?;
                start = 0;
            }
            if size == Some(start) && start > 0 {
                return Ok(());
            }
            let failure = match self
                .get(&url)
                .set("range", &format!("bytes={start}-"))
                .call()
            {
                Ok(response) => {
                    if response.status() != 206 && start > 0 {
                        // The server ignored the range: the whole file again.
                        out.set_len(0).map_err(io)?;
                    }
                    let bar = progress(file, size, out.metadata().map_err(io)?.len());
                    let copied =
                        std::io::copy(&mut bar.wrap_read(response.into_reader()), &mut out)
                            .and_then(|_| out.flush());
                    bar.finish_and_clear();
                    let written = out.metadata().map_err(io)?.len();
                    match (copied, size) {
                        (Ok(()), None) => return Ok(()),
                        (Ok(()), Some(size)) if written == size => return Ok(()),
                        (Ok(()), Some(size)) => {
                            format!("the transfer ended after {written} of {size} bytes")
                        }
                        (Err(e), _) => format!("{e} after {written} bytes"),
                    }
                }
                // Asked from the end: the part file is whole if its length is the size.
                Err(ureq::Error::Status(416, _)) if size == Some(start) => return Ok(()),
                Err(ureq::Error::Status(416, _)) => {
                    out.set_len(0).map_err(io)?;
                    "the hub refused the range asked for".to_string()
                }
                Err(error) if transient(&error) => error.to_string(),
                Err(error) => return Err(self.request_error(id, error)),
            };
            if attempt == RETRIES {
                return Err(hub_error(
                    id,
                    format!("{file}: {failure}; gave up after {} tries", RETRIES + 1),
                ));
            }
            attempt += 1;
            log(&format!(
                "{id}: {file}: {failure}; retry {attempt} of {RETRIES}, resuming"
            ));
            std::thread::sleep(backoff(attempt));
        }
    }

    /// The hub's answer in words: `x-error-code` says which refusal it is.
    fn request_error(&self, id: &HubId, error: ureq::Error) -> Error {
        match error {
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
                        hub_error(id, format!("no revision `{}`", id.revision))
                    }
                    _ => hub_error(
                        id,
                        format!("HTTP {status} {code} from {}", response.get_url()),
                    ),
                }
            }
            ureq::Error::Transport(transport) => {
                hub_error(id, format!("cannot reach {}: {transport}", self.endpoint))
            }
        }
    }
}

/// A progress bar on stderr, drawn only when stderr is a terminal.
fn progress(file: &str, size: Option<u64>, start: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(size.unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(file.to_string());
    bar.set_position(start);
    bar
}

/// The hub's answer to `/api/models/{repo}/revision/{rev}?blobs=true`: `sha`, and per
/// sibling `rfilename`, `blobId`, `size` and, for LFS files, `lfs.sha256` and `lfs.size`.
fn parse_listing(text: &str) -> std::result::Result<Listing, String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let commit = json
        .get("sha")
        .and_then(|s| s.as_str())
        .filter(|s| matches!(Hash::from_name(s), Some(Hash::GitSha1(_))))
        .ok_or("no commit (`sha`, 40 hex digits)")?
        .to_string();
    let siblings = json
        .get("siblings")
        .and_then(|s| s.as_array())
        .ok_or("no `siblings` list")?;
    let mut files = BTreeMap::new();
    for sibling in siblings {
        let name = sibling
            .get("rfilename")
            .and_then(|n| n.as_str())
            .ok_or("a sibling without `rfilename`")?;
        let lfs = sibling.get("lfs").filter(|l| l.is_object());
        let (hash, size) = match lfs {
            Some(lfs) => (
                lfs.get("sha256")
                    .and_then(|h| h.as_str())
                    .and_then(Hash::from_name)
                    .filter(|h| matches!(h, Hash::Sha256(_))),
                lfs.get("size").and_then(|s| s.as_u64()),
            ),
            None => (
                sibling
                    .get("blobId")
                    .and_then(|h| h.as_str())
                    .and_then(Hash::from_name)
                    .filter(|h| matches!(h, Hash::GitSha1(_))),
                sibling.get("size").and_then(|s| s.as_u64()),
            ),
        };
        files.insert(name.to_string(), Remote { hash, size });
    }
    Ok(Listing { commit, files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_names_each_files_hash_and_size() {
        let sha = "a".repeat(40);
        let text = format!(
            r#"{{"sha":"{sha}","siblings":[
                {{"rfilename":"config.json","blobId":"{b}","size":3}},
                {{"rfilename":"model.safetensors","blobId":"{b}","size":130,"lfs":{{"sha256":"{l}","size":9,"pointerSize":130}}}},
                {{"rfilename":"README.md"}}]}}"#,
            b = "b".repeat(40),
            l = "c".repeat(64)
        );
        let listing = parse_listing(&text).unwrap();
        assert_eq!(listing.commit, sha);
        let config = &listing.files["config.json"];
        assert_eq!(
            (config.hash.clone(), config.size),
            (Some(Hash::GitSha1("b".repeat(40))), Some(3))
        );
        let model = &listing.files["model.safetensors"];
        assert_eq!(
            (model.hash.clone(), model.size),
            (Some(Hash::Sha256("c".repeat(64))), Some(9))
        );
        assert_eq!(listing.files["README.md"].hash, None);
        assert!(parse_listing(r#"{"sha":"../x","siblings":[]}"#).is_err());
    }

    #[test]
    fn a_revision_is_one_path_segment() {
        assert_eq!(encode("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode("v1.0"), "v1.0");
    }
}
