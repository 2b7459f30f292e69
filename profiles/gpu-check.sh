#!/usr/bin/env bash
# The GPU check, in one command for one short GPU lease (see profiles/README.md, "GPU check").
#
#   bash profiles/gpu-check.sh OUT_DIR        on a machine with one CUDA GPU (about 6 minutes, at most 8)
#   bash profiles/gpu-check.sh --cpu-smoke OUT_DIR   the same phases on CPU with tiny models (a dry run, ~2 min)
#   bash profiles/gpu-check.sh --prepare-wheels      here, with pip's network: peer wheels for the GPU machine
#
# Run from the repository root. Nothing is downloaded. Phases, each under its own `timeout` so a
# hang costs that phase alone, each writing its files into OUT_DIR as soon as it ends:
#   0 setup    the GPU, torch, the peer wheels carried in .whl/ installed into /tmp/site  (cap 40 s)
#   1 tests    the tests that skip without CUDA (selected by their skip reason)          (cap 60 s)
#   2 nccl     torchrun --nproc-per-node 1: a few data-parallel steps of the tiny model on
#              the nccl backend (gloo with --cpu-smoke), then the same with --parallel fsdp
#              ("not available" while streamtrain.run has no --parallel flag)            (cap 40 s)
#   3 recipe   two steps of the LLaMA-7B GaLore recipe of profiles/ under the 24 GB
#              allocator cap (randomized SVD), memory measured next to the plan          (cap 180 s)
#   4 bench    python -m streamtrain.bench --preset gpu: tokens/s and step-time ratios   (cap 160 s)
# OUT_DIR gets 8 files (the device tool brings back at most 8): gpu-check.log, tests.log,
# memory.md, memory.json, memory.png, recipe.json, bench.md, bench.json. The summary is printed last.
# shellcheck disable=SC2317  # the phase functions run indirectly, through `timeout bash -c`
set -uo pipefail

ACCUMULATE=${ACCUMULATE:-4}   # the recipe accumulates 32 micro-batches; 4 give the same peak (plans: 22.62 vs 22.56 GB)
STEPS=${STEPS:-2}             # step 0 takes all 224 first subspaces; step 1 is a plain step
RECIPE=${RECIPE:-bf16}        # bf16: the 24 GB recipe; int8: the 12 GB one (INT8 weights, INT4 bases, rank 256)
PEER_WHEELS="torchao==0.18.0 bitsandbytes==0.50.2 galore-torch==1.0"
CAP_SETUP=${CAP_SETUP:-40} CAP_TESTS=${CAP_TESTS:-60}   # seconds; 480 in all by default
CAP_NCCL=${CAP_NCCL:-40} CAP_RECIPE=${CAP_RECIPE:-180} CAP_BENCH=${CAP_BENCH:-160}

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }

prepare_wheels() {  # here: wheels for the GPU machine's Python 3.12, into .whl/ (git-ignored)
  local exclude; exclude=$(git rev-parse --git-path info/exclude) || return 1
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
  mkdir -p .whl
  # shellcheck disable=SC2086
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $PEER_WHEELS || return 1
  ls -l .whl && du -sh .whl && echo "carry .whl with the run (carry: [\".whl\"])"
}

