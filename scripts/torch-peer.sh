#!/usr/bin/env bash
# Runs the PyTorch peer of the training step (bench/torch_peer.py) with a Python that has
# torch, timm and numpy. Which Python:
#   1. $TORCH_PEER_PYTHON, if set (used as is; nothing is installed);
#   2. .venv-torch/ in the repo root, if it imports torch, timm and numpy;
#   3. the system python3, if it imports them (the GPU machines' image ships PyTorch and
#      timm, and cannot reach PyPI);
#   4. otherwise .venv-torch/ is created (python3 -m venv) and `pip install torch timm
#      numpy` fills it from PyPI (about 80 s and 5.5 GB; the default Linux wheel is the
#      CUDA build, so the same venv runs on CPU and GPU).
# Set TORCH_PEER_VENV=1 to skip step 3 and always use (or make) .venv-torch/.
#
#   scripts/torch-peer.sh --device cpu --arch femto --global-size 28 --local-size 12 \
#       --in-chans 1 --batch 64 --locals 6 --out-dim 512 --head-hidden 256 \
#       --head-bottleneck 64 --json
#   scripts/torch-peer.sh --device cuda --variant compile --arch small --batch 64 --json
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-torch"
check='import torch, timm, numpy'

have() { "$1" -c "$check" >/dev/null 2>&1; }

if [ -n "${TORCH_PEER_PYTHON:-}" ]; then
    py="$TORCH_PEER_PYTHON"
elif [ -x "$venv/bin/python" ] && have "$venv/bin/python"; then
    py="$venv/bin/python"
elif [ -z "${TORCH_PEER_VENV:-}" ] && have python3; then
    py="$(command -v python3)"
else
    echo "torch-peer: installing torch, timm and numpy into $venv (about 80 s, 5.5 GB)" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2 || true
    "$venv/bin/python" -m pip install --quiet torch timm numpy >&2
    py="$venv/bin/python"
    have "$py" || { echo "torch-peer: $py still cannot import torch, timm, numpy" >&2; exit 1; }
fi

# Versions go to stderr so that --json output on stdout stays one JSON object.
"$py" -c 'import sys, torch, timm, numpy
print(f"torch-peer: python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, "
      f"timm {timm.__version__}, numpy {numpy.__version__}, cuda available: {torch.cuda.is_available()}",
      file=sys.stderr)'
exec "$py" "$root/bench/torch_peer.py" "$@"
