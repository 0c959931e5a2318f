#!/usr/bin/env bash
# Builds slm with CUDA (`--features cuda`) into target/cuda (the CPU build in target/release is left alone), and
# with --tests also the test executables that scripts/gpu_check.sh runs on a GPU machine, packed with the release
# `slm` into out/gpu-bundle/ (what that machine needs and nothing it would have to fetch).
#
# The toolkit: $CUDA_HOME when set, else the one whose `nvcc` is on the PATH, else CUDA 13.0 assembled from PyPI
# wheels into .cuda/ (nvcc, nvvm, crt and cccl headers, runtime, cuBLAS, cuRAND, NVRTC): no system CUDA needed.
# 13.0, not newer: candle embeds its kernels as PTX that the driver compiles when they load, and a driver takes
# PTX only from toolkits no newer than itself (driver 580 = CUDA 13.0). A machine with no GPU driver has no
# libcuda.so to link against: a stub with the driver API's symbols (made from cudarc's bindings, each returning
# an error) stands in at link time, as the CUDA toolkit's own lib64/stubs/libcuda.so does; at run time the real
# driver's libcuda.so.1 is used.
#
# Env: CUDA_HOME (a toolkit to use), CUDA_COMPUTE_CAP (90: the GPU's compute capability, no dot),
#      CARGO_TARGET_DIR (target/cuda).
# Usage: bash scripts/build_cuda.sh [--tests]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tests=""
for a in "$@"; do
  case "$a" in
    --tests) tests=1 ;;
    *) echo "build_cuda.sh: unknown argument '$a' (expected --tests)" >&2; exit 2 ;;
  esac
done
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/cuda}"
say() { echo "build_cuda: $*" >&2; }

# ---- the toolkit ----
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null 2>&1; then
  CUDA_HOME="$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)"
