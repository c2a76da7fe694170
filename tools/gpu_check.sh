#!/usr/bin/env bash
# The GPU path in one script (issue 20, item 1): one call of the device tool on one H200, within 8 minutes.
#
#   tools/gpu_check.sh --prepare       HERE (network): fill .gpu_wheels/ (ignored) with what the device lacks
#   tools/gpu_check.sh                 THERE (device): build, test, measure; one summary table
#   tools/gpu_check.sh --cpu-dry-run   anywhere: every row "not run: no CUDA device", exit 2 (what a machine
#                                      without CUDA gets anyway; tests/test_gpu_check.py runs it)
#
# Rows (each "ok", "FAIL" or "not run: <why>", with the figure it measured and only that):
#   build          the CUDA op (ops/*.cu) built in place against the machine's torch (setup.py build_ext)
#   cuda tests     every test marked `cuda` (the files that carry the marker), none may skip
#   token_gate     bench/token_gate.py --device cuda: ratio to the reference, GB/s against a device-to-device
#                  copy of the same bytes timed in the same run
#   sparse U-Net   bench/sparse_unet.py --device cuda, when spconv imports with CUDA support (its CUDA wheels do
#                  not fit a device call: the row then says so, with the sizes --prepare measured)
#   train bf16     bench/train_speed.py: SmolLM2's architecture with random weights (config carried, weights
#                  made there), bf16 autocast, $GPU_CHECK_TRAIN_S s (120): steps/s and peak memory
#   query_cache    bench/query_cache.py --device cuda on the same random-weight SmolLM2
#
# Device machine (no network, python3 = Python 3.12 with torch 2.11+cu130, transformers, peft, ...): the
# wheels in .gpu_wheels/ go into a temporary --target dir on PYTHONPATH, never into its Python; everything the
# run writes (build objects, the random model, the compiled scene3d/_C*.so) is removed on exit (--keep leaves
# it). Exit status: 0 all rows ok or not run for a stated reason that is no failure, 1 a row failed, 2 no CUDA
# device, 64 bad usage.
#
# With the device tool:   run(command="bash tools/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=540)
# Env: PYTHON (python3), GPU_CHECK_TRAIN_S (120), GPU_CHECK_BUDGET_S (480: later rows are skipped, and say
# so, once the run has used this much), SCENE3D_GPU_WHEELS (.gpu_wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
WHEELS=${SCENE3D_GPU_WHEELS:-.gpu_wheels}
TRAIN_S=${GPU_CHECK_TRAIN_S:-120}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
ROWS=("build" "cuda tests" "token_gate" "sparse U-Net" "train bf16" "query_cache")

mode=run keep=0
for a in "$@"; do
  case "$a" in
    --prepare) mode=prepare ;;
    --cpu-dry-run) mode=dry ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument '$a' (see tools/gpu_check.sh --help)" >&2; exit 64 ;;
  esac
done

# --- prepare (here, with network) ----------------------------------------------------------------------------
# Wheels for Python 3.12 x86-64 of the packages the device lacks, at the versions installed in this .venv;
# the architecture files of SmolLM2 (config + tokenizer, no weights); and the measured size of spconv's CUDA
# wheels, which decides the sparse U-Net row. Written to a temporary folder, then renamed into place.
if [ "$mode" = prepare ]; then
  VPY=${VENV:-.venv}/bin/python
  [ -x "$VPY" ] || { echo "gpu_check --prepare: $VPY not found (run make setup first)" >&2; exit 64; }
  tmp=$(mktemp -d "$WHEELS.tmp.XXXXXX") || exit 1
  trap 'rm -rf "$tmp"' EXIT
  plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  # hydra-core/omegaconf/antlr4: scene3d.config and the tests; plyfile/trimesh: data_prep; spconv (CPU build)
  # and its own needs: `import scene3d.heads` reaches scene3d.tokenizer, which imports spconv.
  pkgs=(hydra-core omegaconf antlr4-python3-runtime plyfile trimesh spconv cumm pccm ccimport fire termcolor lark)
  pins=$("$VPY" -c 'import sys, importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' "${pkgs[@]}") || exit 1
  for pin in $pins; do
    if ! "$VPY" -m pip download -q --no-deps "${plat[@]}" -d "$tmp" "$pin" 2>/dev/null; then
      # no wheel on the index (antlr4-python3-runtime 4.9.3 is an sdist): build a pure-Python one here
      "$VPY" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp" "$pin" || { echo "gpu_check --prepare: cannot get $pin" >&2; exit 1; }
    fi
  done
  "$VPY" - "$tmp" <<'PY' || exit 1