phase() {  # phase NAME CAP COMMAND...: run under a time cap, record status and seconds
  local name=$1 cap=$2 start=$SECONDS rc
  shift 2
  echo; echo "=== phase $name (cap ${cap}s) ==="
  # a fresh bash runs the exported function; timeout signals its whole process group (workers too)
  timeout --kill-after=10 "$cap" bash -o pipefail -c '"$@"' _ "$@"
  rc=$?
  local took=$((SECONDS - start)) status="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT at ${cap}s"; elif [ "$rc" -ne 0 ]; then status="failed (exit $rc)"; fi
  STATUS+=("$name: $status, ${took}s")
  [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
  echo "=== phase $name: $status, ${took}s ==="
  return "$rc"
}

setup() {
  echo "mode: $MODE; out: $OUT_DIR; work: $WORK; $(date -u +%FT%TZ)"
  if [ "$MODE" = gpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: not available"
  fi
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && echo "installed into /tmp/site: $(ls .whl | tr '\n' ' ')" || echo "peer wheels: install failed; peer rows will be skipped"
  else
    echo "no .whl/ folder: peer rows (torchao, bitsandbytes, galore-torch) run only if installed already"
  fi
  python3 - "$MODE" <<'PY'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
elif sys.argv[1] == "gpu":
    sys.exit("error: no CUDA device visible to torch; run with --cpu-smoke on a machine without a GPU")
for name in ("torchao", "bitsandbytes", "galore_torch"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '?')}: imports")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
PY
}

cuda_tests() {  # the tests that skip without CUDA: selected by a skipif whose reason names CUDA or a GPU
  cat >"$WORK/cuda_only.py" <<'PY'
import re

def needs_cuda(item):
    return any(re.search(r"cuda|gpu", str(m.kwargs.get("reason", "")), re.I) for m in item.iter_markers("skipif"))

def pytest_collection_modifyitems(config, items):
    deselected = [i for i in items if not needs_cuda(i)]
    config.hook.pytest_deselected(items=deselected)
    items[:] = [i for i in items if needs_cuda(i)]
PY
  PYTHONPATH="$WORK:$PYTHONPATH" python3 -m pytest tests -p cuda_only -p no:cacheprovider -q -rs \
    --continue-on-collection-errors 2>&1 | tee "$OUT_DIR/tests.log"
}

nccl_smoke() {  # Trainer's data-parallel path (reduction in the hooks) at world size 1, then FSDP if offered
  local device=cuda backend=nccl
  [ "$MODE" = gpu ] || { device=cpu; backend=gloo; }
  local args=(--model byte-tiny --steps 3 --batch-size 4 --seq-len 64 --max-data-bytes 200000 --eval-every 0
              --eval-batches 1 --save-every 0 --no-progress --device "$device")
  local launch=(python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m streamtrain.run)
  echo "data parallel: 1 rank, $backend (the backend Trainer picks for --device $device)"
  "${launch[@]}" "${args[@]}" --out "$WORK/dp" || { echo "nccl: data parallel FAILED" >"$WORK/nccl.txt"; return 1; }
  python3 - "$WORK/dp/metrics.jsonl" "$backend" >"$WORK/nccl.txt" <<'PY' || return 1
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
sent = [r.get("comm_bytes") for r in records]
ok = len(records) == 3 and all(s and s == r.get("comm_bytes_full_gradients") for s, r in zip(sent, records))
print(f"nccl: data parallel, 1 rank on {sys.argv[2]}: {len(records)} steps, loss {records[0]['loss']:.4f} -> "
      f"{records[-1]['loss']:.4f}, {sent[-1]} bytes all-reduced per step: {'ok' if ok else 'UNEXPECTED metrics'}")
sys.exit(0 if ok else 1)
PY
  cat "$WORK/nccl.txt"
  local help; help=$(python3 -m streamtrain.run --help 2>&1)
  if ! grep -qE -- '--parallel([ =,]|$)' <<<"$help"; then
    echo "fsdp: not available (streamtrain.run has no --parallel flag)" | tee -a "$WORK/nccl.txt"
    return 0
  fi
  if "${launch[@]}" "${args[@]}" --parallel fsdp --out "$WORK/fsdp"; then
    echo "fsdp: 1 rank on $backend, 3 steps: ok" | tee -a "$WORK/nccl.txt"
  else
    echo "fsdp: 1 rank on $backend: FAILED" | tee -a "$WORK/nccl.txt"
    return 1
  fi
}

recipe() {  # profiles/llama-7b-galore-r1024-seq256 (see README) with fewer micro-batches, trained for real
  local args=(--method galore --states 8bit --activation-checkpointing --seq-len 256 --steps "$STEPS"
              --svd randomized --save-every 0 --eval-every 0 --eval-batches 1 --max-data-bytes 1000000 --no-progress
              --out "$WORK/recipe")
  if [ "$MODE" = gpu ] && [ "$RECIPE" = int8 ]; then  # profiles/llama-7b-int8-galore-r256-int4-12GB
    args+=(--model llama-7b --dtype int8 --projector-precision int4 --loss-chunk-tokens 1024 --budget 12GB
           --device cuda --rank 256 --batch-size 16 --accumulate "$ACCUMULATE" --offload-accumulation)
  elif [ "$MODE" = gpu ]; then
    args+=(--model llama-7b --dtype bfloat16 --loss-chunk-tokens 1024 --budget 24GB --device cuda --rank 1024
           --batch-size 16 --accumulate "$ACCUMULATE" --offload-accumulation)
  elif [ "$RECIPE" = int8 ]; then
    args+=(--model byte-tiny --dtype int8 --projector-precision int4 --budget 1GB --device cpu --rank 16
           --batch-size 4 --accumulate 2)
  else
    args+=(--model byte-tiny --budget 1GB --device cpu --rank 16 --batch-size 4 --accumulate 2)
  fi
  python3 -m streamtrain.bench.recipe_check "${args[@]}"
}

bench() {
  local args=(--out "$WORK/bench" --worker-timeout 100)
  if [ "$MODE" = gpu ]; then
    args+=(--preset gpu --device cuda)
  else
    # shellcheck disable=SC2054  # --only takes one comma-separated argument
    args+=(--preset quick --device cpu --only torch-adamw,torch-adamw-fused-hooks,engine-adamw,engine-galore --no-svd)
  fi
  python3 -m streamtrain.bench "${args[@]}" >/dev/null
}

collect() {  # collect FOLDER FILE...: copy what a phase wrote into OUT_DIR (after the phase, even a killed one)
  local folder=$1 f
  shift
  for f in "$@"; do
    if [ -f "$folder/$f" ]; then cp "$folder/$f" "$OUT_DIR/"; fi
  done
  if [ -f "$folder/memory-report.txt" ]; then sed -n '1,40p' "$folder/memory-report.txt"; fi
}

summary() {
  echo; echo "=== summary ($MODE, ${SECONDS}s in all) ==="
  printf '%s\n' "${STATUS[@]}"
  [ -f "$OUT_DIR/tests.log" ] && echo "tests: $(tail -1 "$OUT_DIR/tests.log")"
  if [ -f "$WORK/nccl.txt" ]; then cat "$WORK/nccl.txt"; else echo "nccl: no result (see gpu-check.log)"; fi
  python3 - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
from streamtrain.bench.recipe_check import summary_line
out = Path(sys.argv[1])
recipe, bench = out / "recipe.json", out / "bench.md"
print(summary_line(json.loads(recipe.read_text())) if recipe.exists() else "recipe: no recipe.json (see gpu-check.log)")
if bench.exists():
    print("bench:", *[line for line in bench.read_text().splitlines()
                      if line.startswith(("- engine-", "engine-adamw / torch"))], sep="\n")
else:
    print("bench: no bench.md (see gpu-check.log)")
PY
  echo "files: $(ls "$OUT_DIR" | tr '\n' ' ')"
}

main() {
  STATUS=() FAILED=0
  phase setup "$CAP_SETUP" setup || { summary; return 1; }
  phase tests "$CAP_TESTS" cuda_tests
  phase nccl "$CAP_NCCL" nccl_smoke
  phase recipe "$CAP_RECIPE" recipe
  collect "$WORK/recipe" memory.md memory.json memory.png recipe.json
  phase bench "$CAP_BENCH" bench
  collect "$WORK" bench.md bench.json
  summary
  [ "$FAILED" -eq 0 ]
}

[ -d streamtrain ] || { echo "error: run from the repository root (no ./streamtrain here)" >&2; exit 2; }
MODE=gpu
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --prepare-wheels) prepare_wheels; exit $? ;;
  --cpu-smoke) MODE=cpu; shift ;;
esac
OUT_DIR=${1:-${OUT:-}}
[ -n "$OUT_DIR" ] || { echo "error: name the output folder: bash profiles/gpu-check.sh OUT_DIR" >&2; exit 2; }
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export -f phase setup cuda_tests nccl_smoke recipe bench
export MODE OUT_DIR WORK STEPS ACCUMULATE RECIPE
main 2>&1 | tee "$OUT_DIR/gpu-check.log"
exit "${PIPESTATUS[0]}"
