#!/usr/bin/env bash
# Copies the full Fashion-MNIST (Debian's dataset-fashion-mnist, gzipped IDX, 30 MB) into
# data/fashion-mnist/ (git-ignored), for a GPU call to carry next to the binary:
#   carry: ["target/release/pwself-engine", "data/fashion-mnist"]
# gpu-check.sh's train stage prepares the packs from it on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
src=/usr/share/datasets/fashion-mnist
if [ ! -f "$src/train-images-idx3-ubyte.gz" ]; then
    [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit 2>/dev/null)" ] || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
mkdir -p data/fashion-mnist
cp "$src"/*-ubyte.gz data/fashion-mnist/
du -sh data/fashion-mnist
