#!/usr/bin/env bash
# Long-run soak (issue 7 item 7): one CPU training run of at least MINUTES minutes, its
# resident memory sampled from /proc/PID/status, and a verdict on "no growth after the
# first epoch". It measures memory only; the run's numbers (loss, kNN) are not judged.
#
# Usage: scripts/soak.sh [MINUTES] [OUT_DIR] [extra `train` arguments...]
#        scripts/soak.sh --summary OUT_DIR     (the summary of an earlier soak's memory.csv)
#   MINUTES   how long the run lasts at least (default 30); after that the run is stopped
#             at the next epoch boundary (once the epoch's checkpoint is written)
#   OUT_DIR   run directory (default runs/soak): the run's own files, plus
#             memory.csv   elapsed_s,rss_kib,hwm_kib,step,epoch   one row per sample
#             train.log    the run's stderr/stdout
#             summary.txt  the summary printed at the end
# Environment:
#   SOAK_THREADS     --threads of the run (default 2)
#   SOAK_EPOCHS      --epochs of the run (default 100: far more than MINUTES needs, so the
#                    run never ends on its own; the schedules span them)
#   SOAK_INTERVAL    seconds between samples (default 5)
#   SOAK_MAX_GROWTH  pass threshold in percent (default 2), see the verdict below
#   PWSELF_BIN       the binary (default target/release/pwself-engine, built if missing)
#
# The run is the default job (PW-Self on the embedded Fashion-MNIST subset, femto ViT,
# batch 32, a checkpoint and a kNN evaluation every epoch) on the CPU backend; extra
# arguments go to `train` after the script's own (e.g. --data pack --test-data pack).
# Run it under `nice` on a shared machine: other jobs slow the run, not its memory.
#
# Verdict: the reference is epoch 1 (the second epoch: by then every buffer, the loader's
# prefetch queue, one checkpoint write and one kNN evaluation have happened at least
# once). The run passes when, from epoch 2 on, neither the largest sampled RSS nor VmHWM
# (the kernel's own peak, which catches the kNN evaluation's spike between samples) is
# more than SOAK_MAX_GROWTH percent above epoch 1's. A table per epoch (smallest and
# largest sampled RSS, VmHWM at its end) shows a slow creep that stays under the
# threshold.
set -euo pipefail
cd "$(dirname "$0")/.."

# Prints the summary of memory.csv in $1 (arguments: csv, max growth %, elapsed s); exits 1
# on FAIL, 2 when the run did not reach epoch 2.
summarize() {
    awk -F, -v max_growth="$2" -v elapsed="$3" '
    NR == 1 || $4 == "" { next }
    {
        n++; last_rss = $2; last_hwm = $3; last_step = $4; e = $5; last_epoch = e
        if (!(e in cnt)) { order[++ne] = e; lo[e] = $2; hi[e] = $2 }
        cnt[e]++
        if ($2 < lo[e]) lo[e] = $2
        if ($2 > hi[e]) hi[e] = $2
        hwm[e] = $3
        if ($2 > max_rss) max_rss = $2
        if (e >= 1 && first_e1 == "") first_e1 = $2
        if (e >= 2) { later++; if ($2 > max_later) max_later = $2 }
    }
    END {
        mib = 1024
        printf "samples: %d over %d s, last step %s (epoch %s)\n", n, elapsed, last_step, last_epoch
        printf "%6s %8s %12s %12s %12s\n", "epoch", "samples", "min RSS MiB", "max RSS MiB", "VmHWM MiB"
        for (i = 1; i <= ne; i++) {
            e = order[i]
            printf "%6s %8d %12.1f %12.1f %12.1f\n", e, cnt[e], lo[e] / mib, hi[e] / mib, hwm[e] / mib
        }
        if (first_e1 == "" || later == 0) {
            print "verdict: UNDECIDED (the run did not reach epoch 2; give it more minutes)"
            exit 2
        }
        ref = hi[1]; ref_hwm = hwm[1]
        printf "RSS just after the first epoch:         %8.1f MiB\n", first_e1 / mib
        printf "largest RSS during epoch 1 (reference): %8.1f MiB\n", ref / mib
        printf "largest RSS from epoch 2 on:            %8.1f MiB\n", max_later / mib
        printf "largest RSS of the run:                 %8.1f MiB\n", max_rss / mib
        printf "RSS at the end:                         %8.1f MiB\n", last_rss / mib
        printf "VmHWM at the end of epoch 1 / the end:  %8.1f / %.1f MiB\n", ref_hwm / mib, last_hwm / mib
        g = max_later - ref; pct = 100 * g / ref
        gh = last_hwm - ref_hwm; pct_h = 100 * gh / ref_hwm
        printf "growth after epoch 1: largest RSS %+.1f MiB (%+.2f%%), VmHWM %+.1f MiB (%+.2f%%)\n", g / mib, pct, gh / mib, pct_h
        if (pct <= max_growth && pct_h <= max_growth) {
            printf "verdict: PASS (no growth after the first epoch beyond %s%%)\n", max_growth
        } else {
            printf "verdict: FAIL (memory grew more than %s%% after the first epoch)\n", max_growth
            exit 1
        }
    }' "$1"
}

