//! The ABI stamp: the source hash embedded in graft-peft is the hash of the source on disk and
//! follows any edit; candle's version is the workspace's; tensor ids read without Debug text.
#[allow(dead_code)]
#[path = "../src/abi_stamp.rs"]
mod abi_stamp;

use graft_peft::abi::{abi_differences, fresh_tensor_id, ABI};
use std::path::Path;

#[test]
fn the_embedded_source_hash_is_the_hash_of_the_source_on_disk_and_follows_any_edit() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dirs = abi_stamp::source_dirs(crate_dir);
    assert_eq!(
        dirs.len(),
        2,
        "graft-peft's and graft-model's src: {dirs:?}"
    );
    assert_eq!(
        abi_stamp::source_hash(&dirs).unwrap(),
        env!("GRAFT_SOURCE_HASH")
    );
    assert!(ABI.contains(concat!("; source ", env!("GRAFT_SOURCE_HASH"))));

    // A copy hashes the same; one changed byte in either crate changes the hash.
    let copy = tempfile::tempdir().unwrap();
    let copies: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| copy_tree(dir, &copy.path().join(i.to_string())))
        .collect();
    let original = abi_stamp::source_hash(&copies).unwrap();
    assert_eq!(original, env!("GRAFT_SOURCE_HASH"));
    for dir in &copies {
        let file = dir.join("lib.rs");
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, format!("{text}\n")).unwrap();
        assert_ne!(
            abi_stamp::source_hash(&copies).unwrap(),
            original,
            "{file:?}"
        );
        std::fs::write(&file, text).unwrap();
    }
}

#[test]
fn the_candle_version_is_the_one_the_workspace_lock_resolved() {
    let (version, lock) = abi_stamp::candle_version(Path::new(env!("CARGO_MANIFEST_DIR")))
        .expect("the workspace Cargo.lock names candle-core");
    let manifest = std::fs::read_to_string(lock.with_file_name("Cargo.toml")).unwrap();
    let requirement = manifest
        .lines()
        .find_map(|line| line.strip_prefix("candle-core = \""))
        .and_then(|rest| rest.split('"').next())
        .expect("the workspace manifest asks for candle-core");
    assert!(
        version.starts_with(requirement),
        "{version} is not the {requirement} the workspace asks for"
    );
    assert!(ABI.ends_with(&format!("; candle-core {version}")), "{ABI}");
}

#[test]
fn tensor_ids_read_without_debug_text_and_increase() {
    let a = fresh_tensor_id();
    let b = fresh_tensor_id();
    assert!(a > 0 && b > a, "{a} {b}");
}

#[test]
fn differences_name_each_part() {
    let stale = ABI.replace(env!("GRAFT_SOURCE_HASH"), "0000000000000000");
    assert_eq!(
        abi_differences(ABI, &stale),
        "graft-peft/graft-model source"
    );
    assert_eq!(abi_differences(ABI, ABI), "format");
    let old = "graft-peft 0.0.1; rustc 1.0.0; features cuda";
    assert!(abi_differences(ABI, old).starts_with("graft-peft version, compiler, features"));
}

fn copy_tree(from: &Path, to: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
    to.to_path_buf()
}
