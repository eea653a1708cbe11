//! What a file in the cache is checked against, and the record that it was.
//!
//! The hub names every file by a hash: an LFS file by the sha256 of its bytes, any other by
//! its git blob id, `sha1("blob {len}\0" + bytes)`. The cache names each blob by that hash
//! (`blobs/<hash>`) and links it into `snapshots/<commit>/<file>`, as Python's
//! `huggingface_hub` does. A download is hashed before it is renamed to its blob name, so a
//! blob at its final name was checked, unless another tool or an older graft wrote it, or
//! something rewrote it since.
//!
//! Hashing every file on every run would cost seconds for a large model, so a check leaves a
//! marker, `.graft-verified/<hash>` in the repository's folder, holding the blob's length and
//! modification time when its hash was found right. A later run trusts a blob whose length
//! and modification time still match its marker and hashes it again otherwise; a file at a
//! snapshot path that is not the blob it should link to (planted there, or a copy) is always
//! hashed. The markers live beside `blobs/` so that deleting a repository from the cache
//! deletes them too, and outside it so that no other tool takes them for blobs.
use crate::error::{Error, Result};
use sha2::Digest;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The hash the hub names a file by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hash {
    /// An LFS file: the sha256 of its bytes, 64 lowercase hex digits.
    Sha256(String),
    /// A git blob id: 40 lowercase hex digits.
    GitSha1(String),
}

impl Hash {
    /// The hash a blob's name spells, if it spells one.
    pub(crate) fn from_name(name: &str) -> Option<Hash> {
        let hex = |n: usize| {
            name.len() == n && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if hex(64) {
            Some(Hash::Sha256(name.to_string()))
        } else if hex(40) {
            Some(Hash::GitSha1(name.to_string()))
        } else {
            None
        }
    }

    pub(crate) fn hex(&self) -> &str {
        match self {
            Hash::Sha256(hex) | Hash::GitSha1(hex) => hex,
        }
    }

    pub(crate) fn algorithm(&self) -> &'static str {
        match self {
            Hash::Sha256(_) => "sha256",
            Hash::GitSha1(_) => "git blob sha1",
        }
    }

    /// The same hash of the file at `path`.
    pub(crate) fn of_file(&self, path: &Path) -> Result<String> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        match self {
            Hash::Sha256(_) => {
                let mut hasher = sha2::Sha256::new();
                std::io::copy(&mut file, &mut hasher).map_err(io)?;
                Ok(format!("{:x}", hasher.finalize()))
            }
            Hash::GitSha1(_) => {
                let len = file.metadata().map_err(io)?.len();
                let mut hasher = sha1::Sha1::new();
                hasher.update(format!("blob {len}\0").as_bytes());
                // Only the length just stated: a file growing meanwhile fails the check.
                std::io::copy(&mut (&mut file).take(len), &mut hasher).map_err(io)?;
                Ok(format!("{:x}", hasher.finalize()))
            }
        }
    }
}

/// What a check found.
pub(crate) enum Check {
    Good,
    /// Not the length the hub reports.
    WrongSize {
        actual: u64,
    },
    /// Not the bytes the hash names.
    WrongHash {
        actual: String,
    },
}

/// Checks `path` (a snapshot link, a blob, or a finished download) against `hash` and, where
/// the hub reported one, `size`. `blob` is where the blob named by `hash` lives and `markers`
/// the folder of verification markers.
pub(crate) fn check(
    path: &Path,
    hash: &Hash,
    size: Option<u64>,
    blob: &Path,
    markers: &Path,
) -> Result<Check> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if let Some(expected) = size {
        if meta.len() != expected {
            return Ok(Check::WrongSize { actual: meta.len() });
        }
    }
    let marker = markers.join(hash.hex());
    let is_blob = std::fs::canonicalize(path).ok() == std::fs::canonicalize(blob).ok();
    let stamp = stamp(&meta);
    if is_blob && std::fs::read_to_string(&marker).is_ok_and(|m| m == stamp) {
        return Ok(Check::Good);
    }
    let actual = hash.of_file(path)?;
    if actual != hash.hex() {
        return Ok(Check::WrongHash { actual });
    }
    if is_blob {
        std::fs::create_dir_all(markers).map_err(io(markers))?;
        std::fs::write(&marker, stamp).map_err(io(&marker))?;
    }
    Ok(Check::Good)
}

/// A file's length and modification time, as a marker holds them.
fn stamp(meta: &std::fs::Metadata) -> String {
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{} {modified}\n", meta.len())
}

/// Links `snapshot_file` to `blob` (a relative symlink, as `huggingface_hub` makes; a copy
/// where there are no symlinks), replacing whatever was there.
pub(crate) fn link(blob: &Path, snapshot_file: &Path) -> Result<PathBuf> {
    let io = |source| Error::Io {
        path: snapshot_file.to_path_buf(),
        source,
    };
    if let Some(parent) = snapshot_file.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    remove(snapshot_file)?;
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(relative(blob, snapshot_file), snapshot_file).map_err(io)?;
    }
    #[cfg(not(unix))]
    {
        std::fs::copy(blob, snapshot_file).map_err(io)?;
    }
    Ok(snapshot_file.to_path_buf())
}

/// `blob` as seen from the folder of `from`; both lie in one repository folder.
#[cfg(unix)]
fn relative(blob: &Path, from: &Path) -> PathBuf {
    let blob: Vec<_> = blob.components().collect();
    let from: Vec<_> = from.components().collect();
    let common = blob.iter().zip(&from).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    // One `..` per folder of `from` below the common part (its last component is the file).
    for _ in common..from.len().saturating_sub(1) {
        path.push("..");
    }
    for part in blob.iter().skip(common) {
        path.push(part);
    }
    path
}

/// Removes a file or link if there is one.
pub(crate) fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_git_blob_id_is_the_sha1_of_its_header_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "hello\n").unwrap();
        // `git hash-object` of "hello\n".
        let hash = Hash::GitSha1("ce013625030ba8dba906f756967f9e9ca394464a".into());
        assert_eq!(hash.of_file(&file).unwrap(), hash.hex());
    }

    #[cfg(unix)]
    #[test]
    fn a_snapshot_link_is_relative_to_its_folder() {
        let blob = Path::new("/c/models--a--b/blobs/h");
        let link = |f: &str| relative(blob, &Path::new("/c/models--a--b/snapshots/s").join(f));
        assert_eq!(link("config.json"), Path::new("../../blobs/h"));
        assert_eq!(link("sub/x.json"), Path::new("../../../blobs/h"));
    }
}
