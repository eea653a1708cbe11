"""The GPU kit's checks and measurements, run by run.sh from the kit's folder:
python3 kit.py OUT_DIR SCRATCH_DIR.

Every row runs even when an earlier one failed. OUT_DIR stays small: report.json and report.md,
rewritten (temp file + rename) after every row, and logs/<step>.log, each command's output cut to
its last LOG_CAP bytes. SCRATCH_DIR holds the large things (training runs, random weights, the
full logs); a row's temporaries are removed however the row ends. kit.json (written by `cargo
xtask gpu-kit`) says whether this is the GPU kit or the dry run and which shapes it carries.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

KIT = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.abspath(sys.argv[1])
SCRATCH = os.path.abspath(sys.argv[2])
MANIFEST = json.load(open(os.path.join(KIT, "kit.json")))
GPU = MANIFEST["mode"] == "gpu"
GRAFT = os.path.join(KIT, "bin", "graft")
PROMPT = MANIFEST["prompt"]

# Largest next-token logit difference accepted, relative to the largest logit. bf16: graft's own
# bf16 check (graft-testkit's BF16_LOGITS_TOLERANCE) allows 0.06 and measured 0.012-0.038 on the
# CPU. f32 on the GPU against f32 on the CPU: summation order only.
LOGITS_TOLERANCE = {"bf16": 0.06, "f32": 2e-3}
# After CORRECTNESS_STEPS steps, the mean of the last three losses must be at most this fraction
# of the first. Measured on the CPU (bf16, `cargo xtask gpu-kit --dry-run`): LoRA 7.17 -> 1.43
# (0.2), P-tuning v2 9.72 -> 2.07 (0.22); at a fifth of its learning rate P-tuning v2 stayed at 0.8.
LOSS_FALLS_TO = 0.5
CORRECTNESS_STEPS = 20
# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, NVIDIA's datasheet figures (their
# "with sparsity" figure halved), as remembered: none could be checked against a datasheet here.
# (a word of nvidia-smi's name, a further word it must hold or None, the card, TFLOP/s); the first
# match wins, so the variants come before their family. Least certain: both NVL figures.
PEAK_BF16_TFLOPS = [
    ("H100", "NVL", "H100 NVL", 835),
    ("H100", "PCIE", "H100 PCIe", 756),
    ("H100", None, "H100 SXM", 989),
    ("H200", "NVL", "H200 NVL", 835),
    ("H200", None, "H200 SXM", 989),
    ("A100", None, "A100", 312),
    ("L40S", None, "L40S", 362),
    ("L4", None, "L4", 121),
    ("A10", None, "A10", 125),
]
# The GPU run: 8 minutes in all on an H100; rows that would start later are skipped.
# GRAFT_KIT_BUDGET_S overrides it (the dry run checks the skipping with 0).
_BUDGET = os.environ.get("GRAFT_KIT_BUDGET_S", "")
BUDGET_S = float(_BUDGET) if re.fullmatch(r"\d+(\.\d+)?", _BUDGET) else (450 if GPU else 1800)
SEQ = 512
METHODS = ("lora", "p-tuning-v2")
SCALE_STEPS = 3 if GPU else 2
SIDE_STEPS = 6 if GPU else 2
# The largest-batch rows try the largest of these that graft inspect fits in 85% of the GPU, and
# halve it on out-of-memory down to 1. The dry run starts at 8 (its faults make 8 and 4 fail).
SCALE_BATCHES = [16, 8, 4, 2] if GPU else [8]
# What a failed step's log says when the device ran out of memory: cudarc's DriverError through
# candle (`DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")`), cuBLAS's workspace, torch.
OUT_OF_MEMORY = re.compile(r"CUDA_ERROR_OUT_OF_MEMORY|CUBLAS_STATUS_ALLOC_FAILED|out of memory", re.IGNORECASE)
# Each log copied to OUT_DIR keeps its last LOG_CAP bytes: a row that writes GBs of output
# must not fill the folder that comes back.
LOG_CAP = 1 << 20


def _batches(text):
    return sorted({int(b) for b in text.split(",") if b.strip().isdigit()}, reverse=True)


# Fault switches, for the dry run (xtask sets them): training at these batch sizes fails as CUDA's
# out-of-memory does, and this step fails after it ran (its temporaries written).
FAULT_OOM_BATCHES = _batches(os.environ.get("GRAFT_KIT_FAULT_OOM_BATCHES", ""))
FAULT_FAIL_AFTER = os.environ.get("GRAFT_KIT_FAULT_FAIL_AFTER", "")
SIMULATED_OOM = 'Error: DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory") (simulated: GRAFT_KIT_FAULT_OOM_BATCHES)'

START = time.monotonic()
ROWS = []


def elapsed():
    return time.monotonic() - START


def log(message):
    print(f"[{elapsed():6.1f} s] {message}", flush=True)


class StepFailed(Exception):
    def __init__(self, message, out_of_memory=False):
        super().__init__(message)
        self.out_of_memory = out_of_memory


class Skipped(Exception):
    """The time budget is spent: the row is reported skipped, not failed."""


class GpuMemory:
    """Peak memory.used of GPU 0 (MiB, the whole GPU) while a step runs, sampled by nvidia-smi."""

    def __init__(self):
        self.peak = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        if GPU:
            self.thread.start()

    def sample(self):
        while not self.stop.is_set():
            used = nvidia_smi("memory.used")
            if used and used[0].isdigit():
                self.peak = max(self.peak or 0, int(used[0]))
            time.sleep(0.1)

    def finish(self):
        self.stop.set()
        if GPU:
            self.thread.join()
        return self.peak


def nvidia_smi(*fields):
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [f.strip() for f in out.stdout.strip().split(",")]


def budget_left():
    remaining = BUDGET_S - elapsed()
    if remaining <= 0:
        raise Skipped(f"the {BUDGET_S:.0f} s budget was spent before it started")
    return remaining


def read_tail(path, limit):
    """The last `limit` bytes of a file, and how many bytes came before them."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - limit, 0))
        return f.read(), max(size - limit, 0)


