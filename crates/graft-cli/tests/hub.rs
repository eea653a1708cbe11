//! Models named by hub id, fetched from a fake hub on 127.0.0.1 (`fake_hub`): what is
//! fetched, the cache and its one metadata request a run, a branch that moved, resumed,
//! stalled and corrupted downloads, files planted in the cache, the hub's refusals, and
//! `graft` taking a hub id (or an alias, offline) for `--model`.
mod common;
mod fake_hub;

use fake_hub::{sha256, FakeHub, FakeRepo, RepoFile};
use graft_hub::{Files, Hub, HubId};
use graft_testkit as testkit;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const STORIES: &str = "graft-test/stories260K";

fn stories_dir() -> PathBuf {
    testkit::workspace_root().join("../shared/models/stories260K")
}

fn stories() -> FakeRepo {
    FakeRepo::from_folder(STORIES, &stories_dir())
}

fn hub(server: &FakeHub, cache: &Path) -> Hub {
    Hub::new(server.url.clone(), cache)
}

/// The files requested from the hub (not the listing), by name.
fn files_requested(server: &FakeHub) -> BTreeSet<String> {
    server
        .paths()
        .into_iter()
        .filter_map(|p| Some(p.split_once("/resolve/")?.1.split_once('/')?.1.to_string()))
        .collect()
}

fn id(text: &str) -> HubId {
    HubId::parse(text).unwrap()
}

fn fetch(hub: &Hub, repo: &str, files: Files) -> graft_hub::Result<PathBuf> {
    hub.fetch(&id(repo), files, &mut |m| eprintln!("{m}"))
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The transfer of model.safetensors was resumed at byte `offset` (a range request), and the
/// file in `snapshot` is the hub's (`expected`, its sha256).
fn assert_resumed_at(server: &FakeHub, offset: usize, snapshot: &Path, expected: &str) {
    let ranges: Vec<String> = server
        .requests()
        .into_iter()
        .filter_map(|r| r.range)
        .collect();
    assert!(
        ranges.contains(&format!("bytes={offset}-")),
        "no resuming range in {ranges:?}"
    );
    let bytes = std::fs::read(snapshot.join("model.safetensors")).unwrap();
    assert_eq!(sha256(&bytes), expected);
}

#[test]
fn a_hub_id_is_fetched_then_opened_then_served_from_the_cache() {
    let mut repo = stories();
    // Neither is fetched: the README is no model file, and safetensors win over pickles.
    repo.files
        .push(RepoFile::new("README.md", b"# stories".to_vec(), false));
    repo.files
        .push(RepoFile::new("pytorch_model.bin", vec![0; 64], true));
    let server = FakeHub::start(vec![repo]);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path());

    let snapshot = fetch(&hub, STORIES, Files::Model).unwrap();
    assert!(snapshot.starts_with(cache.path().join("models--graft-test--stories260K")));
    assert_eq!(names(&snapshot), names(&stories_dir()));
    for name in names(&stories_dir()) {
        assert_eq!(
            std::fs::read(snapshot.join(&name)).unwrap(),
            std::fs::read(stories_dir().join(&name)).unwrap(),
            "{name}"
        );
    }
    assert!(
        !server
            .paths()
            .iter()
            .any(|p| p.contains("README") || p.contains(".bin")),
        "{:?}",
        server.paths()
    );
    let decoder = graft_model::decoder::Decoder::open(
        &snapshot,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(decoder.spec().vocab_size, 512);

    // Online, a run asks once what `main` names now, as huggingface_hub does, and fetches
    // nothing it holds.
    server.clear();
    assert_eq!(fetch(&hub, STORIES, Files::Model).unwrap(), snapshot);
    let listing = format!("/api/models/{STORIES}/revision/main?blobs=true");
    assert_eq!(server.paths(), [listing]);
    // A commit id names what it names forever: no request; offline, none at all.
    server.clear();
    let pinned = format!("{STORIES}@{}", fake_hub::COMMIT);
    assert_eq!(fetch(&hub, &pinned, Files::Model).unwrap(), snapshot);
    let offline = Hub {
        offline: true,
        ..hub.clone()
    };
    assert_eq!(fetch(&offline, STORIES, Files::Model).unwrap(), snapshot);
    assert_eq!(fetch(&offline, &pinned, Files::Model).unwrap(), snapshot);
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    let missing = fetch(&offline, &format!("{STORIES}@v2"), Files::Model).unwrap_err();
    assert!(missing.to_string().contains("HF_HUB_OFFLINE"), "{missing}");
    assert!(server.requests().is_empty(), "{:?}", server.requests());
}

#[test]
fn a_download_that_breaks_off_resumes_with_a_range() {
    let mut repo = stories();
    let cut = 10_000;
    repo.file_mut("model.safetensors").drop_after = Some(cut);
    let expected = repo.file_mut("model.safetensors").sha256();
    let server = FakeHub::start(vec![repo]);
    let cache = tempfile::tempdir().unwrap();

    let snapshot = fetch(&hub(&server, cache.path()), STORIES, Files::Model).unwrap();
    assert_resumed_at(&server, cut, &snapshot, &expected);
}

#[test]
fn a_file_whose_sha256_differs_from_the_hubs_is_refused_and_removed() {
    let mut repo = stories();
    repo.file_mut("model.safetensors").corrupt = true;
    let expected = repo.file_mut("model.safetensors").sha256();
    let server = FakeHub::start(vec![repo]);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path());

    let error = fetch(&hub, STORIES, Files::Model).unwrap_err();
    let graft_hub::Error::HashMismatch(mismatch) = &error else {
        panic!("{error}");
    };
    let actual = &mismatch.actual;
    assert_eq!(
        (mismatch.file.as_str(), &mismatch.expected),
        ("model.safetensors", &expected)
    );
    assert_ne!(actual, &expected);
    let message = error.to_string();
    assert!(
        message.contains("model.safetensors")
            && message.contains(&expected)
            && message.contains(actual),
        "{message}"
    );
    let repo_dir = cache.path().join("models--graft-test--stories260K");
    let blobs = names(&repo_dir.join("blobs"));
    assert!(
        !blobs.contains(&expected) && !blobs.contains(&format!("{expected}.incomplete")),
        "{blobs:?}"
    );
    let snapshot = repo_dir.join("snapshots").join(fake_hub::COMMIT);
    assert!(!snapshot.join("model.safetensors").exists());
    assert_eq!(hub.cached(&id(STORIES), Files::Model), None);
}

