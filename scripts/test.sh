#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need (Debian's
# Fashion-MNIST files for the real-data round trips), then formatting, lints and tests.
# Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "== installing dataset-fashion-mnist (real data for the ingest tests)"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

echo "== CUDA toolchain (nvcc 13.0 from PyPI: every kernel is compiled and assembled)"
scripts/install-cuda-toolchain.sh
# tests/cuda.rs then insists that the binary carries every kernel module.
export PWSELF_REQUIRE_KERNELS=1

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked "$@"
echo "== kernel resources (ptxas -v, sm_90 and sm_80)"
cargo run --locked --quiet -- kernels
