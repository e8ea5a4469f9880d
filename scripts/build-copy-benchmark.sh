#!/usr/bin/env bash
# Builds the real-photo copy-detection benchmark (docs/copy-benchmark.md) from Debian
# packages: installs the packages whose photographs it uses (skipping those already
# installed), builds the release binary if needed, and runs `pwself-engine eval copy-bench`.
# The same packages, seed and engine version give byte-identical files.
# Usage: scripts/build-copy-benchmark.sh OUT_DIR [extra `eval copy-bench` flags, e.g. --seed 1]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 OUT_DIR [--seed N] [--max-originals N] [--json]" >&2
    exit 2
fi
out=$1
shift

# Keep in step with PACKAGES in src/eval/copybench.rs.
packages=(tuxpaint-stamps-default opencv-doc mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]} (about 600 MB with opencv-doc's MathJax)"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    # Update the package lists only when they are missing or older than a day.
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
        $sudo apt-get update -qq
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for p in "${packages[@]}"; do
    echo "   $p $(dpkg-query -W -f='${Version}' "$p")"
done

echo "== release binary"
cargo build --release --locked --quiet --bin pwself-engine

echo "== building the benchmark in $out"
target/release/pwself-engine eval copy-bench --out "$out" "$@"
echo "== $(du -sh "$out" | cut -f1) in $out"
