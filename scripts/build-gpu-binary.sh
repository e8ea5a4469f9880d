#!/usr/bin/env bash
# Builds the release binary to carry to a GPU machine: installs the pinned CUDA compiler if
# needed, records the commit in the binary (`pwself-engine kernels` prints it, and so does
# scripts/gpu-check.sh's report), and strips the debug line tables (about 50 MB -> 12 MB, so
# it fits the 64 MiB the device tool carries).
# Usage: scripts/build-gpu-binary.sh   -> target/release/pwself-engine
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda-toolchain.sh
commit=$(git describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)
PWSELF_COMMIT="$commit" PWSELF_REQUIRE_KERNELS=1 cargo build --release --locked
strip target/release/pwself-engine
ls -l target/release/pwself-engine
target/release/pwself-engine kernels | sed -n 1,3p
