#!/usr/bin/env bash
# The GPU kit's one command: ./run.sh OUT_DIR. Needs python3 and, on a GPU machine, the NVIDIA
# driver and CUDA 13's libraries (PyTorch's cu130 wheels, nvidia/*/lib, or a toolkit's lib64).
# Calls no cargo, rustc, nvcc, pip or network. Writes OUT_DIR/report.json and report.md (rewritten
# after every row), run.log and logs/<step>.log (each cut to its last 1 MiB): OUT_DIR stays small.
# The large things (training runs, the side-by-side rows' random weights: 16 GB for Llama-3.1-8B,
# the full logs) go to a scratch folder, removed at exit: in $GRAFT_KIT_SCRATCH if set, else the
# kit's own folder (scratch/), else ${TMPDIR:-/tmp}/graft-kit.
set -uo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
kit=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1" || exit 1
out=$(cd "$1" && pwd)
log="$out/run.log"
: >"$log"
say() { echo "$*" | tee -a "$log" >&2; }

command -v python3 >/dev/null || { say "run.sh: step 'python3': not found"; exit 1; }
for tool in cargo rustc nvcc; do
  if command -v "$tool" >/dev/null; then
    say "note: $tool is on PATH ($(command -v "$tool")); the kit never calls it"
  fi
done

# The large files (libraries, and graft itself when it pays) travel xz-compressed: unpack
# once, beside them, executable (lzma keeps no mode).
for packed in "$kit"/bin/*.xz; do
  [ -e "$packed" ] || continue
  lib=${packed%.xz}
  [ -e "$lib" ] && continue
  say "unpacking $(basename "$packed")"
  python3 -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)' "$packed" "$lib" \
    && chmod 755 "$lib.part" && mv "$lib.part" "$lib" \
    || { say "run.sh: step 'unpack $(basename "$packed")' failed"; exit 1; }
done

scratch_root=${GRAFT_KIT_SCRATCH:-$kit/scratch}
if ! mkdir -p "$scratch_root" 2>/dev/null || [ ! -w "$scratch_root" ]; then
  scratch_root=${TMPDIR:-/tmp}/graft-kit
  mkdir -p "$scratch_root" || { say "run.sh: step 'scratch folder' failed"; exit 1; }
fi
scratch=$(mktemp -d "$scratch_root/run.XXXXXX") || { say "run.sh: step 'scratch folder' failed"; exit 1; }
trap 'rm -rf "$scratch"' EXIT
say "scratch folder: $scratch"

# candle's kernels are PTX that the driver compiles at a process's first use of each; ~15 graft
# processes would each compile them again without a writable cache. It lives beside the runs'
# scratch folders, so a second run reuses it; 4 GiB (the driver's most) so nothing is evicted.
export CUDA_CACHE_PATH="$scratch_root/cuda-cache" CUDA_CACHE_MAXSIZE=4294967296
mkdir -p "$CUDA_CACHE_PATH"
# A panic in graft names where it happened.
export RUST_BACKTRACE=1

# CUDA 13's libraries: from the Python packages' nvidia/*/lib folders (PyTorch's cu130 wheels),
# else a toolkit's lib64. The driver's libcuda.so.1 is the system's.
cuda_libs=$(python3 - <<'EOF'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = [d for r in roots for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib")))]
home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
dirs += [d for d in (os.path.join(home, "lib64"),) if os.path.isdir(d)]
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="$kit/bin${cuda_libs:+:$cuda_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "library path: $LD_LIBRARY_PATH"

# kit.py runs in the background so that a TERM or INT sent to run.sh alone reaches it: it then
# removes its rows' temporaries and writes the report as incomplete, and the trap above the scratch.
cd "$kit" || exit 1
python3 "$kit/kit.py" "$out" "$scratch" > >(tee -a "$log") 2>&1 &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
wait "$child"
code=$?
# A trapped signal ends `wait` early: wait again until kit.py itself has finished.
while kill -0 "$child" 2>/dev/null; do
  wait "$child"
  code=$?
done
exit "$code"
