//! `cargo xtask gpu-kit`: one folder that checks and measures graft on a GPU machine that has no
//! Rust, nvcc or network: graft (the release CUDA build, stripped, its large libraries
//! xz-compressed), the LoRA and P-tuning v2 plugins, stories260K, the data rows, the CPU's f32
//! logits computed here, the model shapes, the PyTorch + PEFT reference script, and `run.sh
//! OUT_DIR` (xtask/kit/), which writes report.json and report.md. `--dry-run` packs the CPU
//! debug build with tiny shapes instead and runs run.sh here, with no cargo, rustc or nvcc on
//! PATH: what CI runs.
use crate::bench::{decoder_config, read_json, read_toml};
use crate::{build, build_profile, profile_dir, ptx, root, Backend, Profile};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a GPU machine may receive.
const MAX_KIT_BYTES: u64 = 60 << 20;
/// Files larger than this travel xz-compressed (run.sh unpacks them with python3's lzma).
const COMPRESS_OVER: u64 = 4 << 20;
const PLUGINS: [&str; 2] = ["lora", "p-tuning-v2"];
/// The prompt of every logits comparison (kit.py reads it from kit.json).
const PROMPT: &str = "Once upon a time, there was a little girl named Lily. She";
/// Rows of the abstracts the shape runs train on: enough for the largest batch's steps.
const ABSTRACT_ROWS: usize = 128;

struct Shape {
    key: &'static str,
    file: &'static str,
    name: &'static str,
    /// The dry run's tiny stand-in: fields of the config replaced.
    tiny: &'static [(&'static str, i64)],
}

const SHAPES: [Shape; 3] = [
    Shape {
        key: "scale",
        file: "configs/shapes/chatglm2-6b.json",
        name: "ChatGLM2-6B",
        tiny: &[
            ("hidden_size", 64),
            ("num_layers", 2),
            ("ffn_hidden_size", 128),
            ("num_attention_heads", 4),
            ("kv_channels", 16),
        ],
    },
    Shape {
        key: "side_small",
        file: "configs/shapes/llama-3.2-1b.json",
        name: "Llama-3.2-1B",
        tiny: &[
            ("hidden_size", 64),
            ("num_hidden_layers", 2),
            ("intermediate_size", 128),
            ("num_attention_heads", 4),
            ("num_key_value_heads", 2),
            ("head_dim", 16),
        ],
    },
    Shape {
        key: "side_large",
        file: "configs/shapes/llama-3.1-8b.json",
        name: "Llama-3.1-8B",
        tiny: &[
            ("hidden_size", 128),
            ("num_hidden_layers", 3),
            ("intermediate_size", 256),
            ("num_attention_heads", 8),
            ("num_key_value_heads", 2),
            ("head_dim", 16),
        ],
    },
];