import shutil, sys
from pathlib import Path
from scene3d.llm.registry import resolve_model_path
src, dst = resolve_model_path("smollm2"), Path(sys.argv[1]) / "smollm2-arch"
dst.mkdir()
for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (src / f).is_file():
        shutil.copy(src / f, dst / f)
print(f"[gpu_check] SmolLM2 architecture files from {src}")
PY
  sp=$(mktemp -d)
  if "$VPY" -m pip download -q --no-deps "${plat[@]}" -d "$sp" spconv-cu126==2.3.8 cumm-cu126 2>/dev/null; then
    "$VPY" - "$sp" "$tmp/spconv_cuda.txt" <<'PY'
import sys
from pathlib import Path
ws = sorted(Path(sys.argv[1]).glob("*.whl"))
sizes = [(w.name.split("-")[0] + " " + w.name.split("-")[1], w.stat().st_size / 2**20) for w in ws]
total = sum(s for _, s in sizes)
parts = " + ".join(f"{n} {s:.1f} MiB" for n, s in sizes)
Path(sys.argv[2]).write_text(f"spconv's CUDA wheels ({parts} = {total:.1f} MiB) exceed the 64 MiB a device call "
                             "carries; they are also built for CUDA 12 (the device's torch is cu130)\n")
PY
  else
    echo "spconv's CUDA wheels could not be downloaded at prepare time (no index access)" > "$tmp/spconv_cuda.txt"
  fi
  rm -rf "$sp"
  rm -rf "$WHEELS" && mv "$tmp" "$WHEELS" && trap - EXIT
  echo "[gpu_check] $WHEELS: $(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sm "$WHEELS" | cut -f1) MiB; sparse U-Net: $(cat "$WHEELS/spconv_cuda.txt")"
  echo "[gpu_check] on the device: run(command=\"bash tools/gpu_check.sh\", carry=[\"$WHEELS\"], timeout_s=540)"
  exit 0
fi

# --- the table ------------------------------------------------------------------------------------------------
declare -A STATUS FIGURE
T0=$(date +%s)
table() {
  echo
  echo "== tools/gpu_check.sh summary ($(( $(date +%s) - T0 )) s)"
  printf '%-14s %-8s %s\n' "row" "status" "figure"
  for r in "${ROWS[@]}"; do
    local st=${STATUS[$r]:-"not run"} fig=${FIGURE[$r]:-""}
    if [ "${st:0:7}" = "not run" ]; then printf '%-14s %-8s %s\n' "$r" "not run" "${st#not run: }${fig:+ $fig}"
    else printf '%-14s %-8s %s\n' "$r" "$st" "$fig"; fi
  done
}
set_row() { STATUS[$1]=$2; FIGURE[$1]=${3:-}; }

no_cuda=""
if [ "$mode" = dry ]; then
  no_cuda="--cpu-dry-run"
elif ! "$PY" -c 'import torch' 2>/dev/null; then
  no_cuda="$PY cannot import torch"
elif ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  no_cuda="$PY: torch.cuda.is_available() is False"
fi
if [ -n "$no_cuda" ]; then
  for r in "${ROWS[@]}"; do set_row "$r" "not run: no CUDA device ($no_cuda)"; done
  table
  exit 2
fi

