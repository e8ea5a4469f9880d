#!/usr/bin/env bash
# Rebuilds the embedded default dataset (train.pwpack.gz, test.pwpack.gz) from Debian's
# dataset-fashion-mnist package. Deterministic: same package + same pwself-engine -> same bytes.
#
#   datasets/fashion-mnist-10k/rebuild.sh            # builds the release binary first
#   PWSELF_BIN=path/to/pwself-engine datasets/fashion-mnist-10k/rebuild.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
src=/usr/share/datasets/fashion-mnist

if [ ! -f "$src/train-images-idx3-ubyte.gz" ]; then
    echo "installing Debian's dataset-fashion-mnist (needs root)..." >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update
    $sudo apt-get install -y dataset-fashion-mnist
fi

# The library embeds these two files with include_bytes!: if they are missing, create empty
# placeholders so the binary can be built (default_pack then fails at run time, which the
# prepare command does not need).
for split in train test; do
    [ -e "$here/$split.pwpack.gz" ] || : > "$here/$split.pwpack.gz"
done

bin="${PWSELF_BIN:-}"
if [ -z "$bin" ]; then
    (cd "$repo" && cargo build --release --bin pwself-engine)
    bin="$(cd "$repo" && cargo metadata --format-version 1 --no-deps \
        | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/pwself-engine"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Train: the first 1,000 images of each class of the 60,000 (file order).
"$bin" prepare idx \
    --images "$src/train-images-idx3-ubyte.gz" --labels "$src/train-labels-idx1-ubyte.gz" \
    --classes fashion-mnist --balanced --limit 10000 --out "$work/train.pwpack"
# Test: the first 200 images of each class of the 10,000 (the first 2,000 in file order are
# not balanced, so --balanced here too).
"$bin" prepare idx \
    --images "$src/t10k-images-idx3-ubyte.gz" --labels "$src/t10k-labels-idx1-ubyte.gz" \
    --classes fashion-mnist --balanced --limit 2000 --out "$work/test.pwpack"

for split in train test; do
    gzip -n -9 -c "$work/$split.pwpack" > "$work/$split.pwpack.gz"
    mv "$work/$split.pwpack.gz" "$here/$split.pwpack.gz"
done
ls -l "$here"/*.pwpack.gz
sha256sum "$here"/*.pwpack.gz