pub fn gpu_kit(out: Option<PathBuf>, dry_run: bool) -> Result<()> {
    let started = Instant::now();
    let kit = root().join(out.unwrap_or_else(|| {
        PathBuf::from(if dry_run {
            "target/gpu-kit-dry-run"
        } else {
            "target/gpu-kit"
        })
    }));
    // The CPU build computes the expected logits in either case.
    build(Backend::Cpu)?;
    let (bin, ptx_lines) = if dry_run {
        (profile_dir(Backend::Cpu, Profile::Dev), Vec::new())
    } else {
        build_profile(Backend::Cuda, Profile::Release)?;
        let bin = profile_dir(Backend::Cuda, Profile::Release);
        let lines = ptx::check(&bin)?;
        (bin, lines)
    };
    fresh_folder(&kit)?;
    pack_binaries(&bin, &kit.join("bin"))?;
    pack_inputs(&kit, dry_run)?;
    expected_logits(&kit)?;
    write_manifest(&kit, dry_run, &ptx_lines)?;
    let size = report_size(&kit)?;
    eprintln!(
        "gpu-kit: {} packed in {:.0} s",
        kit.display(),
        started.elapsed().as_secs_f64()
    );
    if size > MAX_KIT_BYTES {
        bail!(
            "the kit holds {:.1} MiB, over the {} MiB a GPU machine receives",
            mib(size),
            MAX_KIT_BYTES >> 20
        );
    }
    if dry_run {
        run_dry(&kit)?;
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// An empty folder at `kit`: an earlier kit there (it has kit.json) is replaced, anything else
/// is left alone.
fn fresh_folder(kit: &Path) -> Result<()> {
    if kit.exists() {
        let empty = std::fs::read_dir(kit)?.next().is_none();
        if !empty && !kit.join("kit.json").is_file() {
            bail!(
                "{} exists and holds no kit (no kit.json): choose another --out",
                kit.display()
            );
        }
        std::fs::remove_dir_all(kit).with_context(|| format!("removing {}", kit.display()))?;
    }
    std::fs::create_dir_all(kit).with_context(|| format!("creating {}", kit.display()))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

fn run_tool(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

/// graft, graft-peft, the plugins and the toolchain's libstd, stripped; the large ones
/// xz-compressed.
fn pack_binaries(build: &Path, bin: &Path) -> Result<()> {
    let mut files: Vec<PathBuf> = vec![build.join("graft"), build.join("libgraft_peft.so")];
    for plugin in PLUGINS {
        files.push(build.join(format!("libgraft_plugin_{}.so", plugin.replace('-', "_"))));
    }
    files.push(libstd()?);
    std::fs::create_dir_all(bin)?;
    for file in files {
        let name = file.file_name().context("a library path has no name")?;
        let packed = bin.join(name);
        run_tool(
            Command::new("strip")
                .arg("--strip-unneeded")
                .arg("-o")
                .arg(&packed)
                .arg(&file),
        )
        .context("stripping (binutils' strip)")?;
        if std::fs::metadata(&packed)?.len() > COMPRESS_OVER {
            run_tool(Command::new("xz").args(["-6", "-T2"]).arg(&packed))
                .context("compressing (xz-utils' xz)")?;
        }
    }
    Ok(())
}

/// The toolchain's libstd-*.so, which graft and every plugin link.
fn libstd() -> Result<PathBuf> {
    let output = Command::new("rustc")
        .args(["--print", "target-libdir"])
        .current_dir(root())
        .output()
        .context("running rustc --print target-libdir")?;
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("libstd-") && name.ends_with(".so") {
            return Ok(path);
        }
    }
    bail!("no libstd-*.so in {}", dir.display())
}

/// Models, data, configs, shapes and scripts, with every path in a config relative to the kit.
fn pack_inputs(kit: &Path, dry_run: bool) -> Result<()> {
    let shared = root().join("../shared");
    let stories = shared.join("models/stories260K");
    for entry in std::fs::read_dir(&stories)? {
        let path = entry?.path();
        copy(
            &path,
            &kit.join("models/stories260K")
                .join(path.file_name().unwrap_or_default()),
        )?;
    }
    let tokenizer = "models/tokenizer.json";
    copy(
        &shared.join("models/smollm2-135m-instruct/tokenizer.json"),
        &kit.join(tokenizer),
    )?;
    copy(
        &root().join("data/stories.jsonl"),
        &kit.join("data/stories.jsonl"),
    )?;
    write_abstracts(
        &shared.join("data/abstracts/train.csv"),
        &kit.join("data/abstracts.csv"),
    )?;

    let configs = kit.join("configs");
    std::fs::create_dir_all(&configs)?;
    let story = story_recipe();
    // Learning rates measured on this CPU (`--dry-run`, 20 steps in bf16) to bring the loss to
    // about a quarter of the first step's: LoRA 7.17 -> 1.43 at 1e-2; P-tuning v2 9.72 -> 2.07
    // at 5e-2 without its prefix dropout (at 1e-2 with dropout 0.1 it only reached 0.8 of it).
    for (method, lr) in [("lora", 1e-2), ("p-tuning-v2", 5e-2)] {
        let mut config = decoder_config(&story, method, 20)?;
        set(&mut config, "train", "lr", lr.into())?;
        if method == "p-tuning-v2" {
            set(&mut config, "method", "prefix_dropout", 0.0.into())?;
        }
        write_toml(&configs.join(format!("story-{method}.toml")), &config)?;
    }
    for (method, recipe) in [
        ("lora", "configs/lm/shape-step.toml"),
        ("p-tuning-v2", "configs/lm/shape-step-p-tuning-v2.toml"),
    ] {
        let mut config = read_toml(&root().join(recipe))?;
        set(&mut config, "model", "tokenizer", tokenizer.into())?;
        set(&mut config, "data", "train", "data/abstracts.csv".into())?;
        if method == "lora" {
            // The same recipe on a model folder kit.py writes (`graft random-model`), LoRA on
            // q_proj and v_proj as in the PyTorch + PEFT reference.
            let mut side = config.clone();
            set(&mut side, "model", "path", "@MODEL@".into())?;
            set(
                &mut side,
                "method",
                "target_modules",
                toml::Value::Array(vec!["q_proj".into(), "v_proj".into()]),
            )?;
            write_toml(&configs.join("side.toml"), &side)?;
        }
        write_toml(&configs.join(format!("scale-{method}.toml")), &config)?;
    }

    for shape in &SHAPES {
        let mut config = read_json(&root().join(shape.file))?;
        if dry_run {
            for (field, value) in shape.tiny {
                config[*field] = json!(value);
            }
        }
        let path = kit.join("shapes").join(format!("{}.json", shape.key));
        std::fs::create_dir_all(path.parent().context("no parent")?)?;
        std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
    }

    let scripts = root().join("xtask/kit");
    copy(&scripts.join("kit.py"), &kit.join("kit.py"))?;
    copy(&scripts.join("run.sh"), &kit.join("run.sh"))?;
    // The README's command starts it directly: executable whatever mode the checkout gave it.
    let run_sh = kit.join("run.sh");
    std::fs::set_permissions(&run_sh, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", run_sh.display()))?;
    let reference = root().join("benches/reference");
    for script in ["gpu_reference.py", "report.py"] {
        copy(&reference.join(script), &kit.join("reference").join(script))?;
    }
    Ok(())
}

fn set(config: &mut toml::Table, table: &str, key: &str, value: toml::Value) -> Result<()> {
    config
        .get_mut(table)
        .and_then(toml::Value::as_table_mut)
        .with_context(|| format!("the recipe has no [{table}]"))?
        .insert(key.into(), value);
    Ok(())
}

fn write_toml(path: &Path, config: &toml::Table) -> Result<()> {
    std::fs::write(path, toml::to_string(config)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// stories260K's recipe: short story pairs, batch 4, the loss on the responses.
fn story_recipe() -> toml::Table {
    let mut recipe = toml::Table::new();
    let table = |pairs: &[(&str, toml::Value)]| {
        toml::Value::Table(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    };
    recipe.insert(
        "model".into(),
        table(&[
            ("path", "models/stories260K".into()),
            ("template", "plain".into()),
            ("max_len", 32.into()),
        ]),
    );
    recipe.insert(
        "data".into(),
        table(&[("train", "data/stories.jsonl".into())]),
    );
    recipe.insert(
        "train".into(),
        table(&[
            ("seed", 3.into()),
            ("batch_size", 4.into()),
            ("log_every", 1.into()),
            ("checkpoint_every", 0.into()),
        ]),
    );
    recipe
}

/// The first [`ABSTRACT_ROWS`] records of the abstracts CSV.
fn write_abstracts(from: &Path, to: &Path) -> Result<()> {
    let mut reader =
        csv::Reader::from_path(from).with_context(|| format!("reading {}", from.display()))?;
    let mut writer =
        csv::Writer::from_path(to).with_context(|| format!("writing {}", to.display()))?;
    writer.write_record(reader.headers()?)?;
    for record in reader.records().take(ABSTRACT_ROWS) {
        writer.write_record(&record.with_context(|| format!("reading {}", from.display()))?)?;
    }
    writer.flush()?;
    Ok(())
}

/// stories260K's next-token logits in f32 on this CPU, which the GPU's are compared with.
fn expected_logits(kit: &Path) -> Result<()> {
    let out = kit.join("expected/base-cpu-f32.json");
    std::fs::create_dir_all(out.parent().context("no parent")?)?;
    crate::run_graft(
        Backend::Cpu,
        &[
            "logits".into(),
            "--model".into(),
            kit.join("models/stories260K").display().to_string(),
            "--prompt".into(),
            PROMPT.into(),
            "--dtype".into(),
            "f32".into(),
            "--out".into(),
            out.display().to_string(),
        ],
    )
}

fn write_manifest(kit: &Path, dry_run: bool, ptx_lines: &[String]) -> Result<()> {
    let commit = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let shapes: serde_json::Map<String, Value> = SHAPES
        .iter()
        .map(|s| {
            let name = if dry_run {
                format!("tiny {} (dry run)", s.name)
            } else {
                s.name.to_string()
            };
            (
                s.key.to_string(),
                json!({ "file": format!("shapes/{}.json", s.key), "name": name }),
            )
        })
        .collect();
    let manifest = json!({
        "mode": if dry_run { "dry-run" } else { "gpu" },
        "commit": commit,
        "prompt": PROMPT,
        "shapes": shapes,
        "cuda": if dry_run { Value::Null } else { json!({
            "max_ptx_isa": format!("{}.{}", ptx::MAX_PTX_ISA.0, ptx::MAX_PTX_ISA.1),
            "min_driver": ptx::MIN_DRIVER,
            "libraries": ptx_lines,
        }) },
    });
    std::fs::write(
        kit.join("kit.json"),
        serde_json::to_string_pretty(&manifest)?,
    )?;
    Ok(())
}

/// Prints every file's size and the total; returns the total.
fn report_size(kit: &Path) -> Result<u64> {
    let mut files = Vec::new();
    let mut stack = vec![kit.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                files.push((entry.metadata()?.len(), entry.path()));
            }
        }
    }
    files.sort();
    let total: u64 = files.iter().map(|(n, _)| n).sum();
    for (bytes, path) in files.iter().rev().take(8) {
        let name = path.strip_prefix(kit).unwrap_or(path);
        eprintln!("  {:8.2} MiB  {}", mib(*bytes), name.display());
    }
    println!(
        "gpu-kit: {} files, {:.2} MiB ({} bytes)",
        files.len(),
        mib(total),
        total
    );
    Ok(total)
}

/// PATH without the folders that hold cargo, rustc or nvcc.
fn path_without_toolchains() -> Result<std::ffi::OsString> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let kept: Vec<PathBuf> = std::env::split_paths(&path)
        .filter(|dir| {
            !["cargo", "rustc", "nvcc"]
                .iter()
                .any(|tool| dir.join(tool).exists())
        })
        .collect();
    Ok(std::env::join_paths(kept)?)
}

/// The dry run's fault switches (kit.py reads them): training at these batches fails as CUDA's
/// out-of-memory does, so the largest-batch rows (which start at 8 in the dry run) must climb
/// down to 2; and this step fails after it ran, its random weights written.
const FAULT_OOM_BATCHES: [u64; 2] = [8, 4];
const FAULT_FAIL_AFTER: &str = "side-side_large-graft";
/// The kill check stops run.sh once report.json holds this many rows.
const KILL_AFTER_ROWS: usize = 3;
/// What the folder given to run.sh may hold after the dry run: reports and capped logs.
const MAX_OUT_BYTES: u64 = 16 << 20;

/// run.sh started directly (the README's command: it must be executable), as a GPU machine would,
/// with the toolchains off PATH and its scratch folder at `scratch`.
fn kit_command(kit: &Path, out: &Path, scratch: &Path) -> Result<Command> {
    let mut command = Command::new(kit.join("run.sh"));
    command
        .arg(out)
        .env("PATH", path_without_toolchains()?)
        .env("GRAFT_KIT_SCRATCH", scratch)
        // cargo's own variables would tell graft where the CPU build is; a GPU machine has none.
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("CARGO")
        .env_remove("CARGO_MANIFEST_DIR");
    Ok(command)
}

/// An empty folder for a run's output: an earlier one (it has run.log) is replaced, anything
/// else is left alone.
fn fresh_output(dir: &Path) -> Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)?.next().is_none();
        if !empty && !dir.join("run.log").is_file() {
            bail!(
                "{} exists and holds no kit output (no run.log): choose another --out",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

fn folder_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                total += entry.metadata()?.len();
            }
        }
    }
    Ok(total)
}

/// The run folders run.sh left in its scratch root (the JIT cache may stay).
fn scratch_runs_left(scratch: &Path) -> Result<Vec<String>> {
    if !scratch.exists() {
        return Ok(Vec::new());
    }
    let mut left = Vec::new();
    for entry in std::fs::read_dir(scratch)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("run.") {
            left.push(name);
        }
    }
    Ok(left)
}