#[test]
fn a_missing_repository_and_a_gated_one_say_what_to_do() {
    let mut gated = stories();
    gated.id = "graft-test/gated".into();
    gated.gated_token = Some("hf_granted".into());
    let server = FakeHub::start(vec![gated]);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path());

    let missing = fetch(&hub, "nobody/nothing", Files::Model).unwrap_err();
    assert!(
        matches!(missing, graft_hub::Error::RepoNotFound { .. }),
        "{missing}"
    );
    assert!(missing.to_string().contains("nobody/nothing"), "{missing}");

    let refused = fetch(&hub, "graft-test/gated", Files::Model).unwrap_err();
    let message = refused.to_string();
    assert!(
        matches!(refused, graft_hub::Error::Gated { .. }),
        "{message}"
    );
    assert!(
        message.contains("graft-test/gated") && message.contains("set HF_TOKEN"),
        "{message}"
    );

    server.clear();
    let granted = Hub {
        token: Some("hf_granted".into()),
        ..hub.clone()
    };
    let snapshot = fetch(&granted, "graft-test/gated", Files::Model).unwrap();
    assert!(snapshot.join("model.safetensors").is_file());
    assert!(server
        .requests()
        .iter()
        .any(|r| r.authorization.as_deref() == Some("Bearer hf_granted")));
}