# --- the run (device) -------------------------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/scene3d-gpu-check.XXXXXX)
before_so=$(ls scene3d/_C*.so 2>/dev/null || true)
had_build=0; [ -e build ] && had_build=1
had_hyp=0; [ -e .hypothesis ] && had_hyp=1
cleanup() {
  [ "$keep" = 1 ] && { echo "[gpu_check] --keep: left $WORK and the built scene3d/_C*.so"; return; }
  rm -rf "$WORK"
  for so in scene3d/_C*.so; do [ -e "$so" ] && ! grep -qxF "$so" <<<"$before_so" && rm -f "$so"; done
  [ "$had_build" = 0 ] && rm -rf build
  [ "$had_hyp" = 0 ] && rm -rf .hypothesis
}
trap cleanup EXIT
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
LOG=${OUT:-$WORK}/gpu_check.log  # the device tool brings $OUT back
: >"$LOG"
echo "[gpu_check] log: $LOG; $("$PY" -c 'import torch, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")')"
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader 2>/dev/null | sed 's/^/[gpu_check] before: /'

site="$WORK/site"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl >>"$LOG" 2>&1 \
    || echo "[gpu_check] WARNING: installing the carried wheels failed (see $LOG)"
else
  echo "[gpu_check] WARNING: no wheels in $WHEELS (run tools/gpu_check.sh --prepare here, carry $WHEELS): rows that import hydra/omegaconf/spconv will fail"
fi
export PYTHONPATH="$site:$REPO${PYTHONPATH:+:$PYTHONPATH}"

# run NAME TIMEOUT CMD...: log the output, return the status (124 = timed out)
step() {
  local name=$1 t=$2; shift 2
  echo "[gpu_check] -- $name: $*" | tee -a "$LOG"
  timeout "$t" "$@" >>"$LOG" 2>&1
}
over_budget() { [ $(( $(date +%s) - T0 )) -ge "$BUDGET_S" ]; }
skip_budget() { set_row "$1" "not run: the ${BUDGET_S} s budget was used up before this row"; }
fail_tail() { tail -n 25 "$LOG" | sed 's/^/    | /'; }
figure() { "$PY" - "$@" 2>>"$LOG"; }  # figure FILE KIND: one line read off a bench's --json

# 1. build
cap=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')
t=$(date +%s)
if step build 240 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}" MAX_JOBS=16 "$PY" setup.py build_ext --inplace --build-temp "$WORK/build"; then
  if "$PY" -c 'import torch, scene3d._C; assert torch._C._dispatch_has_kernel_for_dispatch_key("scene3d::token_gate", "CUDA")' >>"$LOG" 2>&1; then
    set_row build ok "$(( $(date +%s) - t )) s, sm_${cap/./}, scene3d::token_gate has a CUDA kernel"
  else
    set_row build FAIL "built, but scene3d::token_gate has no CUDA kernel (was nvcc found? CUDA_HOME)"; fail_tail
  fi
else
  set_row build FAIL "setup.py build_ext failed (log: $LOG)"; fail_tail
fi
built=0; [ "${STATUS[build]}" = ok ] && built=1

# 2. cuda tests (none may skip here: the marker means "needs a CUDA device", and this machine has one)
mapfile -t cuda_files < <(grep -l 'pytest.mark.cuda' tests/test_*.py)
if over_budget; then skip_budget "cuda tests"
elif [ "$built" = 0 ]; then set_row "cuda tests" "not run: the build failed"
else
  step "cuda tests" 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda --junitxml "$WORK/junit.xml" "${cuda_files[@]}"
  res=$(figure "$WORK/junit.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
s = ET.parse(sys.argv[1]).getroot()
s = s if s.tag == "testsuite" else s.find("testsuite")
n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
print(("ok" if n and not (f or e or k) else "FAIL") + f"|{n - f - e - k} passed, {f} failed, {e} errors, {k} skipped")
PY
)
  [ -n "$res" ] || res="FAIL|pytest wrote no report"
  set_row "cuda tests" "${res%%|*}" "${res#*|} (${cuda_files[*]##*/})"
  [ "${res%%|*}" = ok ] || fail_tail
fi

