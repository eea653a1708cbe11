//! Hostile PyTorch checkpoints cost at most their size: each file built here is refused with a
//! clear error within 1 s and at most 64 MiB above the process's baseline peak RSS. Each case
//! runs in a child process (this test binary again, running only `child_opens_a_hostile_case`)
//! so that its peak is its own, not that of tests running beside it.
mod common;

use candle_core::{DType, Device};
use graft_model::weights::Weights;
use std::path::Path;
use std::process::Command;

const CASE_DIR: &str = "GRAFT_HOSTILE_CASE_DIR";
const SECONDS: f64 = 1.0;
const GROWTH_MIB: f64 = 64.0;

/// A tensor [`shape`] of storage "0" (four f32) as torch.save pickles it, up to its REDUCE;
/// `shape` and `stride` are pickled tuples.
fn tensor(shape: &[u8], stride: &[u8]) -> Vec<u8> {
    let mut p = b"ctorch._utils\n_rebuild_tensor_v2\n".to_vec();
    p.extend_from_slice(b"((X\x07\x00\x00\x00storagectorch\nFloatStorage\n");
    p.extend_from_slice(b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00");
    p.extend_from_slice(shape);
    p.extend_from_slice(stride);
    p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR");
    p
}

/// The [2, 2] tensor of [`tensor`].
fn matrix() -> Vec<u8> {
    tensor(b"K\x02K\x02\x86", b"K\x02K\x01\x86")
}

/// The pickle of `{"w": tensor_w, ...}` as torch.save (protocol 2) writes a state dict, with
/// `more` (further keys and values) after `w`'s.
fn state_dict(tensor_w: &[u8], more: &[u8]) -> Vec<u8> {
    let mut p = b"\x80\x02}q\x00(X\x01\x00\x00\x00w".to_vec();
    p.extend_from_slice(tensor_w);
    p.extend_from_slice(more);
    p.extend_from_slice(b"u.");
    p
}

/// This process's peak resident memory in KiB (Linux's VmHWM).
fn peak_kib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The child's side: opens the model folder named by `GRAFT_HOSTILE_CASE_DIR` and prints
/// whether it was refused, the error, the seconds it took and how far the peak RSS rose.
/// Ignored: it runs only when `refused_cheaply` starts it with `--ignored`.
#[test]
#[ignore = "a child process of refused_cheaply"]
fn child_opens_a_hostile_case() {
    let dir = std::env::var(CASE_DIR).expect("started by refused_cheaply");
    let before = peak_kib();
    let started = std::time::Instant::now();
    let result = Weights::load_folder(Path::new(&dir), DType::F32, &Device::Cpu, None);
    let seconds = started.elapsed().as_secs_f64();
    let growth_mib = (peak_kib() - before) / 1024.0;
    let error = result.err().map(|e| e.to_string()).unwrap_or_default();
    println!(
        "CASE {}",
        serde_json::json!({ "error": error, "seconds": seconds, "growth_mib": growth_mib })
    );
}

/// Opens the model folder `dir` in a child process and checks that it is refused with an
/// error holding `words`, within [`SECONDS`] and [`GROWTH_MIB`] of peak RSS.
fn refused_cheaply(dir: &Path, words: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_opens_a_hostile_case",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env(CASE_DIR, dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CASE {").map(|(_, rest)| format!("{{{rest}")))
        .unwrap_or_else(|| panic!("the child reported nothing: {stdout}"));
    let case: serde_json::Value = serde_json::from_str(&line).unwrap();
    let error = case["error"].as_str().unwrap();
    let (seconds, growth) = (
        case["seconds"].as_f64().unwrap(),
        case["growth_mib"].as_f64().unwrap(),
    );
    eprintln!("{words}: refused in {seconds:.3} s, peak RSS +{growth:.1} MiB: {error}");
    assert!(!error.is_empty(), "{}: not refused", dir.display());
    assert!(error.contains(words), "`{words}` not in: {error}");
    assert!(seconds < SECONDS, "{seconds} s: {error}");
    assert!(growth < GROWTH_MIB, "peak RSS rose {growth} MiB: {error}");
}