fi
own=""
if [[ -z "${CUDA_HOME:-}" ]]; then
  own=1
  tk="$root/.cuda/pypi"
  CUDA_HOME="$tk/nvidia/cu13"
  wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)
  stamp="$tk/.wheels"
  if [[ ! -x "$CUDA_HOME/bin/nvcc" || "$(cat "$stamp" 2>/dev/null)" != "${wheels[*]}" ]]; then
    say "fetching CUDA 13.0 from PyPI (${wheels[*]}) into .cuda/"
    rm -rf "$tk" "$root/.cuda/wheels"
    mkdir -p "$root/.cuda/wheels" "$tk"
    python3 -m pip download -q --disable-pip-version-check --no-deps -d "$root/.cuda/wheels" "${wheels[@]}"
    for w in "$root"/.cuda/wheels/*.whl; do python3 -m zipfile -e "$w" "$tk"; done
    chmod +x "$CUDA_HOME"/bin/* "$CUDA_HOME"/nvvm/bin/* 2>/dev/null || true
    echo "${wheels[*]}" > "$stamp"
  fi
fi
export CUDA_HOME
[[ -x "$CUDA_HOME/bin/nvcc" ]] || { say "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME to a CUDA toolkit)"; exit 1; }
export PATH="$CUDA_HOME/bin:$PATH"
say "toolkit $CUDA_HOME: $(nvcc --version | grep -o 'release [0-9.]*'), compute capability $CUDA_COMPUTE_CAP"

# ---- link names: wheels carry only versioned libraries (libcublas.so.13); the linker looks for libcublas.so ----
# Made inside the toolkit only when it is the one assembled here; a user's toolkit is never written to: what it
# lacks goes to .cuda/link, passed to the linker with RUSTFLAGS.
if [[ -n "$own" ]]; then
  lib="$CUDA_HOME/lib"
  for n in cublas cublasLt curand nvrtc cudart; do
    if [[ ! -e "$lib/lib$n.so" ]]; then
      v="$(ls "$lib"/lib"$n".so.[0-9]* 2>/dev/null | head -1 || true)"
      [[ -n "$v" ]] && ln -sf "$(basename "$v")" "$lib/lib$n.so"
    fi
  done
else
  lib="$root/.cuda/link"
  mkdir -p "$lib/stubs"
  export RUSTFLAGS="${RUSTFLAGS:-} -L native=$lib -L native=$lib/stubs"
fi

# ---- libcuda.so: the driver's, the toolkit's stub, or one made here ----
have_libcuda() {
  ldconfig -p 2>/dev/null | grep -q 'libcuda\.so ' && return 0
  for d in "$CUDA_HOME"/lib "$CUDA_HOME"/lib64 "$CUDA_HOME"/lib/stubs "$CUDA_HOME"/lib64/stubs \
    "$CUDA_HOME"/targets/x86_64-linux/lib/stubs; do
    [[ -e "$d/libcuda.so" ]] && return 0
  done
  return 1
}
if ! have_libcuda; then
  cargo fetch -q
  cudarc_version="$(awk '/^name = "cudarc"/{getline; gsub(/[^0-9.]/, ""); print}' Cargo.lock | head -1)"
  sys="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc_version"/src/driver/sys/mod.rs | head -1)"
  [[ -f "$sys" ]] || { say "cudarc $cudarc_version's driver bindings not found (cargo fetch failed?)"; exit 1; }
  mkdir -p "$lib/stubs"
  # Every driver function cudarc binds, returning CUDA_ERROR_UNKNOWN (999): enough to link, never to run.
  grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$sys" | sed 's/^pub unsafe fn //' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' > "$lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$lib/stubs/libcuda.so" "$lib/stubs/libcuda_stub.c"
  say "no GPU driver here: linking against a stub libcuda.so ($(wc -l < "$lib/stubs/libcuda_stub.c") symbols)"
fi

# ---- build ----
say "cargo build --release --features cuda -p slm-cli (into $CARGO_TARGET_DIR)"
cargo build --release --features cuda -p slm-cli
# A run here without a GPU driver needs the stub under its soname; the GPU machine never sees this folder.
[[ -e "$lib/stubs/libcuda.so" && ! -e "$lib/stubs/libcuda.so.1" ]] && ln -sf libcuda.so "$lib/stubs/libcuda.so.1"
say "built $CARGO_TARGET_DIR/release/slm"
[[ -n "$tests" ]] || exit 0

# ---- test executables and the bundle for scripts/gpu_check.sh ----
# The tests that gpu_check.sh runs: golden logits (slm-model), golden lm-eval (slm-eval). Other crates' tests run on
# the CPU; on the GPU their work is covered through the `slm` commands the check runs.
bundle="$root/out/gpu-bundle"
rm -rf "$bundle.tmp" && mkdir -p "$bundle.tmp/bin"
cp "$CARGO_TARGET_DIR/release/slm" "$bundle.tmp/bin/slm"
for t in slm-model:golden_logits slm-eval:golden_lm_eval; do
  pkg="${t%%:*}" name="${t##*:}"
  exe="$(cargo test --release --features cuda -p "$pkg" --test "$name" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -1)"
  [[ -x "$exe" ]] || { say "test executable $pkg/$name was not built"; exit 1; }
  cp "$exe" "$bundle.tmp/bin/$name"
done
strip "$bundle.tmp"/bin/* 2>/dev/null || true
rm -rf "$bundle" && mv "$bundle.tmp" "$bundle"
say "bundle: $bundle ($(du -sh "$bundle" | cut -f1)): $(ls "$bundle/bin" | tr '\n' ' ')"

# ---- the parcel for a GPU machine reached through a per-call transfer limit ----
# The bundle and the default model, xz-compressed, cut into PART_MB pieces (18 MiB: what the repository's own 45 MB
# leave of a 64 MiB transfer), with a manifest (piece count, sha256 of the whole). Send one piece per call, the
# manifest with the last, then run scripts/gpu_check.sh, which joins them.
send="$root/.gpu-send"
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[[ -f "$model" ]] || bash scripts/setup.sh >/dev/null
rm -rf "$send.tmp" && mkdir -p "$send.tmp"
tar -C "$root" -c out/gpu-bundle models/SmolLM2-135M-Instruct.Q4_1.gguf | xz -T0 -6 > "$send.tmp/parcel.tar.xz"
split -b "${PART_MB:-18}M" -d -a 2 "$send.tmp/parcel.tar.xz" "$send.tmp/part-"
echo "parts $(ls "$send.tmp"/part-* | wc -l) sha256 $(sha256sum < "$send.tmp/parcel.tar.xz" | cut -d' ' -f1)" \
  > "$send.tmp/MANIFEST"
rm "$send.tmp/parcel.tar.xz"
rm -rf "$send" && mv "$send.tmp" "$send"
say "parcel: $send: $(cat "$send/MANIFEST") ($(du -sh "$send" | cut -f1))"