#[test]
fn only_what_the_model_needs_is_fetched_sharded_or_pickled() {
    let index = |ext: &str| {
        format!(
            r#"{{"metadata":{{}},"weight_map":{{"a":"model-00001-of-00002.{ext}","b":"model-00002-of-00002.{ext}","c":"model-00001-of-00002.{ext}"}}}}"#
        )
        .into_bytes()
    };
    // Placeholder bytes; an index names the two shards of its weights' extension.
    let repo = |id: &str, files: &[&str]| {
        let file = |name: &&str| {
            let bytes = match name.strip_suffix(".index.json") {
                Some(weights) => index(weights.rsplit('.').next().unwrap()),
                None => name.as_bytes().to_vec(),
            };
            let lfs = [".safetensors", ".bin", ".msgpack"]
                .iter()
                .any(|x| name.ends_with(x));
            RepoFile::new(name, bytes, lfs)
        };
        FakeRepo::new(id, files.iter().map(file).collect())
    };
    let sharded = repo(
        "graft-test/sharded",
        &[
            "config.json",
            "tokenizer.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "pytorch_model.bin",
            "README.md",
        ],
    );
    let pickled = repo(
        "graft-test/pickled",
        &[
            "config.json",
            "pytorch_model.bin.index.json",
            "model-00001-of-00002.bin",
            "model-00002-of-00002.bin",
            "flax_model.msgpack",
        ],
    );
    let broken = repo(
        "graft-test/broken",
        &[
            "config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
        ],
    );
    let server = FakeHub::start(vec![sharded, pickled, broken]);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path());

    let dir = fetch(&hub, "graft-test/sharded", Files::Config).unwrap();
    assert_eq!(names(&dir), set(&["config.json"]));
    assert!(
        server
            .paths()
            .iter()
            .all(|p| p.starts_with("/api/") || p.ends_with("/config.json")),
        "{:?}",
        server.paths()
    );
    let dir = fetch(&hub, "graft-test/sharded", Files::Model).unwrap();
    assert_eq!(
        names(&dir),
        set(&[
            "config.json",
            "tokenizer.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ])
    );
    // A snapshot lacking a shard (an interrupted fetch) is no cache hit. Fetching again links
    // the shard from its blob without a request; with the blob gone too, it requests only
    // that shard.
    let shard = dir.join("model-00002-of-00002.safetensors");
    let blob = std::fs::canonicalize(&shard).unwrap();
    std::fs::remove_file(&shard).unwrap();
    assert_eq!(hub.cached(&id("graft-test/sharded"), Files::Model), None);
    server.clear();
    fetch(&hub, "graft-test/sharded", Files::Model).unwrap();
    assert!(shard.is_file());
    assert!(files_requested(&server).is_empty(), "{:?}", server.paths());
    std::fs::remove_file(&shard).unwrap();
    std::fs::remove_file(&blob).unwrap();
    server.clear();
    fetch(&hub, "graft-test/sharded", Files::Model).unwrap();
    assert_eq!(
        files_requested(&server),
        set(&["model-00002-of-00002.safetensors"])
    );
    let dir = fetch(&hub, "graft-test/pickled", Files::Model).unwrap();
    assert_eq!(
        names(&dir),
        set(&[
            "config.json",
            "pytorch_model.bin.index.json",
            "model-00001-of-00002.bin",
            "model-00002-of-00002.bin"
        ])
    );
    let error = fetch(&hub, "graft-test/broken", Files::Model).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("names the shard model-00002-of-00002.safetensors, which the repository"),
        "{error}"
    );
}

