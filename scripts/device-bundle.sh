#!/usr/bin/env bash
# Pack what scripts/device-check.sh needs on a GPU machine that has torch 2.11.0 (CUDA) in a Python
# environment but no Rust, no build tools and no network:
#
#   make device-bundle            (= EFFNET_TORCH=cuda scripts/device-bundle.sh)
#
# 1. The CUDA build (`make build CUDA=1`: torch 2.11.0's CUDA wheels, libtorch_cuda linked) of
#    `effnet` and of `effnet-collective-check` (the collective conformance suite), in release.
# 2. Each binary split: debug info to target/release/NAME-device.debug (kept here, for symbolising
#    a backtrace later), the rest to target/release/NAME-device (`objcopy --strip-debug`, which
#    keeps the symbol table, so panics still name functions). ~220 MB becomes ~50 MB.
# 3. The system libraries the binaries load that neither glibc/libstdc++ nor the torch venv provide
#    (Open MPI and its dependencies: the binaries link libmpi even when they run NCCL), in case the
#    GPU machine lacks them; device-check.sh uses one only when `ldd` says it is missing there.
# 4. All of it, with a MANIFEST.json (commit, torch version, sizes), in
#    target/device/effnet-device.tar.xz (~15 MB). Copy the repository together with target/device
#    to the GPU machine (target/ is ignored by git: name target/device explicitly when the copy
#    follows git's rules) and run scripts/device-check.sh there.
#
# The binaries' RUNPATH points at this machine's .venv; on the GPU machine device-check.sh sets
# LD_LIBRARY_PATH to that machine's torch, which takes precedence over RUNPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
CARGO="${CARGO:-cargo}"
export EFFNET_TORCH=cuda
OUT_DIR=target/device
TARBALL="$OUT_DIR/effnet-device.tar.xz"
BINARIES=(effnet effnet-collective-check)

log() { echo "device-bundle: $*" >&2; }

scripts/bootstrap.sh
"$CARGO" build --release -p effnet-cli -p effnet-collective --bins --features effnet-cli/cuda

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin" "$STAGE/lib" "$OUT_DIR"

for name in "${BINARIES[@]}"; do
  built="target/release/$name"
  [[ -x "$built" ]] || { log "$built was not built"; exit 1; }
  objcopy --only-keep-debug "$built" "target/release/$name-device.debug"
  objcopy --strip-debug --add-gnu-debuglink="target/release/$name-device.debug" "$built" "target/release/$name-device"
  cp "target/release/$name-device" "$STAGE/bin/$name"
  log "$name: $(du -h "$built" | cut -f1) -> $(du -h "$STAGE/bin/$name" | cut -f1) stripped"
done

# The CUDA build must carry libtorch_cuda, or CUDA is never seen at run time (build.rs's --no-as-needed).
if ! readelf -d "$STAGE/bin/effnet" | grep -q 'libtorch_cuda.so'; then
  log "target/release/effnet does not link libtorch_cuda: not a CUDA build"
  exit 1
fi

# System libraries outside the venv and outside glibc / the GCC runtime, by soname.
VENV_REAL="$(cd .venv && pwd -P)"
is_base() {
  case "$1" in
    linux-vdso.so.*|ld-linux*|libc.so.*|libm.so.*|libdl.so.*|librt.so.*|libpthread.so.*|libutil.so.*|\
    libresolv.so.*|libstdc++.so.*|libgcc_s.so.*) return 0 ;;
    *) return 1 ;;
  esac
}
missing=0
for name in "${BINARIES[@]}"; do
  while read -r soname arrow path _; do
    [[ "$arrow" == "=>" ]] || continue
    if [[ "$path" == "not" ]]; then log "$name: $soname not found on this machine"; missing=1; continue; fi
    is_base "$soname" && continue
    real="$(readlink -f "$path")"
    [[ "$real" == "$VENV_REAL"/* ]] && continue
    cp -L "$path" "$STAGE/lib/$soname"
  done < <(ldd "target/release/$name")
done
(( missing == 0 )) || exit 1

torch_version="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))')"
commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
dirty="$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo true || echo false)"
.venv/bin/python - "$STAGE" "$torch_version" "$commit" "$dirty" <<'PY'
import hashlib, json, os, sys, time
stage, torch_version, commit, dirty = sys.argv[1:]
files = {}
for folder in ("bin", "lib"):
    for name in sorted(os.listdir(os.path.join(stage, folder))):
        path = os.path.join(stage, folder, name)
        with open(path, "rb") as f:
            files[f"{folder}/{name}"] = {"bytes": os.path.getsize(path), "sha256": hashlib.sha256(f.read()).hexdigest()}
manifest = {"built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
            "dirty": dirty == "true", "torch": torch_version, "flavour": "cuda", "files": files}
with open(os.path.join(stage, "MANIFEST.json"), "w") as f:
    json.dump(manifest, f, indent=1)
PY

rm -f "$TARBALL"
XZ_OPT="${XZ_OPT:--6 -T0}" tar -C "$STAGE" -cJf "$TARBALL" .
log "wrote $ROOT/$TARBALL ($(du -h "$TARBALL" | cut -f1)): $(cd "$STAGE" && echo bin/* lib/*)"