# 3. token_gate on CUDA
if over_budget; then skip_budget token_gate
elif [ "$built" = 0 ]; then set_row token_gate "not run: the build failed"
elif step token_gate 150 "$PY" bench/token_gate.py --device cuda --json "$WORK/token_gate.json"; then
  res=$(figure "$WORK/token_gate.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
out = []
for r in rows:
    s = f"{r['config']} {r['pass']} {r['ratio']:.2f}x ref"
    if "of_copy" in r:
        s += f", {r['op_gbs']:.0f} GB/s = {r['of_copy']:.0%} of copy ({r['copy_gbs']:.0f} GB/s)"
    out.append(s)
print("; ".join(out))
PY
)
  if [ -n "$res" ]; then set_row token_gate ok "$res"; else set_row token_gate FAIL "no figures in the bench's json"; fi
else
  set_row token_gate FAIL "bench/token_gate.py --device cuda failed"; fail_tail
fi

# 4. sparse U-Net on spconv's CUDA build
if over_budget; then skip_budget "sparse U-Net"
elif "$PY" -c 'import sys, spconv.cppconstants as c; sys.exit(1 if c.CPU_ONLY_BUILD else 0)' >/dev/null 2>&1; then
  if step "sparse U-Net" 150 "$PY" bench/sparse_unet.py --device cuda --voxels 200000 --json "$WORK/unet.json"; then
    set_row "sparse U-Net" ok "$(figure "$WORK/unet.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['voxels']} voxels: {r['ms']:.1f} ms per forward+backward")
PY
)"
  else set_row "sparse U-Net" FAIL "bench/sparse_unet.py --device cuda failed"; fail_tail; fi
else
  why="spconv here is a CPU-only build or does not import"
  [ -f "$WHEELS/spconv_cuda.txt" ] && why=$(head -1 "$WHEELS/spconv_cuda.txt")
  set_row "sparse U-Net" "not run: $why"
fi

# 5. 2-minute bf16 training run, SmolLM2's architecture with random weights
arch="$WHEELS/smollm2-arch"
if over_budget; then skip_budget "train bf16"
elif [ ! -f "$arch/config.json" ]; then set_row "train bf16" "not run: no SmolLM2 config in $arch (tools/gpu_check.sh --prepare)"
elif step "train bf16" $(( TRAIN_S + 150 )) "$PY" bench/train_speed.py --device cuda --precision bf16 --llm "$arch" \
     --random-weights --work-dir "$WORK" --seconds "$TRAIN_S" --batch 16 --objects 100 --json "$WORK/train.json"; then
  res=$(figure "$WORK/train.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['model_type']} {r['layers']} layers (random weights), batch {r['batch']} x {r['objects']} objects: "
      f"{r['steps_per_s']:.2f} steps/s, {r['samples_per_s']:.1f} samples/s over {r['seconds']:.0f} s, "
      f"peak {r['peak_mem_gib']:.2f} GiB, loss {r['loss_first']:.2f} -> {r['loss_last']:.2f}")
PY
)
  if [ -n "$res" ]; then set_row "train bf16" ok "$res"; else set_row "train bf16" FAIL "no figures in train_speed's json"; fi
else
  set_row "train bf16" FAIL "bench/train_speed.py failed"; fail_tail
fi

# 6. query cache on CUDA, same architecture (the random model train_speed wrote into $WORK/random-llm)
if over_budget; then skip_budget query_cache
elif [ ! -f "$WORK/random-llm/config.json" ]; then set_row query_cache "not run: no random-weight SmolLM2 (the train row did not make one)"
elif step query_cache 150 "$PY" bench/query_cache.py --device cuda --llm "$WORK/random-llm" --repeats 3 --json "$WORK/query_cache.json"; then
  res=$(figure "$WORK/query_cache.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))[0]
print(f"{r['cache']:.1f} ms/query with the cache, {r['nocache']:.1f} without: {r['speedup']:.2f}x "
      f"(LLM half {r['llm_speedup']:.2f}x, bound {r['bound']:.2f}x)")
PY
)
  if [ -n "$res" ]; then set_row query_cache ok "$res"; else set_row query_cache FAIL "no figures in query_cache's json"; fi
else
  set_row query_cache FAIL "bench/query_cache.py --device cuda failed"; fail_tail
fi

nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader 2>/dev/null | sed 's/^/[gpu_check] after: /'
table | tee -a "$LOG"
for r in "${ROWS[@]}"; do [ "${STATUS[$r]:-}" = FAIL ] && exit 1; done
exit 0
