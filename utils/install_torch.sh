#!/usr/bin/env bash
# Installs PyTorch into the active Python environment, in the build that fits this machine.
#
#   bash utils/install_torch.sh          # TORCH_SPEC=torch==2.13.0 by default
#
# * No NVIDIA GPU (no working `nvidia-smi`, no /proc/driver/nvidia) on Linux:
#   the CPU-only build from https://download.pytorch.org/whl/cpu
#   (about 190 MB to download, 0.75 GB installed). If that index cannot be
#   reached within 5 seconds, or installing from it fails, pip's default index
#   is used instead.
# * An NVIDIA GPU, or macOS: pip's default index. On Linux that is the CUDA
#   build (about 2.7 GB to download with its nvidia-* libraries, 5.5 GB
#   installed); on macOS it is the only build there is.
#
# TORCH_SPEC chooses the version; TORCH_BUILD=cpu or TORCH_BUILD=default
# skips the detection; TORCH_CPU_INDEX replaces the CPU index's address.
set -euo pipefail

spec=${TORCH_SPEC:-torch==2.13.0}
build=${TORCH_BUILD:-auto}
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
py=${PYTHON:-python}
nvidia_proc=${NVIDIA_PROC_DIR:-/proc/driver/nvidia}  # a test points this elsewhere

has_nvidia_gpu() {
    nvidia-smi -L >/dev/null 2>&1 || [ -e "$nvidia_proc" ]
}

# Answers within 5 s whether the index serves a page for torch.
reachable() {
    "$py" - "$1/torch/" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="HEAD"), timeout=5)
EOF
}

install_default() {
    echo "Installing $spec from the default index"
    "$py" -m pip install --quiet "$spec"
}

install_cpu() {
    echo "Installing $spec, the CPU-only build, from $cpu_index"
    "$py" -m pip install --quiet --index-url "$cpu_index" "$spec"
}

case "$build" in
    default) install_default; exit ;;
    cpu) install_cpu; exit ;;
    auto) ;;
    *) echo "error: TORCH_BUILD must be auto, cpu or default, not '$build'" >&2; exit 2 ;;
esac

if [ "$(uname -s)" = Darwin ]; then
    install_default  # macOS wheels on PyPI are CPU (and Metal) builds already
elif has_nvidia_gpu; then
    echo "NVIDIA GPU found: the CUDA build (about 2.7 GB to download)"
    install_default
elif ! reachable "$cpu_index"; then
    echo "No NVIDIA GPU, but the CPU-only index $cpu_index cannot be reached: using the default index"
    install_default
elif ! install_cpu; then
    echo "Installing from $cpu_index failed: using the default index"
    install_default
fi
