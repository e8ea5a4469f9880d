#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, cicc, ptxas, headers) from PyPI into
# .cuda-toolchain/ at the repository root, where build.rs finds it. Idempotent: when the pinned
# versions are already there it only prints where nvcc is. Needs python3 with pip, and gcc (nvcc
# calls the host compiler even for -ptx).
#
# The pins are deliberate (DESIGN.md): nvcc 13.0 emits PTX ISA 9.0, which driver 580 loads.
# nvidia-nvvm must be pinned by hand, or pip picks a newer cicc whose PTX the 13.0 ptxas and the
# driver reject.
set -euo pipefail
cd "$(dirname "$0")/.."

dest=.cuda-toolchain
pins=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
)
stamp="$dest/.pins"
nvcc="$dest/nvidia/cu13/bin/nvcc"

if [ -x "$nvcc" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${pins[*]}" ]; then
    echo "CUDA toolchain already installed: $nvcc"
    exit 0
fi

command -v python3 >/dev/null || { echo "install-cuda-toolchain: python3 is needed (apt-get install python3-pip)" >&2; exit 1; }
command -v gcc >/dev/null || { echo "install-cuda-toolchain: gcc is needed by nvcc (apt-get install gcc)" >&2; exit 1; }

echo "== installing the CUDA 13.0 compiler from PyPI into $dest"
rm -rf "$dest"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$dest" "${pins[@]}"
echo "${pins[*]}" > "$stamp"
"$nvcc" --version | tail -n 2
# build.rs watches kernels/: touching it makes the next cargo build compile the kernels.
touch kernels
echo "nvcc: $nvcc"