fn rows(report: &Value) -> Result<&Vec<Value>> {
    report["rows"]
        .as_array()
        .context("the report has no rows array")
}

fn named_rows<'a>(report: &'a Value, prefix: &str) -> Result<Vec<&'a Value>> {
    Ok(rows(report)?
        .iter()
        .filter(|r| r["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .collect())
}

/// The largest-batch rows met the simulated out-of-memory at each faulted batch, halved, and
/// passed at the next one.
fn check_ladder(report: &Value) -> Result<()> {
    let ladder = named_rows(report, "lora, largest batch")?;
    if ladder.len() != 2 {
        bail!("{} largest-batch rows, not 2", ladder.len());
    }
    let ran = FAULT_OOM_BATCHES[FAULT_OOM_BATCHES.len() - 1] / 2;
    for row in ladder {
        let name = &row["name"];
        if row["passed"] != json!(true) {
            bail!("{name}: did not pass: {}", row["error"]);
        }
        if row["out_of_memory_batches"] != json!(FAULT_OOM_BATCHES) {
            bail!(
                "{name}: out of memory at {}, not at the faulted batches {FAULT_OOM_BATCHES:?}: the \
                 ladder did not take the simulated CUDA out-of-memory for one",
                row["out_of_memory_batches"]
            );
        }
        if row["batch"] != json!(ran) {
            bail!("{name}: ran at batch {}, not {ran}", row["batch"]);
        }
    }
    Ok(())
}

/// No row left anything in the scratch folder; the faulted row failed with the fault's reason
/// (after its random weights were written), and every other row passed or was skipped.
fn check_rows(report: &Value) -> Result<()> {
    if report["complete"] != json!(true) {
        bail!("the report is not marked complete");
    }
    let mut faulted = 0;
    for row in rows(report)? {
        let name = &row["name"];
        if row["scratch_left"] != json!([]) {
            bail!(
                "{name}: left {} in the scratch folder (a temporary not removed when the row ended)",
                row["scratch_left"]
            );
        }
        let error = row["error"].as_str().unwrap_or_default();
        if error.contains("GRAFT_KIT_FAULT_FAIL_AFTER") {
            faulted += 1;
            if row["passed"] != json!(false) {
                bail!("{name}: failed by the fault switch yet not marked failed");
            }
        } else if row["passed"] == json!(false) {
            bail!("{name}: failed: {error}");
        }
    }
    if faulted != 1 {
        bail!("{faulted} rows failed by GRAFT_KIT_FAULT_FAIL_AFTER={FAULT_FAIL_AFTER}, not 1");
    }
    Ok(())
}

/// A run killed after `seen` rows: report.json still parses and holds them, marked incomplete.
fn check_killed(report: &Value, seen: usize) -> Result<()> {
    let held = rows(report)?.len();
    if held < seen {
        bail!("the killed run's report holds {held} rows; {seen} had finished");
    }
    if report["complete"] != json!(false) {
        bail!("the killed run's report is marked complete");
    }
    Ok(())
}

/// With no time budget every row but the preflight is skipped, not failed, and the run passes.
fn check_budget_skips(report: &Value) -> Result<()> {
    for row in rows(report)? {
        let name = &row["name"];
        let preflight = row["section"] == json!("preflight");
        if !preflight && (row["passed"] != Value::Null || !row["skipped"].is_string()) {
            bail!("{name}: not marked skipped with the budget spent ({row})");
        }
    }
    if report["passed"] != json!(true) {
        bail!("a run whose rows were skipped is not marked passed");
    }
    Ok(())
}

/// Runs the kit's run.sh as a GPU machine would, with the toolchains off PATH and the fault
/// switches on, and fails unless every check of the result holds; then runs it twice more: killed
/// after KILL_AFTER_ROWS rows, and with no time budget.
fn run_dry(kit: &Path) -> Result<()> {
    let out = kit.with_extension("out");
    let scratch = kit.with_extension("scratch");
    fresh_output(&out)?;
    let oom: Vec<String> = FAULT_OOM_BATCHES.iter().map(u64::to_string).collect();
    let started = Instant::now();
    let status = kit_command(kit, &out, &scratch)?
        .env("GRAFT_KIT_FAULT_OOM_BATCHES", oom.join(","))
        .env("GRAFT_KIT_FAULT_FAIL_AFTER", FAULT_FAIL_AFTER)
        .status()
        .context("running the kit's run.sh")?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "gpu-kit --dry-run: run.sh took {seconds:.0} s ({status}; {FAULT_FAIL_AFTER} fails by design)"
    );
    let report = read_json(&out.join("report.json"))
        .with_context(|| format!("run.sh ({status}) wrote no report"))?;
    let tools = &report["machine"]["tools_on_path"];
    if tools.as_array().is_none_or(|t| !t.is_empty()) {
        bail!("run.sh ran with {tools} on PATH: the dry run must show the kit needs none of them");
    }
    let see = || format!("see {}", out.join("report.md").display());
    check_ladder(&report).with_context(see)?;
    check_rows(&report).with_context(see)?;
    let left = scratch_runs_left(&scratch)?;
    if !left.is_empty() {
        bail!("run.sh left {left:?} in {}", scratch.display());
    }
    let bytes = folder_bytes(&out)?;
    if bytes > MAX_OUT_BYTES {
        bail!(
            "run.sh wrote {:.1} MiB to {}, over {} MiB",
            mib(bytes),
            out.display(),
            MAX_OUT_BYTES >> 20
        );
    }
    println!(
        "{}",
        std::fs::read_to_string(out.join("report.md")).unwrap_or_default()
    );
    run_killed(kit)?;
    run_without_budget(kit)?;
    println!(
        "gpu-kit --dry-run: {:.0} KiB came back in {}; the ladder, the cleanup, the killed \
         run's report and the budget's skips check out",
        bytes as f64 / 1024.0,
        out.display()
    );
    Ok(())
}

/// Kills run.sh's whole process group (SIGKILL: no handler runs, so only the reports written
/// after each row can be there) once report.json holds KILL_AFTER_ROWS rows.
fn run_killed(kit: &Path) -> Result<()> {
    let out = kit.with_extension("killed");
    let scratch = kit.with_extension("killed-scratch");
    fresh_output(&out)?;
    let mut child = kit_command(kit, &out, &scratch)?
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the kit's run.sh")?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let report_path = out.join("report.json");
    let seen = loop {
        // A half-written report fails to parse: the check would then wait for the next one.
        let held = read_json(&report_path)
            .ok()
            .and_then(|r| r["rows"].as_array().map(Vec::len))
            .unwrap_or(0);
        if held >= KILL_AFTER_ROWS {
            break held;
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "run.sh ended ({status}) before report.json held {KILL_AFTER_ROWS} rows: the report \
                 is not written after every row"
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("report.json held {held} rows after 600 s: the report is not written after every row");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    run_tool(Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]))
        .context("killing run.sh's process group")?;
    child.wait()?;
    let report = read_json(&report_path).context("the killed run's report.json")?;
    check_killed(&report, seen)?;
    std::fs::remove_dir_all(&scratch)
        .with_context(|| format!("removing the killed run's {}", scratch.display()))?;
    println!(
        "gpu-kit --dry-run: killed after {seen} rows, report.json held {}",
        rows(&report)?.len()
    );
    Ok(())
}

fn run_without_budget(kit: &Path) -> Result<()> {
    let out = kit.with_extension("no-budget");
    let scratch = kit.with_extension("scratch");
    fresh_output(&out)?;
    let status = kit_command(kit, &out, &scratch)?
        .env("GRAFT_KIT_BUDGET_S", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running the kit's run.sh")?;
    let report = read_json(&out.join("report.json"))
        .with_context(|| format!("run.sh ({status}) with no budget wrote no report"))?;
    check_budget_skips(&report)?;
    if !status.success() {
        bail!("run.sh with every row skipped exited {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ladder_row(name: &str, oom: Value, batch: u64) -> Value {
        json!({"section": "scale", "name": name, "passed": true, "scratch_left": [],
               "out_of_memory_batches": oom, "batch": batch})
    }

    fn report(rows: Vec<Value>, complete: bool) -> Value {
        json!({"rows": rows, "complete": complete, "passed": true})
    }

    fn faulted() -> Value {
        json!({"section": "side by side", "name": "tiny Llama-3.1-8B", "passed": false,
               "scratch_left": [], "error": "step failed (fault injected by GRAFT_KIT_FAULT_FAIL_AFTER)"})
    }

    #[test]
    fn the_ladder_check_wants_both_faulted_batches_then_half_the_last() {
        let good = |oom: Value, batch| {
            report(
                vec![
                    ladder_row("lora, largest batch", json!([8, 4]), 2),
                    ladder_row("lora, largest batch, checkpointing", oom, batch),
                ],
                true,
            )
        };
        check_ladder(&good(json!([8, 4]), 2)).unwrap();
        // Out-of-memory not recognised: the row failed at the first batch, or was not retried.
        assert!(check_ladder(&good(json!([]), 8)).is_err());
        assert!(check_ladder(&good(json!([8]), 4)).is_err());
    }

    #[test]
    fn the_row_check_catches_a_temporary_left_and_an_unexpected_failure() {
        let plain = json!({"name": "a", "section": "scale", "passed": true, "scratch_left": []});
        check_rows(&report(vec![plain.clone(), faulted()], true)).unwrap();
        let mut left = faulted();
        left["scratch_left"] = json!(["side-side_large"]);
        assert!(check_rows(&report(vec![plain.clone(), left], true)).is_err());
        let mut failed = plain.clone();
        failed["passed"] = json!(false);
        assert!(check_rows(&report(vec![failed, faulted()], true)).is_err());
        assert!(check_rows(&report(vec![plain.clone()], true)).is_err());
        assert!(check_rows(&report(vec![plain, faulted()], false)).is_err());
    }

    #[test]
    fn a_killed_report_holds_the_rows_seen_and_is_incomplete() {
        let rows = vec![json!({"name": "a"}), json!({"name": "b"})];
        check_killed(&report(rows.clone(), false), 2).unwrap();
        assert!(check_killed(&report(rows.clone(), false), 3).is_err());
        assert!(check_killed(&report(rows, true), 2).is_err());
    }

    #[test]
    fn rows_past_the_budget_must_be_skipped_not_failed() {
        let preflight = json!({"name": "p", "section": "preflight", "passed": true});
        let skipped = json!({"name": "s", "section": "scale", "passed": null, "skipped": "budget"});
        check_budget_skips(&report(vec![preflight.clone(), skipped], true)).unwrap();
        let failed = json!({"name": "s", "section": "scale", "passed": false, "error": "budget"});
        assert!(check_budget_skips(&report(vec![preflight, failed], true)).is_err());
    }
}
