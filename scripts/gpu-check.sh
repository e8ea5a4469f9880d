#!/usr/bin/env bash
# The GPU checks, in one command, for a GPU machine with a prebuilt release binary:
#   [STAGES="kernels step peer train"] scripts/gpu-check.sh [REPORT_DIR]
#                                               (default dir: $OUT, else bench/results)
# It finds the CUDA libraries (libcuda, libcublasLt) and sets LD_LIBRARY_PATH, records the
# card, driver and clocks and the commit it measured, then runs the stages asked for (all by
# default; each under its own timeout) and writes one markdown report,
# gpu-check-<date>-<card>.md:
#   kernels  check-kernels (every kernel and the step against its CPU twin, ~1-2 min) and
#            bench --device cuda (per-kernel time, GB/s, TFLOP/s, ~1-2 min)
#   step     bench --step: img/s, MFU and memory of the whole training step for ViT-T/S/B/16
#            at 2x224 + 8x96, K 65536, PWML, at the largest batch that fits (~2-3 min)
#   peer     the same ViT-S/16 step at one batch (PEER_BATCH, default 64) in this engine and
#            in the PyTorch peer (eager, then torch.compile + SDPA), side by side (~3-4 min)
#   train    Fashion-MNIST on the GPU (needs data/fashion-mnist/*.gz, carried; see
#            scripts/stage-gpu-data.sh): the small28 preset for TRAIN_EPOCHS (default 2)
#            with kNN at the end, the first 20 steps' losses against the CPU backend's on
#            the same config, and ViT-T/16 at 224/96 for TRAIN_STEPS_224 steps (default 200)
# Device time is short (15 minutes a task, 10 a call): split the stages over calls, e.g.
#   STAGES="kernels step" first, then STAGES="peer train", or run the script several times
#   in one call with REPORT_TAG set apart (each run writes its own report; $OUT keeps what
#   finished if the call is stopped). BENCH_FAMILY=attention,layers limits the per-kernel
#   bench to those families.
# Build the binary first on any machine: scripts/build-gpu-binary.sh (release, with the
# kernels, the commit recorded, stripped).
set -uo pipefail
cd "$(dirname "$0")/.."

bin=${PWSELF_BIN:-target/release/pwself-engine}
stages=" ${STAGES:-kernels step peer train} "
want() { case "$stages" in *" $1 "*) return 0;; *) return 1;; esac; }
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
# REPORT_TAG names the report apart when one call runs the script more than once.
report="$dir/$(date -u +%Y-%m-%d)-gpu-check-${slug:-unknown}${REPORT_TAG:+-$REPORT_TAG}.md"
log="$dir/gpu-check.log"
# Bulky outputs (packs, run folders, per-run JSON) go to a scratch folder, so that $OUT holds
# only the report, the log and a few JSON files (the device tool returns at most 8 files).
work=${GPU_WORK:-$(mktemp -d /tmp/pwself-gpu.XXXXXX)}
mkdir -p "$work"

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

check_rc=0
bench_rc=0
step_rc=0
peer_rc=0
train_rc=0
section() { { echo; echo "## $1"; echo; } >> "$report"; echo "== $1"; }
fence() { echo '```' >> "$report"; }

if want kernels; then
    section "check-kernels"
    fence
    # Synchronise after every launch, so that a fault is reported under its kernel's name.
    PWSELF_CUDA_SYNC=1 timeout 150 "$bin" check-kernels 2>&1 | tee -a "$log" >> "$report"
    check_rc=${PIPESTATUS[0]}
    fence
    echo "exit status: $check_rc" >> "$report"

    section "bench --device cuda"
    timeout "${BENCH_TIMEOUT:-80}" "$bin" bench --device cuda --iters 10 ${BENCH_FAMILY:+--family "$BENCH_FAMILY"} --out "$dir/bench-table.md" 2>>"$log" >/dev/null
    bench_rc=$?
    if [ -f "$dir/bench-table.md" ]; then cat "$dir/bench-table.md" >> "$report"; rm -f "$dir/bench-table.md"; fi
    echo "exit status: $bench_rc" >> "$report"
    if [ "$bench_rc" -ne 0 ]; then
        { fence; tail -n 20 "$log"; fence; } >> "$report"
    fi
fi

if want step; then
    section "bench --step (whole training steps)"
    timeout "${STEP_TIMEOUT:-170}" "$bin" bench --step --profile --iters 10 --out "$dir/step-table.md" --json \
        > "$dir/step-bench.json" 2>>"$log"
    step_rc=$?
    if [ -f "$dir/step-table.md" ]; then cat "$dir/step-table.md" >> "$report"; rm -f "$dir/step-table.md"; fi
    echo "exit status: $step_rc (JSON: step-bench.json)" >> "$report"
    [ "$step_rc" -ne 0 ] && { fence; tail -n 20 "$log"; fence; } >> "$report"
fi

if want peer; then
    pb=${PEER_BATCH:-64}
    section "ViT-S/16 side by side at batch $pb: this engine, PyTorch eager, PyTorch compile"
    timeout 90 "$bin" bench --step --arch small --batch "$pb" --iters 10 --json \
        > "$dir/peer-engine.json" 2>>"$log"
    peer_rc=$?
    for variant in eager compile; do
        [ "$variant" = eager ] && t=100 || t=150
        timeout "$t" scripts/torch-peer.sh --device cuda --variant "$variant" --arch small \
            --batch "$pb" --steps 10 --warmup 3 --strict --json > "$dir/peer-torch-$variant.json" 2>>"$log"
        rc=$?
        [ "$rc" -ne 0 ] && peer_rc=$rc
    done
    python3 - "$dir" >> "$report" <<'PY'
