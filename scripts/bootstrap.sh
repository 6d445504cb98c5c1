#!/usr/bin/env bash
# Idempotent set-up of everything effnet needs on a fresh Debian machine with
# rustup's Rust, gcc and Python 3.11:
#
#   scripts/bootstrap.sh            build venv: libtorch from the PyPI torch wheel (CPU-only set)
#   scripts/bootstrap.sh reference  + the Python reference stack (full torch deps, torchvision,
#                                   timm, safetensors, numpy) used by parity tests and benchmarks
#
# EFFNET_TORCH=cuda installs torch with its full CUDA wheel set (GPU nodes; build with
# `make build CUDA=1` so the binary links libtorch_cuda).
#
# Everything lands in the project-local .venv (ignored by git). `.venv/libtorch` is a
# stable link to the wheel's torch folder; .cargo/config.toml points LIBTORCH at it.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
TORCH_VERSION="2.11.0"
TORCHVISION_VERSION="0.26.0"
TIMM_VERSION="1.0.31"
# Python side of tests and benchmarks: the S3 test server, the data-loader baseline, the
# photographs that seed the JPEG benchmark corpus, and the Kubernetes schemas infra/k8s is
# validated against offline.
REFERENCE_EXTRAS=("moto[server]==5.2.5" "pillow==13.0.0" "pyarrow==26.0.1" "scikit-image==0.26.0"
  "kubernetes-validate==1.33.1")
# The two CUDA wheels libtorch_cpu.so links against, even on CPU-only machines.
CPU_EXTRA=("nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cupti==13.0.85")
FLAVOUR="${EFFNET_TORCH:-cpu}"
WANT_REFERENCE=0
[[ "${1:-}" == "reference" ]] && WANT_REFERENCE=1

log() { echo "bootstrap: $*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

installed_version() { "$VENV/bin/python" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }

if [[ "$(installed_version torch)" != "$TORCH_VERSION"* ]]; then
  case "$FLAVOUR" in
    cpu)  log "installing torch==$TORCH_VERSION (CPU-only wheel set)"
          "${PIP[@]}" --no-deps "torch==$TORCH_VERSION" "${CPU_EXTRA[@]}" ;;
    cuda) log "installing torch==$TORCH_VERSION with its CUDA wheels"
          "${PIP[@]}" "torch==$TORCH_VERSION" ;;
    *)    echo "bootstrap: EFFNET_TORCH must be cpu or cuda, got '$FLAVOUR'" >&2; exit 2 ;;
  esac
elif [[ "$FLAVOUR" == "cuda" ]]; then
  "${PIP[@]}" "torch==$TORCH_VERSION"   # adds any missing CUDA wheels, no-op when complete
fi

if [[ $WANT_REFERENCE == 1 ]]; then
  # Python's `import torch` loads cuDNN, cuBLAS, ... so the reference stack needs torch's
  # full dependency set. pip keeps torch itself and only adds what is missing.
  if ! "$VENV/bin/python" -c "import torch, torchvision, timm, safetensors, numpy, moto, PIL, pyarrow, skimage, kubernetes_validate" 2>/dev/null; then
    log "installing the Python reference stack (torchvision, timm, full torch deps, moto, pillow, pyarrow, scikit-image, kubernetes-validate)"
    "${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
      "timm==$TIMM_VERSION" safetensors numpy "${REFERENCE_EXTRAS[@]}"
  fi
fi

# Stable path for LIBTORCH, whatever the Python minor version.
TORCH_DIR="$("$VENV/bin/python" - "$VENV" <<'PY'
import importlib.util, os, sys
spec = importlib.util.find_spec("torch")
print(os.path.relpath(os.path.dirname(spec.origin), sys.argv[1]))
PY
)"
ln -sfn "$TORCH_DIR" "$VENV/libtorch"
# cudarc loads NCCL as `libnccl.so`; the nvidia-nccl wheel ships `libnccl.so.2`. CUDA builds of
# effnet carry .venv/nccl in their rpath.
NCCL_SO="$(find "$VENV/lib" -path '*nvidia/nccl/lib/libnccl.so.2' 2>/dev/null | head -1)"
if [[ -n "$NCCL_SO" ]]; then
  mkdir -p "$VENV/nccl"
  ln -sfn "$NCCL_SO" "$VENV/nccl/libnccl.so"
fi
[[ -f "$VENV/libtorch/lib/libtorch_cpu.so" ]] || { echo "bootstrap: libtorch_cpu.so missing under $VENV/$TORCH_DIR" >&2; exit 1; }

# Debian packages: Fashion-MNIST for the demo and tests, Open MPI (CPU collectives; the `mpi`
# crate builds its bindings with libclang), for the tests headless Chromium (the report's HTML
# is opened in it) and Slurm with munge (a real cluster on loopback runs infra/slurm/effnet.sbatch),
# plus any named in EFFNET_APT_PACKAGES.
# Installed only when root; otherwise a missing one is reported by whatever needs it.
APT_PACKAGES="dataset-fashion-mnist openmpi-bin libopenmpi-dev libclang-dev pkg-config ${EFFNET_APT_PACKAGES:-}"
[[ $WANT_REFERENCE == 1 ]] && APT_PACKAGES+=" chromium slurm-wlm munge"
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  missing=()
  for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if (( ${#missing[@]} )); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
log "ready (torch $(installed_version torch), flavour $FLAVOUR)"
