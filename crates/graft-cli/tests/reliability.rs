//! A rerun is identical, a killed run resumes to the same adapter, a diverging run stops with
//! its step and keeps its last good checkpoint.
use graft_peft::candle::Device;
use graft_trainer::checkpoint;
use std::path::Path;

mod common;
use common::{
    graft, kill_after_checkpoint, resume_refuses_changed_data, resume_to_the_same_adapter, stderr,
    write_classifier_config,
};

fn train(config: &str, out: &Path) -> std::process::Output {
    graft(&["train", "--config", config, "--out", out.to_str().unwrap()])
}

fn adapter_bytes(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn two_runs_with_the_same_seed_write_byte_identical_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_classifier_config(dir.path(), 6, "1e-3", 2, "stop");
    for run in ["a", "b"] {
        let out = train(&config, &dir.path().join(run));
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(
        adapter_bytes(&dir.path().join("a")),
        adapter_bytes(&dir.path().join("b"))
    );
}

#[test]
fn a_run_killed_with_sigkill_resumes_to_the_byte_identical_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 40;
    let config = write_classifier_config(dir.path(), steps, "1e-3", 2, "stop");
    let whole = dir.path().join("whole");
    let out = train(&config, &whole);
    assert!(out.status.success(), "{}", stderr(&out));

    let killed = dir.path().join("killed");
    let reached = kill_after_checkpoint(
        &[
            "train",
            "--config",
            &config,
            "--out",
            killed.to_str().unwrap(),
        ],
        &killed,
        6,
    );
    assert!(reached < steps, "the run finished before it was killed");
    assert!(
        !killed.join("eval.json").exists(),
        "the run finished before it was killed"
    );

    resume_to_the_same_adapter(
        "train",
        &whole,
        &killed,
        "adapter/adapter_model.safetensors",
    );
}

#[test]
fn a_resume_refuses_training_data_that_changed_since_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo.csv");
    let demo =
        std::fs::read_to_string(graft_testkit::workspace_root().join("data/demo.csv")).unwrap();
    std::fs::write(&data, &demo).unwrap();
    let config = write_classifier_config(dir.path(), 40, "1e-3", 2, "stop");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("data/demo.csv", data.to_str().unwrap()),
    )
    .unwrap();
    let run = dir.path().join("run");
    kill_after_checkpoint(
        &["train", "--config", &config, "--out", run.to_str().unwrap()],
        &run,
        2,
    );
    // The header and the first 12 rows; then every row, one title a letter different.
    let shrunk: String = demo.lines().take(13).map(|l| format!("{l}\n")).collect();
    let edited = demo.replacen("Low-dose colchicine", "Low-dose colchicinf", 1);
    assert_ne!(edited, demo);
    resume_refuses_changed_data(
        "train",
        &run,
        &data,
        &[
            (shrunk, "30 training examples were read then and 8 now"),
            (edited, "the same number of examples, with other content"),
        ],
    );
}

#[test]
fn a_diverging_run_stops_with_its_step_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_classifier_config(dir.path(), 20, "1e30", 1, "stop");
    let run = dir.path().join("run");
    let out = train(&config, &run);
    let message = stderr(&out);
    assert!(
        !out.status.success(),
        "a 1e30 learning rate trained: {message}"
    );
    assert!(!message.contains("panicked"), "{message}");
    let step: usize = message
        .split("diverged at step ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no step number in: {message}"));
    let kept = checkpoint::read_latest::<serde_json::Value>(&run, &Device::Cpu)
        .unwrap()
        .expect("a checkpoint from before the divergence");
    assert!(kept.state["done"].as_u64().unwrap() < step as u64);
    for (key, tensor) in &kept.trainable {
        let finite = tensor
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite());
        assert!(finite, "{key} in the kept checkpoint is not finite");
    }

    // Skipping instead: the run finishes and counts the skipped batches.
    let config = write_classifier_config(dir.path(), 6, "1e30", 1, "skip");
    let run = dir.path().join("skip");
    let out = train(&config, &run);
    assert!(out.status.success(), "{}", stderr(&out));
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    assert!(
        !eval["skipped_steps"].as_array().unwrap().is_empty(),
        "{eval}"
    );
}

/// FNV-1a (64 bits) of `bytes`: a fingerprint to pin a file by.
fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The classifier's adapter for a fixed seed (LoRA with dropout, 2 accumulation steps, a
/// mid-run evaluation) is byte for byte what it was before the classifier and causal-LM loops
/// became one (2026-12-07). Float results depend on the product library and the kernels the
/// CPU selects (AVX2 or AVX-512), so the bytes are pinned per path (eval.json's `matmul` and
/// the CPU's kernel family). On a path with no pin the test prints the fingerprint and trains
/// the seed a second time, whose bytes must be the same: it compares something on every CPU.
#[test]
fn the_classifier_adapter_bytes_of_a_seed_are_pinned() {
    // Measured on an AMD EPYC with AVX-512 (2026-12-07), with the loops before the change. The
    // gemm crate's pin of that day is gone: its blocking follows the CPU's cache sizes and the
    // thread count, so another AVX-512 EPYC wrote other bytes at every thread count tried
    // (2026-12-08); that path takes the two-run comparison.
    const PINNED: &[(&str, u64)] = &[(
        "graft's copy, SkylakeX kernels) / SkylakeX",
        0xd1f3_ee7a_cbe7_6fba,
    )];
    let dir = tempfile::tempdir().unwrap();
    let config = write_classifier_config(dir.path(), 6, "1e-3", 2, "stop");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[train]\n", "[train]\ngrad_accum = 2\n");
    std::fs::write(&config, text).unwrap();
    // The adapter's fingerprint of a run in `dir/name`, and the path its products ran on.
    let fingerprint_of_run = |name: &str| {
        let run = dir.path().join(name);
        let out = train(&config, &run);
        assert!(out.status.success(), "{}", stderr(&out));
        let eval: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
        let matmul = format!(
            "{} / {}",
            eval["matmul"].as_str().unwrap_or_default(),
            graft_peft::graft_model::ops::blas_core_for_this_cpu().unwrap_or("no AVX2")
        );
        (fingerprint(&adapter_bytes(&run)), matmul)
    };
    let (found, matmul) = fingerprint_of_run("run");
    eprintln!("adapter fingerprint {found:#018x} on `{matmul}`");
    match PINNED.iter().find(|(path, _)| matmul.contains(path)) {
        Some((_, pinned)) => assert_eq!(found, *pinned, "adapter bytes changed on `{matmul}`"),
        None => {
            eprintln!("no fingerprint pinned for `{matmul}`: comparing with a second run");
            let (again, again_matmul) = fingerprint_of_run("again");
            assert_eq!(again_matmul, matmul);
            assert_eq!(
                again, found,
                "two runs of the same seed wrote different adapters on `{matmul}`"
            );
        }
    }
}