import json, sys, os
d = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(d, name)) as f:
            return json.load(f)
    except Exception as e:
        return {"error": f"{name}: {e}"}
eng = load("peer-engine.json")
eng = eng[0] if isinstance(eng, list) and eng else eng
rows = [("pwself-engine", eng.get("images_per_second"), eng.get("median_ms"), eng.get("memory_bytes"))]
for v in ("eager", "compile"):
    t = load(f"peer-torch-{v}.json")
    rows.append((f"PyTorch {v}", t.get("img_per_s"), t.get("median_ms"),
                 t.get("peak_memory_bytes") or t.get("peak_memory")))
    if t.get("error"):
        print(f"- PyTorch {v}: {t['error']}")
print("| implementation | img/s | median ms/step | peak memory GiB | engine / this |")
print("|---|---:|---:|---:|---:|")
e = rows[0][1]
for name, ips, ms, mem in rows:
    ratio = f"{e / ips:.2f}x" if e and ips else "-"
    gib = f"{mem / 2**30:.2f}" if isinstance(mem, (int, float)) else "-"
    print(f"| {name} | {ips if ips is None else round(ips, 1)} | {ms if ms is None else round(ms, 2)} | {gib} | {ratio} |")
PY
    echo "exit status: $peer_rc (JSON: peer-*.json)" >> "$report"
fi

if want train; then
    section "Training on the GPU: Fashion-MNIST"
    src=data/fashion-mnist
    if [ -f "$src/train-images-idx3-ubyte.gz" ]; then
        "$bin" prepare idx --images "$src/train-images-idx3-ubyte.gz" --labels "$src/train-labels-idx1-ubyte.gz" \
            --classes fashion-mnist --out "$work/fmnist-train.pwpack" >>"$log" 2>&1
        "$bin" prepare idx --images "$src/t10k-images-idx3-ubyte.gz" --labels "$src/t10k-labels-idx1-ubyte.gz" \
            --classes fashion-mnist --out "$work/fmnist-test.pwpack" >>"$log" 2>&1
        packs=(--data "$work/fmnist-train.pwpack" --test-data "$work/fmnist-test.pwpack")
        # The same 20 steps on both backends: the loss curves must agree within bf16 tolerance.
        for dev in cuda cpu; do
            timeout 90 "$bin" train "${packs[@]}" --device "$dev" --batch 256 --epochs "${TRAIN_EPOCHS:-2}" \
                --max-steps 20 --eval-every 0 --out "$work/train-compare-$dev" --json \
                > "$work/train-compare-$dev.json" 2>>"$log"
        done
        python3 - "$work" >> "$report" <<'PY'
import json, sys, os
d = sys.argv[1]
def losses(dev):
    try:
        with open(os.path.join(d, f"train-compare-{dev}", "metrics.jsonl")) as f:
            return [json.loads(l)["stats"]["loss"] for l in f if '"kind":"step"' in l.replace(" ", "")]
    except Exception as e:
        print(f"- {dev}: {e}")
        return []
g, c = losses("cuda"), losses("cpu")
print("First steps, same config and seed (batch 256, small28): loss on the CPU backend (f32) and on the GPU (bf16)\n")
print("| step | cpu | gpu | rel. diff |")
print("|---:|---:|---:|---:|")
worst = 0.0
for i, (a, b) in enumerate(zip(c, g)):
    r = abs(a - b) / abs(a)
    worst = max(worst, r)
    print(f"| {i} | {a:.5f} | {b:.5f} | {r:.2e} |")
print(f"\nlargest relative difference: {worst:.2e} over {min(len(c), len(g))} steps")
PY
        timeout 200 "$bin" train "${packs[@]}" --device cuda --batch 256 --epochs "${TRAIN_EPOCHS:-2}" \
            --out "$work/train-small28" --json > "$work/train-small28.json" 2>>"$log"
        train_rc=$?
        timeout 150 "$bin" train "${packs[@]}" --device cuda --arch tiny --patch 16 --view-sides 224,96 --local-views 8 \
            --batch 64 --epochs 1 --max-steps "${TRAIN_STEPS_224:-200}" \
            --out "$work/train-224" --json > "$work/train-224.json" 2>>"$log"
        rc=$?
        [ "$rc" -ne 0 ] && train_rc=$rc
        python3 - "$work" >> "$report" <<'PY'
import json, sys, os
d = sys.argv[1]
for name in ("train-small28", "train-224"):
    try:
        s = json.load(open(os.path.join(d, name + ".json")))
    except Exception as e:
        print(f"- {name}: no summary ({e})")
        continue
    knn = s.get("knn_trained") or []
    init = s.get("knn_init") or []
    fmt = lambda r: ", ".join(f"k={x['k']} {x['top1']:.2f}%" for x in r) or "-"
    print(f"- {name}: {s['steps']} steps in {s['seconds']:.1f} s ({s['images_per_second']:.0f} img/s) on {s.get('device')}; "
          f"loss {s.get('first_loss')} -> {s.get('last_loss')}; kNN init {fmt(init)}, trained {fmt(knn)}; "
          f"device memory {(s.get('device_memory') or 0) / 2**30:.2f} GiB")
PY
        echo "exit status: $train_rc" >> "$report"
    else
        echo "skipped: $src/*.gz not carried (run scripts/stage-gpu-data.sh and carry data/fashion-mnist)" >> "$report"
    fi
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
[ "$check_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$step_rc" -eq 0 ] && [ "$peer_rc" -eq 0 ] && [ "$train_rc" -eq 0 ]