#[test]
fn a_new_commit_on_main_is_noticed_and_only_its_changed_files_fetched() {
    let server = FakeHub::start(vec![stories()]);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path());
    let first = fetch(&hub, STORIES, Files::Model).unwrap();

    // A push to main: config.json changes (one more line), the weights do not.
    let pushed = "89abcdef0123456789abcdef0123456789abcdef";
    server.update(|repos| {
        repos[0].commit = pushed.to_string();
        repos[0].file_mut("config.json").bytes.push(b'\n');
    });
    server.clear();
    let second = fetch(&hub, STORIES, Files::Model).unwrap();
    assert_eq!(second.file_name().unwrap(), pushed);
    assert_ne!(first, second);
    assert_eq!(files_requested(&server), set(&["config.json"]));
    let repo_dir = cache.path().join("models--graft-test--stories260K");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        pushed
    );
    assert!(std::fs::read(second.join("config.json"))
        .unwrap()
        .ends_with(b"\n"));
    assert_eq!(
        std::fs::read(second.join("model.safetensors")).unwrap(),
        std::fs::read(stories_dir().join("model.safetensors")).unwrap()
    );
    // Offline, main is what the last run found.
    let offline = Hub {
        offline: true,
        ..hub.clone()
    };
    assert_eq!(fetch(&offline, STORIES, Files::Model).unwrap(), second);
}

#[test]
fn a_stalled_transfer_times_out_and_resumes() {
    let mut repo = stories();
    let stall = 10_000;
    repo.file_mut("model.safetensors").stall_after = Some(stall);
    let expected = repo.file_mut("model.safetensors").sha256();
    let server = FakeHub::start(vec![repo]);
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub {
        read_timeout: std::time::Duration::from_millis(500),
        ..hub(&server, cache.path())
    };

    let started = std::time::Instant::now();
    let snapshot = fetch(&hub, STORIES, Files::Model).unwrap();
    // Well before the stalled connection would have closed by itself.
    assert!(
        started.elapsed() < fake_hub::STALL,
        "{:?}",
        started.elapsed()
    );
    assert_resumed_at(&server, stall, &snapshot, &expected);
}

#[test]
fn a_file_planted_in_the_cache_is_checked_again() {
    let server = FakeHub::start(vec![stories()]);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path());
    let snapshot = fetch(&hub, STORIES, Files::Model).unwrap();
    let weights = snapshot.join("model.safetensors");
    let good = std::fs::read(&weights).unwrap();
    let mut planted = good.clone();
    planted[100] ^= 0xff;
    let offline = Hub {
        offline: true,
        ..hub.clone()
    };

    // In place of the snapshot's link: online, replaced by a link to the good blob.
    std::fs::remove_file(&weights).unwrap();
    std::fs::write(&weights, &planted).unwrap();
    server.clear();
    fetch(&hub, STORIES, Files::Model).unwrap();
    assert_eq!(std::fs::read(&weights).unwrap(), good);
    assert!(files_requested(&server).is_empty(), "{:?}", server.paths());

    // Into the blob itself, same length (as a crash between a rename and a check could leave
    // it): offline it is refused and removed, online fetched again.
    let blob = std::fs::canonicalize(&weights).unwrap();
    std::fs::write(&blob, &planted).unwrap();
    let error = fetch(&offline, STORIES, Files::Model).unwrap_err();
    assert!(
        matches!(error, graft_hub::Error::CacheCorrupt(_)),
        "{error}"
    );
    assert!(error.to_string().contains("model.safetensors"), "{error}");
    assert!(!blob.exists());
    std::fs::write(&blob, &planted).unwrap();
    server.clear();
    fetch(&hub, STORIES, Files::Model).unwrap();
    assert_eq!(std::fs::read(&weights).unwrap(), good);
    assert_eq!(files_requested(&server), set(&["model.safetensors"]));
}

#[test]
fn a_token_never_shows_in_a_debug_print() {
    let hub = Hub {
        token: Some("hf_secret_value".into()),
        ..Hub::new("http://127.0.0.1:9", "/nonexistent")
    };
    let printed = format!("{hub:?}");
    assert!(!printed.contains("hf_secret_value"), "{printed}");
    assert!(printed.contains("redacted"), "{printed}");
}

