#!/usr/bin/env bash
# timm interoperability check (docs/interop.md), both directions, on the CPU:
#   1. two configurations: a ViT-Tiny/16 at 32/16 pixels on a small RGB pack made from
#      generated images (`prepare folder`), and the default femto ViT (patch 4, grey 28x28,
#      the embedded Fashion-MNIST subset); 2 training steps each;
#   2. engine -> timm: `export --probe-input 8` writes the teacher as a timm state dict, the
#      probe images as the model sees them and the engine's CLS of them; timm's
#      VisionTransformer (and timm.create_model('vit_tiny_patch16_224', img_size=32) where the
#      sizes have a timm name) load it
#      with strict=True and their forward_features(x)[:, 0] must match to 1e-4 relative;
#   3. timm -> engine: a randomly initialised timm ViT of the same configuration is saved with
#      safetensors; `train --init` starts from it (one step at lr 0, so the teacher is the
#      file's weights), `export --probe-input` computes the engine's CLS, which must match
#      timm's to 1e-4 relative.
# Python: $TORCH_PEER_PYTHON, else .venv-torch/, else the system python3 (the same choice as
# scripts/torch-peer.sh, which installs .venv-torch/ when none has torch: run it once).
# The binary: $PWSELF_BIN, else target/release/pwself-engine (built when missing).
# Work files go to $INTEROP_DIR (default: a new temporary folder, kept and printed).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-torch"
check='import torch, timm, numpy, safetensors'
have() { "$1" -c "$check" >/dev/null 2>&1; }
if [ -n "${TORCH_PEER_PYTHON:-}" ]; then
    py="$TORCH_PEER_PYTHON"
elif [ -x "$venv/bin/python" ] && have "$venv/bin/python"; then
    py="$venv/bin/python"
elif have python3; then
    py="$(command -v python3)"
else
    echo "interop: no Python with torch, timm, numpy and safetensors; run scripts/torch-peer.sh --help once" \
         "(it installs .venv-torch/) or set TORCH_PEER_PYTHON" >&2
    exit 2
fi
bin="${PWSELF_BIN:-$root/target/release/pwself-engine}"
if [ ! -x "$bin" ]; then
    (cd "$root" && cargo build --release)
fi
work="${INTEROP_DIR:-$(mktemp -d -t pwself-interop.XXXXXX)}"
mkdir -p "$work"
echo "interop: work folder $work" >&2
"$py" -c 'import sys, torch, timm, numpy, safetensors
print(f"interop: python {sys.version.split()[0]}, torch {torch.__version__}, timm {timm.__version__}, "
      f"numpy {numpy.__version__}, safetensors {safetensors.__version__}", file=sys.stderr)'
"$bin" --version >&2
check_py="$root/bench/interop_check.py"

"$py" "$check_py" images --out "$work/images" --n 8 --side 40
"$bin" prepare folder "$work/images" --side 32 --channels 3 --out "$work/pack.pwpack"

# One configuration, both directions: `case NAME TRAIN_FLAGS...` (export's --probe-input reads
# the run's own training pack).
case_() {
    local name="$1"; shift
    local d="$work/$name"
    mkdir -p "$d"
    echo "interop: case $name: $*" >&2
    "$bin" train "$@" --batch 4 --epochs 1 --seed 3 --max-steps 2 --out "$d/run" --json > "$d/train.json"

    # engine -> timm
    "$bin" export --checkpoint "$d/run" --out "$d/teacher.safetensors" --probe-input 8 \
        --probe-dir "$d/forward"
    "$py" "$check_py" forward --weights "$d/teacher.safetensors" --probe-dir "$d/forward" \
        | tee "$d/forward.json"

    # timm -> engine
    "$py" "$check_py" make-timm --like "$d/teacher.safetensors" --probe-dir "$d/forward" \
        --out "$d/timm_init.safetensors" --cls-out "$d/timm_cls.npy"
    "$bin" train "$@" --batch 4 --epochs 1 --seed 3 --max-steps 1 --lr 0 \
        --init "$d/timm_init.safetensors" --out "$d/run-init"
    "$bin" export --checkpoint "$d/run-init" --out "$d/reimported.safetensors" --probe-input 8 \
        --probe-dir "$d/reverse" > /dev/null
    "$py" "$check_py" compare --engine "$d/reverse/probe_cls.npy" --timm "$d/timm_cls.npy" \
        --input-a "$d/forward/probe_input.npy" --input-b "$d/reverse/probe_input.npy" \
        | tee "$d/reverse.json"
}

# ViT-Tiny/16 (timm's vit_tiny_patch16_224 at img_size 32) on the generated RGB pack.
case_ rgb-tiny16 --data "$work/pack.pwpack" --arch tiny --patch 16 --view-sides 32,16
# The default job's network (femto, 64 wide, 4 blocks, 2 heads; a custom VisionTransformer)
# on the embedded grey 28x28 Fashion-MNIST subset, patch 4, in_chans 1.
case_ grey-femto4 --arch femto --patch 4 --view-sides 28,12
echo "interop: both directions agree to 1e-4 relative in every case (files in $work)" >&2