def publish_log(step):
    """Copies logs/<step>.log from the scratch folder to OUT_DIR, cut to its last LOG_CAP bytes."""
    tail, cut = read_tail(os.path.join(SCRATCH, "logs", f"{step}.log"), LOG_CAP)
    with open(os.path.join(OUT, "logs", f"{step}.log"), "wb") as f:
        if cut:
            f.write(f"[graft kit: the first {cut} bytes of this log were cut; its last {LOG_CAP} follow]\n".encode())
        f.write(tail)


def run(step, argv, env=None, timeout=None, simulate_oom=False):
    """Runs one command with its output in logs/<step>.log; returns (seconds, peak GPU MiB).
    simulate_oom: a command that fails as CUDA's out-of-memory does runs instead (a fault switch)."""
    remaining = budget_left()
    if simulate_oom:
        argv = [sys.executable, "-c", "import sys; sys.exit(sys.argv[1])", SIMULATED_OOM]
    path = os.path.join(SCRATCH, "logs", f"{step}.log")
    log(f"{step}: {' '.join(argv)}")
    memory = GpuMemory()
    started = time.monotonic()
    try:
        with open(path, "w") as out:
            try:
                code = subprocess.run(
                    argv, stdout=out, stderr=subprocess.STDOUT, cwd=KIT,
                    env={**os.environ, **(env or {})}, timeout=min(timeout or remaining, remaining) + 30,
                ).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            except OSError as e:
                code = f"not started: {e}"
    finally:
        memory.finish()
        publish_log(step)
    seconds = time.monotonic() - started
    if code == 0 and step == FAULT_FAIL_AFTER:
        code = "fault injected by GRAFT_KIT_FAULT_FAIL_AFTER"
    if code != 0:
        tail = read_tail(path, 64 << 10)[0].decode(errors="replace")
        last = tail.strip().splitlines()[-3:]
        raise StepFailed(f"step '{step}' failed ({code}); logs/{step}.log ends: {' | '.join(last)}",
                         out_of_memory=bool(OUT_OF_MEMORY.search(tail)))
    return seconds, memory.peak


def graft(step, *args, env=None, simulate_oom=False):
    return run(step, [GRAFT, *args], env=env, simulate_oom=simulate_oom)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def logits_difference(a_path, b_path):
    a, b = read_json(a_path)["logits"], read_json(b_path)["logits"]
    if len(a) != len(b) or not b:
        raise StepFailed(f"{len(a)} logits against {len(b)}")
    scale = max(abs(y) for y in b) or 1e-12
    return max(abs(x - y) for x, y in zip(a, b)) / scale