#[test]
fn millions_of_marks_are_refused_past_the_cell_cap() {
    // 12 million MARKs: 12 MB of pickle, under the size cap, that once made the reader keep a
    // stack position for each (96 MB and more).
    let dir = tempfile::tempdir().unwrap();
    let mut pickle = b"\x80\x02".to_vec();
    pickle.resize(12_000_000, b'(');
    pickle.push(b'.');
    common::write_torch_checkpoint(dir.path(), &pickle, &[]);
    refused_cheaply(dir.path(), "builds more than");
}

#[test]
fn a_shape_of_high_rank_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut tuple = b"(".to_vec();
    for _ in 0..100_000 {
        tuple.extend_from_slice(b"K\x01");
    }
    tuple.push(b't');
    common::write_torch_checkpoint(dir.path(), &state_dict(&tensor(&tuple, &tuple), b""), &[]);
    refused_cheaply(dir.path(), "dimensions");
}

#[test]
fn one_tensor_under_many_names_is_refused() {
    // The tensor memoized, then handed to 200 000 more names through the memo.
    let dir = tempfile::tempdir().unwrap();
    let mut more = b"q\x01".to_vec();
    for i in 0..200_000u32 {
        let name = format!("v{i}");
        more.push(b'X');
        more.extend_from_slice(&(name.len() as u32).to_le_bytes());
        more.extend_from_slice(name.as_bytes());
        more.extend_from_slice(b"h\x01");
    }
    common::write_torch_checkpoint(dir.path(), &state_dict(&matrix(), &more), &[]);
    refused_cheaply(dir.path(), "through the pickle's memo");

    // And one name twice, each with a tensor of its own.
    let mut twice = b"X\x01\x00\x00\x00w".to_vec();
    twice.extend_from_slice(&matrix());
    common::write_torch_checkpoint(dir.path(), &state_dict(&matrix(), &twice), &[]);
    refused_cheaply(dir.path(), "names `w` twice");
}

#[test]
fn compressed_entries_are_refused_before_they_inflate() {
    // A deflated pickle of 50 million MARKs (about 50 KB in the file): the 500 MB.
    let dir = tempfile::tempdir().unwrap();
    let mut pickle = b"\x80\x02".to_vec();
    pickle.resize(50_000_000, b'(');
    pickle.push(b'.');
    common::write_torch_checkpoint(dir.path(), &pickle, &["archive/data.pkl"]);
    let size = std::fs::metadata(dir.path().join("pytorch_model.bin"))
        .unwrap()
        .len();
    assert!(size < 1 << 20, "the bomb is {size} bytes");
    refused_cheaply(dir.path(), "is compressed");

    // A deflated storage, with an honest pickle.
    common::write_torch_checkpoint(dir.path(), &state_dict(&matrix(), b""), &["archive/data/0"]);
    refused_cheaply(dir.path(), "archive/data/0 is compressed");
}

#[test]
fn an_index_naming_a_shard_outside_its_folder_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let pickle = state_dict(&matrix(), b"");
    // A real checkpoint beside the model folder, which the index must not reach.
    common::write_torch_checkpoint(&root.path().join("elsewhere"), &pickle, &[]);
    let model = root.path().join("model");
    for shard in [
        "../elsewhere/pytorch_model.bin",
        "/etc/hostname",
        "sub/dir.bin",
    ] {
        std::fs::create_dir_all(&model).unwrap();
        let index = serde_json::json!({ "weight_map": { "w": shard } });
        std::fs::write(
            model.join("pytorch_model.bin.index.json"),
            index.to_string(),
        )
        .unwrap();
        refused_cheaply(&model, "not a file name in the index's folder");
    }
}