if [ "${1:-}" = "--summary" ]; then
    [ -f "${2:-}/memory.csv" ] || { echo "usage: scripts/soak.sh --summary OUT_DIR (a folder holding memory.csv)" >&2; exit 2; }
    summarize "$2/memory.csv" "${SOAK_MAX_GROWTH:-2}" "$(tail -n 1 "$2/memory.csv" | cut -d, -f1)"
    exit
fi

minutes="${1:-30}"
out="${2:-runs/soak}"
shift $(( $# > 2 ? 2 : $# ))
threads="${SOAK_THREADS:-2}"
epochs="${SOAK_EPOCHS:-100}"
interval="${SOAK_INTERVAL:-5}"
max_growth="${SOAK_MAX_GROWTH:-2}"
bin="${PWSELF_BIN:-target/release/pwself-engine}"

if [ ! -x "$bin" ]; then
    echo "== $bin missing: cargo build --release"
    cargo build --release --locked
fi

mkdir -p "$out"
# Run a copy, so that a rebuild of target/release during the soak changes nothing.
cp "$bin" "$out/pwself-engine"
csv="$out/memory.csv"
log="$out/train.log"
echo "elapsed_s,rss_kib,hwm_kib,step,epoch" >"$csv"

cmd=("$out/pwself-engine" train --device cpu --threads "$threads" --epochs "$epochs" --out "$out" "$@")
echo "== $(date -u +%FT%TZ) ${cmd[*]}" | tee "$log"
"${cmd[@]}" >>"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT INT TERM

# The step and epoch of the newest step line in metrics.jsonl (written through a buffer
# flushed every few dozen lines and at every epoch end, so it lags a little).
last_step() {
    local m="$out/metrics.jsonl"
    [ -f "$m" ] || { echo ","; return; }
    tail -c 8192 "$m" | grep '"kind":"step".*}}$' | tail -n 1 |
        sed -n 's/.*"epoch":\([0-9]*\),.*"step":\([0-9]*\),.*/\2,\1/p' | grep . || echo ","
}

start=$(date +%s)
deadline=$((start + minutes * 60))
stop_epoch=""
while kill -0 "$pid" 2>/dev/null; do
    status="/proc/$pid/status"
    rss=$(awk '/^VmRSS:/ {print $2}' "$status" 2>/dev/null || true)
    hwm=$(awk '/^VmHWM:/ {print $2}' "$status" 2>/dev/null || true)
    [ -n "$rss" ] || break
    now=$(date +%s)
    se=$(last_step)
    echo "$((now - start)),$rss,$hwm,$se" >>"$csv"
    epoch="${se#*,}"
    if [ "$now" -ge "$deadline" ] && [ -n "$epoch" ]; then
        # Past the time: stop once the next epoch has begun (its predecessor's
        # checkpoint and kNN evaluation done).
        if [ -z "$stop_epoch" ]; then
            stop_epoch=$((epoch + 1))
            echo "== $(date -u +%FT%TZ) $minutes min passed at epoch $epoch; stopping when epoch $stop_epoch begins" | tee -a "$log"
        elif [ "$epoch" -ge "$stop_epoch" ]; then
            echo "== $(date -u +%FT%TZ) stopping the run (SIGTERM) at epoch $epoch" | tee -a "$log"
            kill "$pid"
            break
        fi
    fi
    sleep "$interval"
done
wait "$pid" 2>/dev/null || true
trap - EXIT INT TERM
elapsed=$(($(date +%s) - start))

summarize "$csv" "$max_growth" "$elapsed" | tee "$out/summary.txt"
