#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ one after another, each for SECONDS (default 600), and
# prints per target the executions, exec/s, corpus size and findings, then a summary table
# (also written to fuzz/artifacts/summary.md). Installs cargo-fuzz if it is missing.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]        (targets: pack idx cifar checkpoint config matching)
#
# The toolchain is stable: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly-only flags, and
# no sanitizer is used (--sanitizer none: the targets are safe Rust over the library; the
# instrumentation is libFuzzer's coverage, with debug assertions and overflow checks on).
# Each run is niced (FUZZ_NICE, default 10) so it shares a small machine politely.
# A crash leaves its input under fuzz/artifacts/<target>/; minimise it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz tmin --sanitizer none <target> fuzz/artifacts/<target>/crash-...
# and keep the minimised input under fuzz/seeds/<target>/ once the bug is fixed.
set -euo pipefail

cd "$(dirname "$0")/.."
seconds=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(pack idx cifar checkpoint config matching)
fi
nice_level=${FUZZ_NICE:-10}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "== building the fuzz targets (cargo fuzz build --sanitizer none)"
nice -n "$nice_level" cargo fuzz build --sanitizer none
bin_dir=fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release
echo "== built at commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml || echo ' (with uncommitted changes under src/)')"

if [ ! -d fuzz/corpus ]; then
    echo "== writing the starting corpora (fuzz/make_seeds.py)"
    python3 fuzz/make_seeds.py fuzz/corpus
fi

mkdir -p fuzz/artifacts
summary=fuzz/artifacts/summary.md
rows=()
status=0
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    seeds=fuzz/seeds/$t
    artifacts=fuzz/artifacts/$t
    mkdir -p "$corpus" "$seeds" "$artifacts"
    log=fuzz/artifacts/$t.log
    before=$(find "$artifacts" -type f | wc -l)
    extra=()
    if [ -f "fuzz/dicts/$t.dict" ]; then
        extra+=("-dict=fuzz/dicts/$t.dict")
    fi
    echo "== $t: ${seconds}s (log: $log)"
    start=$(date +%s)
    set +e
    # The binary `cargo fuzz run` would start, run directly so that every target runs the
    # build made above (no rebuild between targets when the sources change meanwhile).
    nice -n "$nice_level" "$bin_dir/$t" -artifact_prefix="$artifacts/" \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=20 -rss_limit_mb=2048 \
        -max_len=16384 "${extra[@]}" "$corpus" "$seeds" >"$log" 2>&1
    rc=$?
    set -e
    wall=$(( $(date +%s) - start ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ -z "$execs" ]; then
        # No final stats (a crash): the last status line's count.
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    fi
    execs=${execs:-0}
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    rate=${rate:-$(( wall > 0 ? execs / wall : 0 ))}
    size=$(find "$corpus" -type f | wc -l)
    # libFuzzer's last status line: coverage counters and units in the reduced corpus.
    last=$(grep -E '^#[0-9]+[[:space:]]' "$log" | tail -1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    units=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
    after=$(find "$artifacts" -type f | wc -l)
    found=$(( after - before ))
    if [ "$rc" -ne 0 ] || [ "$found" -gt 0 ]; then
        findings="$found new artifact(s), exit $rc: $(grep -m1 -E 'panicked at|ERROR: libFuzzer' "$log" | cut -c1-160)"
        status=1
    else
        findings="none"
    fi
    echo "   $t: $execs executions in ${wall}s ($rate exec/s), cov ${cov:-?}, corpus ${units:-?} units ($size files), findings: $findings"
    rows+=("| $t | $wall | $execs | $rate | ${cov:-?} | ${units:-?} | $size | $findings |")
done

{
    echo "| target | seconds | executions | exec/s | cov | corpus units | corpus files | findings |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|"
    printf '%s\n' "${rows[@]}"
} | tee "$summary"
exit "$status"