#[test]
fn hub_ids_are_told_apart_from_paths() {
    let parsed = |text: &str| HubId::parse(text).map(|id| (id.repo, id.revision));
    let pair = |repo: &str, revision: &str| Some((repo.to_string(), revision.to_string()));
    assert_eq!(parsed("owner/name"), pair("owner/name", "main"));
    assert_eq!(
        parsed("Qwen/Qwen2.5-0.5B@v1.0"),
        pair("Qwen/Qwen2.5-0.5B", "v1.0")
    );
    assert_eq!(parsed("a/b@refs/pr/1"), pair("a/b", "refs/pr/1"));
    for path in [
        "minilm",
        "./runs/x",
        "../runs/x",
        "/data/model",
        "runs/x/y",
        "a//b",
        "a/.b",
        "a/b-",
        "a/b--c",
        "a/b@",
        "a/b@../x",
        "a/b c",
    ] {
        assert_eq!(parsed(path), None, "{path}");
    }
}

/// `graft` run in `dir` with the fake hub's endpoint, a Hugging Face home of its own and
/// `env` (no plugins: nothing here trains).
fn graft_with_hub(
    args: &[&str],
    dir: &Path,
    server: &FakeHub,
    home: &Path,
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_graft"));
    command
        .args(args)
        .current_dir(dir)
        .env("HF_ENDPOINT", &server.url)
        .env("HF_HOME", home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .envs(env.iter().copied());
    command.output().unwrap()
}

#[test]
fn graft_takes_a_hub_id_for_its_model() {
    let mut gated = stories();
    gated.id = "graft-test/gated".into();
    gated.gated_token = Some("hf_granted".into());
    let server = FakeHub::start(vec![stories(), gated]);
    let home = tempfile::tempdir().unwrap();
    let root = testkit::workspace_root();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        graft_with_hub(args, &root, &server, home.path(), env)
    };
    let generate = [
        "generate",
        "--model",
        STORIES,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "30",
    ];
    let story = ", there was a little girl named Lily.";

    let out = run(&generate, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(stdout.starts_with(story), "{stdout}");
    assert!(home
        .path()
        .join("hub/models--graft-test--stories260K")
        .is_dir());

    server.clear();
    let out = run(&generate, &[("HF_HUB_OFFLINE", "1")]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(story));
    assert!(server.requests().is_empty(), "{:?}", server.requests());

    // A local folder of the same name wins over the hub.
    let here = tempfile::tempdir().unwrap();
    std::fs::create_dir(here.path().join("graft-test")).unwrap();
    std::os::unix::fs::symlink(
        stories_dir().canonicalize().unwrap(),
        here.path().join(STORIES),
    )
    .unwrap();
    let empty_home = tempfile::tempdir().unwrap();
    let out = graft_with_hub(&generate, here.path(), &server, empty_home.path(), &[]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(server.requests().is_empty(), "{:?}", server.requests());

    let out = run(
        &["generate", "--model", "nobody/nothing", "--prompt", "x"],
        &[],
    );
    let stderr = common::stderr(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("nobody/nothing: no such model repository"),
        "{stderr}"
    );

    // An alias honours HF_HUB_OFFLINE as a hub id does: from the caches, or a clear refusal
    // (never pip's download).
    let empty_cache = tempfile::tempdir().unwrap();
    let cache_dir = empty_cache.path().to_str().unwrap();
    let out = run(
        &["inspect", "minilm"],
        &[("HF_HUB_OFFLINE", "1"), ("GRAFT_CACHE_DIR", cache_dir)],
    );
    let stderr = common::stderr(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("`minilm` is neither in graft's cache")
            && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );

    // inspect fetches config.json alone; HF_TOKEN opens a gated repository.
    let inspect = ["inspect", "graft-test/gated"];
    let out = run(&inspect, &[]);
    let stderr = common::stderr(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("set HF_TOKEN"), "{stderr}");
    server.clear();
    let out = run(&inspect, &[("HF_TOKEN", "hf_granted")]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("vocab 512"));
    let files: Vec<String> = server
        .paths()
        .into_iter()
        .filter(|p| p.contains("/resolve/"))
        .collect();
    assert!(
        files.iter().all(|p| p.ends_with("/config.json")),
        "{files:?}"
    );
}