@contextlib.contextmanager
def temporary(name):
    """A folder path in the scratch folder for one row's large files, removed however the row ends
    (a failure, a KeyboardInterrupt, or SIGTERM, which main() turns into SystemExit)."""
    path = os.path.join(SCRATCH, name)
    shutil.rmtree(path, ignore_errors=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def scratch_left():
    """What a row left in the scratch folder besides the logs: should be nothing."""
    return sorted(n for n in os.listdir(SCRATCH) if n != "logs")


def row(section, name, body, always=False):
    """Runs body() -> dict of results; a row passes unless body raises or sets passed False. A row
    that starts after the budget is spent is skipped (always: it runs anyway). The report is
    rewritten after every row."""
    log(f"== {section}: {name}")
    entry = {"section": section, "name": name}
    try:
        if not always:
            budget_left()
        entry.update(body())
        entry.setdefault("passed", True)
    except Skipped as e:
        entry.update(passed=None, skipped=str(e))
        log(f"skipped: {e}")
    except StepFailed as e:
        entry.update(passed=False, error=str(e))
        log(f"FAILED: {e}")
    except Exception as e:  # a bug or an unreadable file: the row fails, the run goes on
        entry.update(passed=False, error=f"{type(e).__name__}: {e}")
        log(f"FAILED: {type(e).__name__}: {e}")
    left = scratch_left()
    entry["scratch_left"] = left
    if left:
        entry["passed"] = False
        entry["error"] = (entry.get("error", "") + f"; left in the scratch folder: {', '.join(left)}").lstrip("; ")
        for leftover in left:
            path = os.path.join(SCRATCH, leftover)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    ROWS.append(entry)
    write_report(complete=False)


def train_summary(run_dir):
    summary = read_json(os.path.join(run_dir, "train.json"))
    losses = summary.get("losses") or []
    steps = max(len(losses), 1)
    per_step = summary["tokens"] / steps
    median = summary.get("step_seconds_median")
    return {
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "tokens_per_step": per_step,
        "step_seconds_median": median,
        # The median step's rate: the first steps include the kernels' first compilation.
        "tokens_per_s": per_step / median if median else None,
        "peak_rss_mb": summary.get("peak_rss_mb"),
    }


def plugins_load():
    graft("plugins", "plugins")
    listed = open(os.path.join(SCRATCH, "logs", "plugins.log")).read().splitlines()
    features = "features cuda;" if GPU else "features cpu;"
    missing = [m for m in METHODS if not any(line.startswith(m + " ") for line in listed)]
    matching = sum(features in line for line in listed)
    problems = [f"not loaded: {', '.join(missing)}"] if missing else []
    if matching != len(METHODS):
        problems.append(f"{matching} of {len(METHODS)} plugins report `{features}`")
    return {"passed": not problems, "error": "; ".join(problems)}


# ---- the preflight ---------------------------------------------------------------------------

# What the preflight found: the GPU's peak for MFU, and the report's machine section.
PEAK = {"card": None, "tflops": None, "why_unknown": "the preflight did not run"}
MACHINE = {"gpu": None, "driver": None, "gpu_memory_mib": None}

TORCH_PROBE = """
import json
found, absent = {}, {}
for name in ("torch", "transformers", "peft"):
    try:
        found[name] = __import__(name).__version__
    except Exception as e:
        absent[name] = f"{type(e).__name__}: {e}"
if "torch" in found:
    import torch
    found["torch_cuda"] = torch.version.cuda
    found["torch_cuda_available"] = torch.cuda.is_available()
print(json.dumps({"found": found, "absent": absent}))
"""


class Absent(Exception):
    """A probe whose tool or library this machine lacks: recorded, never a failure."""


def peak_bf16(gpu_name):
    """(card, dense bf16 TFLOP/s) for nvidia-smi's name, or None. Words, not substrings: "A10" must
    not match an A100, nor "L4" an L40S."""
    words = re.split(r"[\s_-]+", gpu_name.upper())
    for family, variant, card, tflops in PEAK_BF16_TFLOPS:
        if family in words and (variant is None or variant in words):
            return card, tflops
    return None


def ldd(path):
    """`ldd -r`: the libraries it cannot find and the symbols (or symbol versions) left unresolved."""
    if not shutil.which("ldd"):
        raise Absent("no ldd on PATH")
    done = subprocess.run(["ldd", "-r", path], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return {
        "missing_libraries": [line.split("=>")[0].strip() for line in lines if "=> not found" in line],
        "undefined_symbols": [m.group(1) for m in (re.search(r"undefined symbol: (\S+)", line) for line in lines) if m],
        "missing_versions": [line.strip() for line in lines if re.search(r"version `[^']+' not found", line)],
    }


def gpu_query():
    if not shutil.which("nvidia-smi"):
        raise Absent("no nvidia-smi on PATH")
    fields = ("name", "driver_version", "memory.total", "memory.free")
    values = nvidia_smi(*fields)
    if not values or len(values) != len(fields):
        raise Absent("nvidia-smi answered nothing for GPU 0")
    return dict(zip(fields, values))


def driver_cuda():
    """The CUDA version the driver supports: only nvidia-smi's banner states it."""
    if not shutil.which("nvidia-smi"):
        raise Absent("no nvidia-smi on PATH")
    done = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
    found = re.search(r"CUDA Version:\s*([\d.]+)", done.stdout)
    if not found:
        raise Absent("nvidia-smi's banner states no CUDA version")
    return found.group(1)


def jit_cache():
    path = os.environ.get("CUDA_CACHE_PATH")
    if not path:
        raise Absent("CUDA_CACHE_PATH is not set: the driver's default cache")
    return {"path": path, "writable": os.access(path, os.W_OK), "max_bytes": os.environ.get("CUDA_CACHE_MAXSIZE")}


def preflight():
    """What this machine is, before anything runs. A probe that is missing is recorded as absent;
    the row fails only when graft's own files do not link (they would fail every other row)."""
    found, absent = {}, {}

    def probe(name, fn):
        try:
            found[name] = fn()
        except Absent as e:
            absent[name] = str(e)
        except Exception as e:  # a probe that breaks is as good as absent: the run goes on
            absent[name] = f"{type(e).__name__}: {e}"

    binaries = ["graft"] + sorted(f for f in os.listdir(os.path.join(KIT, "bin")) if f.endswith(".so"))
    for name in binaries:
        probe(f"ldd {name}", lambda name=name: ldd(os.path.join(KIT, "bin", name)))
    probe("glibc", lambda: os.confstr("CS_GNU_LIBC_VERSION"))
    probe("gpu", gpu_query)
    probe("driver_cuda", driver_cuda)
    probe("python", lambda: sys.version.split()[0])

    def python_packages():
        done = subprocess.run([sys.executable, "-c", TORCH_PROBE], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise Absent(f"the probe failed: {done.stderr.strip()[-300:]}")
        return json.loads(done.stdout)
    probe("python_packages", python_packages)
    packages = found.pop("python_packages", {"found": {}, "absent": {}})
    found.update(packages["found"])
    absent.update(packages["absent"])
    probe("cuda_jit_cache", jit_cache)
    probe("scratch_free_gib", lambda: round(shutil.disk_usage(SCRATCH).free / 2**30, 1))
    found["scratch"] = SCRATCH
    found["rust_backtrace"] = os.environ.get("RUST_BACKTRACE")

    gpu = found.get("gpu", {})
    MACHINE.update(gpu=gpu.get("name"), driver=gpu.get("driver_version"),
                   gpu_memory_mib=int(gpu["memory.total"]) if gpu.get("memory.total", "").isdigit() else None)
    peak = peak_bf16(MACHINE["gpu"]) if MACHINE["gpu"] else None
    if peak:
        PEAK.update(card=peak[0], tflops=peak[1], why_unknown=None)
    else:
        PEAK.update(why_unknown=f"{MACHINE['gpu']} is not in the kit's table of peaks" if MACHINE["gpu"]
                    else "no GPU found (nvidia-smi)")
    found["peak_bf16_tflops"] = PEAK["tflops"]
    if GPU and not MACHINE["gpu"]:
        log("nvidia-smi answers nothing: the GPU rows will fail")

    problems = []
    for name in binaries:
        linkage = found.get(f"ldd {name}", {})
        for kind, items in linkage.items():
            if items:
                problems.append(f"{name}: {kind.replace('_', ' ')}: {', '.join(items[:20])}")
    return {"found": found, "absent": absent, "passed": not problems, "error": "; ".join(problems)}


# ---- (a) correctness -------------------------------------------------------------------------


def base_logits(dtype):
    def body():
        with temporary(f"base-{dtype}") as work:
            os.makedirs(work)
            out = os.path.join(work, "logits.json")
            graft(f"base-logits-{dtype}", "logits", "--model", "models/stories260K", "--prompt", PROMPT,
                  "--dtype", dtype, "--out", out)
            difference = logits_difference(out, os.path.join(KIT, "expected", "base-cpu-f32.json"))
            device = read_json(out)["device"]
        return {
            "device": device,
            "logits_difference": difference,
            "tolerance": LOGITS_TOLERANCE[dtype],
            "passed": difference <= LOGITS_TOLERANCE[dtype],
        }
    return body


def trained_adapter(method):
    def body():
        with temporary(f"story-{method}") as run_dir:
            return train_and_compare(run_dir)

    def train_and_compare(run_dir):
        graft(f"train-{method}", "train-lm", "--config", f"configs/story-{method}.toml", "--dtype", "bf16",
              "--max-steps", str(CORRECTNESS_STEPS), "--out", run_dir)
        result = train_summary(run_dir)
        losses = result["losses"]
        falls = len(losses) >= 3 and statistics.mean(losses[-3:]) <= LOSS_FALLS_TO * losses[0]
        narrow, wide = os.path.join(run_dir, "logits-device-bf16.json"), os.path.join(run_dir, "logits-cpu-f32.json")
        graft(f"logits-{method}-device-bf16", "logits", "--adapter", run_dir, "--prompt", PROMPT,
              "--dtype", "bf16", "--out", narrow)
        graft(f"logits-{method}-cpu-f32", "logits", "--adapter", run_dir, "--prompt", PROMPT,
              "--dtype", "f32", "--out", wide, env={"GRAFT_DEVICE": "cpu"})
        difference = logits_difference(narrow, wide)
        result.update(
            loss_falls=falls,
            logits_difference=difference,
            tolerance=LOGITS_TOLERANCE["bf16"],
            passed=falls and difference <= LOGITS_TOLERANCE["bf16"],
        )
        return result
    return body


# ---- (b) scale and (c) side by side ----------------------------------------------------------


def inspect(shape, batch, checkpointing=False, prefix=None):
    args = ["inspect", shape, "--batch", str(batch), "--seq-len", str(SEQ), "--dtype", "bf16", "--json"]
    if checkpointing:
        args.append("--checkpointing")
    if prefix:
        args += ["--prefix", str(prefix)]
    if GPU:
        args += ["--device", "cuda"]
    done = subprocess.run([GRAFT, *args], capture_output=True, text=True, cwd=KIT)
    if done.returncode != 0:
        raise StepFailed(f"graft {' '.join(args)} failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout)


def flops_per_token(report, shape_path, span):
    """Model FLOPs per trained token with a frozen base: forward 2N, the inputs' gradients 2N
    (no weight gradients but the adapters'), and attention's two products of 2*span*hidden per
    layer forward and twice that backward: 4N + 12 * layers * span * hidden. N counts the
    weights of the products: every parameter but an untied input embedding."""
    config = read_json(os.path.join(KIT, shape_path))
    n = report["params"]
    if not config.get("tie_word_embeddings", False):
        n -= report["vocab_size"] * report["hidden_size"]
    return 4 * n + 12 * report["layers"] * span * report["hidden_size"]


def gpu_total_mib():
    total = nvidia_smi("memory.total")
    return int(total[0]) if total and total[0].isdigit() else None


def train_shape(step, config, shape, batch, checkpointing, prefix):
    """Trains on a --random-init shape; returns the run's summary, nvidia-smi's peak and inspect's report."""
    with temporary(step) as run_dir:
        args = ["train-lm", "--config", config, "--random-init", shape, "--dtype", "bf16",
                "--max-steps", str(SCALE_STEPS), "--batch-size", str(batch), "--out", run_dir]
        if checkpointing:
            args.append("--checkpointing")
        _, peak = graft(step, *args, simulate_oom=batch in FAULT_OOM_BATCHES)
        result = train_summary(run_dir)
    result.pop("losses")
    return result, peak, inspect(shape, batch, checkpointing, prefix)


def scale_run(method, batch, checkpointing):
    shape = MANIFEST["shapes"]["scale"]["file"]
    prefix = 128 if method == "p-tuning-v2" else None
    step = f"scale-{method}-b{batch}{'-ckpt' if checkpointing else ''}"
    result, peak, estimate = train_shape(step, f"configs/scale-{method}.toml", shape, batch, checkpointing, prefix)
    flops = flops_per_token(estimate, shape, SEQ + (prefix or 0))
    tps = result["tokens_per_s"]
    result.update(
        batch=batch,
        checkpointing=checkpointing,
        peak_gpu_mib_nvidia_smi=peak,
        inspect_estimate_mib=estimate["memory"]["total"] / 2**20,
        flops_per_token=flops,
        mfu=tps * flops / PEAK["tflops"] / 1e12 if tps and PEAK["tflops"] else None,
    )
    if result["mfu"] is None:
        result["mfu_not_stated"] = PEAK["why_unknown"] or "no tokens/s"
    return result


def scale_row(method, batch, checkpointing):
    return lambda: scale_run(method, batch, checkpointing)


def largest_batch(checkpointing):
    """The largest of SCALE_BATCHES whose step graft inspect puts within 85% of the GPU."""
    total = gpu_total_mib()
    for batch in SCALE_BATCHES:
        estimate = inspect(MANIFEST["shapes"]["scale"]["file"], batch, checkpointing)["memory"]["total"] / 2**20
        if total is None or estimate <= 0.85 * total:
            return batch
    return SCALE_BATCHES[-1]


def ladder_row(checkpointing):
    """LoRA at the largest batch that runs: inspect's pick first, halved on out-of-memory."""
    def body():
        start = batch = largest_batch(checkpointing)
        out_of_memory = []
        while True:
            try:
                result = scale_run("lora", batch, checkpointing)
                break
            except StepFailed as e:
                if not e.out_of_memory:
                    raise
                out_of_memory.append(batch)
                if batch == 1:
                    raise StepFailed(f"out of memory at every batch of {out_of_memory}: {e}") from e
                log(f"batch {batch} ran out of memory; trying {batch // 2}")
                batch //= 2
        result.update(ladder_start=start, out_of_memory_batches=out_of_memory)
        return result
    return body


def reference_available():
    done = subprocess.run([sys.executable, "-c", "import torch, peft, transformers"], capture_output=True)
    return done.returncode == 0


def side_row(key):
    shape = MANIFEST["shapes"][key]

    def body():
        # The 8B's weights are 16 GB: removed however the row ends.
        with temporary(f"side-{key}") as work:
            return side_by_side(work)

    def side_by_side(work):
        model, run_dir = os.path.join(work, "model"), os.path.join(work, "run")
        graft(f"side-{key}-weights", "random-model", "--shape", shape["file"], "--seed", "42", "--dtype", "bf16",
              "--out", model)
        config = os.path.join(work, "side.toml")
        with open(os.path.join(KIT, "configs", "side.toml")) as f:
            text = f.read().replace("@MODEL@", model)
        with open(config, "w") as f:
            f.write(text)
        _, graft_peak = graft(f"side-{key}-graft", "train-lm", "--config", config, "--dtype", "bf16",
                              "--max-steps", str(SIDE_STEPS), "--out", run_dir)
        ours = train_summary(run_dir)
        ours.pop("losses")
        result = {"graft": {**ours, "peak_gpu_mib_nvidia_smi": graft_peak}}
        if not reference_available():
            result["reference"] = {"skipped": "python3 cannot import torch, peft and transformers"}
            return result
        ref_out = os.path.join(work, "reference.json")
        _, ref_peak = run(f"side-{key}-reference", [
            sys.executable, os.path.join(KIT, "reference", "gpu_reference.py"), "--model", model,
            "--tokenizer", "models/tokenizer.json", "--data", "data/abstracts.csv",
            "--graft-run", os.path.join(run_dir, "train.json"), "--max-len", str(SEQ), "--out", ref_out,
        ])
        reference = read_json(ref_out)
        reference["peak_gpu_mib_nvidia_smi"] = ref_peak
        result["reference"] = reference
        if ours["tokens_per_s"] and reference.get("tokens_per_s"):
            result["tokens_per_s_ratio"] = ours["tokens_per_s"] / reference["tokens_per_s"]
        if graft_peak and ref_peak:
            result["peak_memory_ratio"] = graft_peak / ref_peak
        return result
    return body


# ---- the report --------------------------------------------------------------------------------


def cell(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{min(digits, 1)}f}"
    return str(value)


def status(entry):
    return {True: "pass", False: "FAIL", None: "skipped"}[entry["passed"]]


def note(entry):
    """A row's reason: its error, why it was skipped, and the batches that ran out of memory."""
    parts = [entry.get("error") or entry.get("skipped") or ""]
    if entry.get("out_of_memory_batches"):
        parts.append(f"out of memory at batch {', '.join(map(str, entry['out_of_memory_batches']))}")
    # A log's tail may hold the table's own separator.
    return "; ".join(p for p in parts if p).replace("|", "\\|")


def markdown(report):
    machine = report["machine"]
    if not report["complete"]:
        result = f"incomplete ({len(report['rows'])} rows so far)"
    else:
        result = "pass" if report["passed"] else "FAIL"
    peak = machine["peak_bf16"]
    against = (f"against the {peak['card']}'s dense bf16 peak, {peak['tflops']} TFLOP/s" if peak["tflops"]
               else f"not stated: {peak['why_unknown']}")
    lines = [
        f"# graft GPU kit ({MANIFEST['mode']})",
        "",
        f"{machine['gpu'] or 'no GPU'}, driver {machine['driver'] or '-'}; kit built from {MANIFEST['commit']}, "
        f"{report['elapsed_s']:.0f} s. Result: **{result}**. Each step's log (its last {LOG_CAP >> 20} MiB): logs/.",
        "",
        "## Preflight",
        "",
    ]
    for r in (r for r in report["rows"] if r["section"] == "preflight"):
        lines.append(f"{status(r)}{': ' + note(r) if note(r) else ''}")
        lines.append("")
        for key, value in r.get("found", {}).items():
            lines.append(f"- {key}: {json.dumps(value)}")
        for key, reason in r.get("absent", {}).items():
            lines.append(f"- {key}: absent ({reason})")
    lines += [
        "",
        "## Correctness",
        f"Next-token logits against the CPU's in f32 (max difference / max logit); training {CORRECTNESS_STEPS} "
        f"steps in bf16 on stories260K, the loss's last three steps' mean at most {LOSS_FALLS_TO} of the first.",
        "",
        "| row | result | loss, first | loss, last | logits difference | tolerance | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in (r for r in report["rows"] if r["section"] in ("environment", "correctness")):
        lines.append(f"| {r['name']} | {status(r)} | {cell(r.get('first_loss'))} | {cell(r.get('last_loss'))} | "
                     f"{cell(r.get('logits_difference'))} | {cell(r.get('tolerance'))} | {note(r)} |")
    scale = MANIFEST["shapes"]["scale"]["name"]
    lines += [
        "",
        f"## Scale: {scale}, bf16, {SEQ} tokens a row, {SCALE_STEPS} steps",
        "Tokens/s of the median step; MFU from 4N + 12·layers·span·hidden FLOPs a token (N: the products' "
        f"weights) {against}. Peak: nvidia-smi's memory.used of the whole GPU, sampled every 0.1 s. The "
        "largest batch: graft inspect's pick, halved on out-of-memory.",
        "",
        "| row | result | batch | checkpointing | tokens/s | MFU | peak GPU (MiB) | inspect (MiB) | note |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in (r for r in report["rows"] if r["section"] == "scale"):
        lines.append(f"| {r['name']} | {status(r)} | {cell(r.get('batch'))} | {cell(r.get('checkpointing'))} | "
                     f"{cell(r.get('tokens_per_s'))} | {cell(r.get('mfu'))} | {cell(r.get('peak_gpu_mib_nvidia_smi'))} | "
                     f"{cell(r.get('inspect_estimate_mib'))} | {note(r)} |")
    lines += [
        "",
        f"## Side by side: graft against PyTorch + PEFT, LoRA r8 on q_proj and v_proj, bf16, {SIDE_STEPS} steps",
        "The same random weights (written by graft, seed 42) and data rows; peak: nvidia-smi (and torch's "
        "max_memory_allocated for the reference).",
        "",
        "| shape | result | graft tokens/s | reference tokens/s | ratio | graft peak (MiB) | reference peak (MiB) | "
        "reference allocated (MiB) | ratio | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in (r for r in report["rows"] if r["section"] == "side by side"):
        g, ref = r.get("graft", {}), r.get("reference", {})
        lines.append(f"| {r['name']} | {status(r)} | {cell(g.get('tokens_per_s'))} | {cell(ref.get('tokens_per_s'))} | "
                     f"{cell(r.get('tokens_per_s_ratio'))} | {cell(g.get('peak_gpu_mib_nvidia_smi'))} | "
                     f"{cell(ref.get('peak_gpu_mib_nvidia_smi'))} | {cell(ref.get('peak_allocated_mib'))} | "
                     f"{cell(r.get('peak_memory_ratio'))} | {note(r) or ref.get('skipped', '')} |")
    return "\n".join(lines) + "\n"


def write_atomically(name, text):
    """A reader (or a kill) sees the old file or the new one, never half of one."""
    path = os.path.join(OUT, name)
    with open(path + ".part", "w") as f:
        f.write(text)
    os.replace(path + ".part", path)


def write_report(complete):
    report = {
        "kit": MANIFEST,
        "machine": {**MACHINE, "peak_bf16": PEAK,
                    "tools_on_path": [t for t in ("cargo", "rustc", "nvcc") if shutil.which(t)]},
        "faults": {"oom_batches": FAULT_OOM_BATCHES, "fail_after": FAULT_FAIL_AFTER or None},
        "budget_s": BUDGET_S,
        "elapsed_s": elapsed(),
        "complete": complete,
        "rows": ROWS,
        "passed": all(r["passed"] is not False for r in ROWS),
    }
    write_atomically("report.json", json.dumps(report, indent=2))
    try:
        text = markdown(report)
    except Exception as e:  # a bug here must not lose report.json or stop the rows
        text = f"# graft GPU kit\n\nreport.md could not be written ({type(e).__name__}: {e}); see report.json.\n"
    write_atomically("report.md", text)
    return report


def run_rows():
    row("preflight", "the machine, graft's linkage, versions", preflight, always=True)
    row("environment", "graft loads both plugins with this build's features", plugins_load)
    for dtype in ("f32", "bf16"):
        row("correctness", f"base model logits, {dtype} on the device", base_logits(dtype))
    for method in METHODS:
        row("correctness", f"{method}: trains, logits bf16 on the device", trained_adapter(method))
    for checkpointing in (False, True):
        row("scale", f"lora, batch 1{', checkpointing' if checkpointing else ''}", scale_row("lora", 1, checkpointing))
    row("scale", "p-tuning-v2 (pre_seq_len 128), batch 1", scale_row("p-tuning-v2", 1, False))
    # Side by side before the largest batches: the 8B row must not get only what they leave.
    for key in ("side_small", "side_large"):
        row("side by side", MANIFEST["shapes"][key]["name"], side_row(key))
    for checkpointing in (False, True):
        row("scale", f"lora, largest batch{', checkpointing' if checkpointing else ''}", ladder_row(checkpointing))


def main():
    os.makedirs(os.path.join(OUT, "logs"), exist_ok=True)
    os.makedirs(os.path.join(SCRATCH, "logs"), exist_ok=True)
    # SIGTERM (a scheduler's kill; run.sh passes Ctrl-C on as one) unwinds like an exception: the
    # rows' temporaries go in their finally blocks and the report is written as incomplete.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    complete = False
    try:
        run_rows()
        complete = True
    finally:
        report = write_report(complete)
    failed = [r["name"] for r in report["rows"] if r["passed"] is False]
    log(f"report: {os.path.join(OUT, 'report.md')}; " + (f"FAILED rows: {', '.join(failed)}" if failed else "every row passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
