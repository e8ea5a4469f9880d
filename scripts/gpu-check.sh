#!/usr/bin/env bash
# The GPU checks, in one command, for a GPU machine with a prebuilt release binary:
#   scripts/gpu-check.sh [REPORT_DIR]          (default: $OUT, else bench/results)
# It finds the CUDA libraries (libcuda, libcublasLt) and sets LD_LIBRARY_PATH, records the
# card, driver and clocks, runs `check-kernels` (every kernel against its CPU twin) and
# `bench --device cuda` (per-kernel time, GB/s and TFLOP/s against the measured copy
# bandwidth and matmul peak), and writes one markdown report, gpu-check-<date>-<card>.md,
# with the commit it measured. Budget: under 6 minutes (each step has its own timeout).
# Build the binary first on any machine: scripts/build-gpu-binary.sh (release, with the
# kernels, the commit recorded, stripped).
set -uo pipefail
cd "$(dirname "$0")/.."

bin=${PWSELF_BIN:-target/release/pwself-engine}
dir=${1:-${OUT:-bench/results}}
mkdir -p "$dir"
[ -x "$bin" ] || { echo "gpu-check: $bin not found: build it with cargo build --release" >&2; exit 2; }

# --- CUDA libraries: the driver's libcuda and cuBLASLt (from /usr/local/cuda or pip packages).
found=()
add_dir() { case ":${LD_LIBRARY_PATH:-}:" in *":$1:"*) ;; *) LD_LIBRARY_PATH="$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; found+=("$1");; esac; }
for lib in libcuda.so.1 libcublasLt.so.13 libcublasLt.so; do
    p=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l { print $NF; exit }')
    [ -n "$p" ] && add_dir "$(dirname "$p")"
done
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [ -d "$d" ] && ls "$d"/libcublasLt.so* "$d"/libcuda.so* >/dev/null 2>&1 && add_dir "$d"
done
if command -v python3 >/dev/null; then
    while IFS= read -r d; do [ -n "$d" ] && add_dir "$d"; done < <(python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
seen = set()
for r in roots:
    for p in glob.glob(os.path.join(r, "nvidia", "**", "libcublasLt.so*"), recursive=True):
        d = os.path.dirname(p)
        if d not in seen:
            seen.add(d); print(d)
PY
)
fi
export LD_LIBRARY_PATH
echo "CUDA library folders added: ${found[*]:-(none)}"

# The commit the binary was built from (scripts/build-gpu-binary.sh records it), and the
# working tree's, which may differ.
commit=$("$bin" kernels 2>/dev/null | sed -n 's/^source commit: //p')
tree=$(git describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
slug=$(echo "${card:-unknown}" | tr ' ' '-' | tr -cd 'A-Za-z0-9-' | sed 's/^NVIDIA-//')
report="$dir/$(date -u +%Y-%m-%d)-gpu-check-${slug:-unknown}.md"
log="$dir/gpu-check.log"

{
    echo "# GPU check: $(date -u '+%Y-%m-%d %H:%M UTC'), ${card:-no card found}"
    echo
    echo "- binary built from commit: ${commit:-unknown}"
    echo "- working tree: $tree"
    echo "- binary: $bin ($("$bin" --version 2>/dev/null))"
    echo "- command: scripts/gpu-check.sh"
    echo "- CUDA library folders added to LD_LIBRARY_PATH: ${found[*]:-(none)}"
    echo
    echo "## Card, driver, clocks"
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,pstate --format=csv 2>&1
    echo '```'
    echo
    echo "## Kernels in this binary (ptxas, sm_90 and sm_80)"
    echo '```'
    "$bin" kernels 2>&1
    echo '```'
} > "$report"

echo "== check-kernels"
{
    echo
    echo "## check-kernels"
    echo '```'
} >> "$report"
# Synchronise after every launch, so that a fault is reported under its kernel's name.
PWSELF_CUDA_SYNC=1 timeout 150 "$bin" check-kernels 2>&1 | tee -a "$log" >> "$report"
check_rc=${PIPESTATUS[0]}
{
    echo '```'
    echo "exit status: $check_rc"
} >> "$report"

echo "== bench --device cuda"
{
    echo
    echo "## bench --device cuda"
    echo
} >> "$report"
timeout 150 "$bin" bench --device cuda --iters 20 --out "$dir/bench-table.md" 2>>"$log" >/dev/null
bench_rc=$?
if [ -f "$dir/bench-table.md" ]; then cat "$dir/bench-table.md" >> "$report"; rm -f "$dir/bench-table.md"; fi
echo "exit status: $bench_rc" >> "$report"
if [ "$bench_rc" -ne 0 ]; then
    { echo '```'; tail -n 20 "$log"; echo '```'; } >> "$report"
fi
{
    echo
    echo "## Clocks after the runs"
    echo '```'
    nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv 2>&1
    echo '```'
} >> "$report"

cat "$report"
echo "report: $report"
[ "$check_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
