//! A Hugging Face hub on 127.0.0.1 for tests: the repository listing
//! (`/api/models/{repo}/revision/{rev}?blobs=true`: the commit, each file's git blob id and
//! size, an LFS file's sha256 and size) and file resolution (`/{repo}/resolve/{rev}/{file}`),
//! LFS files redirected to a content store (`/lfs/{sha256}`) as the hub redirects them to its
//! CDN, `Range` requests, the hub's refusals (`x-error-code`), a repository that moves to a new
//! commit, and three faults: a body that breaks off once, one that stalls once, and bytes that
//! differ from their hash. Every request is logged. One connection per request (`Connection:
//! close`), each served on a thread of its own, so that a stalled one holds up no other.
#![allow(dead_code)] // each test uses part of it
use sha2::Digest;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// How long a stalled body holds its connection before closing it.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(4);

pub struct RepoFile {
    pub name: String,
    pub bytes: Vec<u8>,
    /// Stored with Git LFS: its etag is its sha256 and it is served by a redirect.
    pub lfs: bool,
    /// Serve these bytes with the last one changed (the etag stays the true sha256).
    pub corrupt: bool,
    /// Break the first full download off after this many bytes.
    pub drop_after: Option<usize>,
    /// Stall the first full download after this many bytes (hold the connection for
    /// [`STALL`], sending nothing).
    pub stall_after: Option<usize>,
    dropped: AtomicBool,
}

impl RepoFile {
    pub fn new(name: &str, bytes: Vec<u8>, lfs: bool) -> Self {
        RepoFile {
            name: name.to_string(),
            bytes,
            lfs,
            corrupt: false,
            drop_after: None,
            stall_after: None,
            dropped: AtomicBool::new(false),
        }
    }

    pub fn sha256(&self) -> String {
        sha256(&self.bytes)
    }

    /// The listing's entry: a git blob id and size (for an LFS file, those of its pointer),
    /// and an LFS file's sha256 and size.
    fn sibling(&self) -> String {
        if self.lfs {
            let pointer = format!(
                "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n",
                self.sha256(),
                self.bytes.len()
            );
            format!(
                r#"{{"rfilename":"{}","blobId":"{}","size":{},"lfs":{{"sha256":"{}","size":{},"pointerSize":{}}}}}"#,
                self.name,
                git_blob_id(pointer.as_bytes()),
                pointer.len(),
                self.sha256(),
                self.bytes.len(),
                pointer.len()
            )
        } else {
            format!(
                r#"{{"rfilename":"{}","blobId":"{}","size":{}}}"#,
                self.name,
                git_blob_id(&self.bytes),
                self.bytes.len()
            )
        }
    }

    fn served(&self) -> Vec<u8> {
        let mut bytes = self.bytes.clone();
        if self.corrupt {
            if let Some(last) = bytes.last_mut() {
                *last ^= 0xff;
            }
        }
        bytes
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// Git's blob id: the sha1 of `blob <len>\0` and the bytes.
pub fn git_blob_id(bytes: &[u8]) -> String {
    let mut hasher = sha1::Sha1::new();
    hasher.update(format!("blob {}\0", bytes.len()).as_bytes());
    hasher.update(bytes);
    format!("{:x}", hasher.finalize())
}

pub struct FakeRepo {
    pub id: String,
    /// The commit `main` names.
    pub commit: String,
    pub files: Vec<RepoFile>,
    /// A gated repository: only this bearer token may read it.
    pub gated_token: Option<String>,
}

impl FakeRepo {
    pub fn new(id: &str, files: Vec<RepoFile>) -> Self {
        FakeRepo {
            id: id.to_string(),
            commit: COMMIT.to_string(),
            files,
            gated_token: None,
        }
    }

    /// A repository holding the files of a local model folder, the weights in LFS.
    pub fn from_folder(id: &str, dir: &std::path::Path) -> Self {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let files = names
            .iter()
            .map(|name| {
                let bytes = std::fs::read(dir.join(name)).unwrap();
                RepoFile::new(name, bytes, name.ends_with(".safetensors"))
            })
            .collect();
        FakeRepo::new(id, files)
    }

    pub fn file_mut(&mut self, name: &str) -> &mut RepoFile {
        self.files.iter_mut().find(|f| f.name == name).unwrap()
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

pub struct FakeHub {
    pub url: String,
    state: Arc<State>,
}

struct State {
    url: String,
    repos: Mutex<Vec<FakeRepo>>,
    log: Mutex<Vec<Request>>,
}

impl FakeHub {
    /// Serves `repos` from a thread until the test process ends.
    pub fn start(repos: Vec<FakeRepo>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            url: url.clone(),
            repos: Mutex::new(repos),
            log: Mutex::new(Vec::new()),
        });
        let serving = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = serving.clone();
                // A client that hung up is its own business.
                std::thread::spawn(move || state.serve(stream));
            }
        });
        FakeHub { url, state }
    }

    /// Changes the repositories while the hub serves them (a push to `main`).
    pub fn update(&self, change: impl FnOnce(&mut Vec<FakeRepo>)) {
        change(&mut self.state.repos.lock().unwrap());
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn paths(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.path).collect()
    }

    pub fn clear(&self) {
        self.state.log.lock().unwrap().clear();
    }
}

struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Send only this many bytes of the body, then close.
    cut: Option<usize>,
    /// Send this many bytes of the body, then hold the connection for [`STALL`].
    stall: Option<usize>,
}

impl Response {
    fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut: None,
            stall: None,
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The hub's refusal: a status, `x-error-code` and a JSON message.
    fn refusal(status: u16, code: &str, message: &str) -> Self {
        let mut response = Response::new(status).header("x-error-code", code);
        response.body = format!("{{\"error\":\"{message}\"}}").into_bytes();
        response
    }
}

impl State {
    fn serve(&self, stream: TcpStream) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (mut range, mut authorization) = (None, None);
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "range" => range = Some(value.trim().to_string()),
                    "authorization" => authorization = Some(value.trim().to_string()),
                    _ => {}
                }
            }
        }
        let request = Request {
            path,
            range,
            authorization,
        };
        self.log.lock().unwrap().push(request.clone());
        let response = self.respond(&request);
        write(stream, response)
    }

    fn respond(&self, request: &Request) -> Response {
        let repos = self.repos.lock().unwrap();
        let path = request.path.as_str();
        if let Some(sha) = path.strip_prefix("/lfs/") {
            let file = repos
                .iter()
                .flat_map(|r| &r.files)
                .find(|f| f.lfs && f.sha256() == sha);
            return match file {
                Some(file) => body(file, request),
                None => Response::refusal(404, "EntryNotFound", "no such object"),
            };
        }
        let (repo_id, rest) = match path.strip_prefix("/api/models/") {
            Some(rest) => match rest.split_once("/revision/") {
                Some((repo, _)) => (repo, None),
                None => return Response::refusal(404, "", "not found"),
            },
            None => match path[1..].split_once("/resolve/") {
                Some((repo, rest)) => (repo, Some(rest)),
                None => return Response::refusal(404, "", "not found"),
            },
        };
        let Some(repo) = repos.iter().find(|r| r.id == repo_id) else {
            return Response::refusal(404, "RepoNotFound", "Repository not found");
        };
        if let Some(token) = &repo.gated_token {
            if request.authorization.as_deref() != Some(&format!("Bearer {token}")) {
                return Response::refusal(401, "GatedRepo", "Access to this model is restricted");
            }
        }
        let Some(rest) = rest else {
            let siblings: Vec<String> = repo.files.iter().map(RepoFile::sibling).collect();
            let mut response = Response::new(200).header("content-type", "application/json");
            response.body = format!(
                "{{\"id\":\"{}\",\"sha\":\"{}\",\"siblings\":[{}]}}",
                repo.id,
                repo.commit,
                siblings.join(",")
            )
            .into_bytes();
            return response;
        };
        let name = rest.split_once('/').map_or("", |(_, name)| name);
        let Some(file) = repo.files.iter().find(|f| f.name == name) else {
            return Response::refusal(404, "EntryNotFound", "Entry not found");
        };
        if file.lfs {
            let sha = file.sha256();
            Response::new(302)
                .header("location", format!("{}/lfs/{sha}", self.url))
                .header("x-repo-commit", repo.commit.clone())
        } else {
            body(file, request).header("x-repo-commit", repo.commit.clone())
        }
    }
}

/// A file's bytes, whole or the `Range` asked for.
fn body(file: &RepoFile, request: &Request) -> Response {
    let bytes = file.served();
    let total = bytes.len();
    let Some(range) = request.range.as_deref() else {
        let mut response = Response::new(200);
        response.body = bytes;
        return response;
    };
    let spec = range.trim_start_matches("bytes=");
    let (start, end) = spec.split_once('-').unwrap_or((spec, ""));
    let start: usize = start.parse().unwrap_or(0);
    let end: usize = end.parse().map_or(total.saturating_sub(1), |e: usize| {
        e.min(total.saturating_sub(1))
    });
    if start >= total {
        return Response::new(416).header("content-range", format!("bytes */{total}"));
    }
    let mut response =
        Response::new(206).header("content-range", format!("bytes {start}-{end}/{total}"));
    response.body = bytes[start..=end].to_vec();
    let whole_from_start = start == 0 && end + 1 == total;
    if whole_from_start && !file.dropped.swap(true, Ordering::SeqCst) {
        response.cut = file.drop_after;
        response.stall = file.stall_after;
    }
    response
}

fn write(mut stream: TcpStream, response: Response) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} X\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        response.body.len()
    ));
    stream.write_all(head.as_bytes())?;
    let sent = response
        .cut
        .or(response.stall)
        .unwrap_or(response.body.len());
    stream.write_all(&response.body[..sent])?;
    stream.flush()?;
    if response.stall.is_some() {
        std::thread::sleep(STALL);
    }
    stream.shutdown(std::net::Shutdown::Both)
}
