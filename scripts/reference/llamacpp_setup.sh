#!/usr/bin/env bash
# Installs llama.cpp for the reference check (scripts/llamacpp_check.sh) into .llamacpp/ (ignored by git):
# node-llama-cpp 3.22.1 from npm with its prebuilt CPU binaries (@node-llama-cpp/linux-x64 3.22.1, llama.cpp
# release v0.5.0, which knows the `deci` architecture). Chosen over llama-cpp-python because nothing is compiled
# (llama-cpp-python builds llama.cpp with cmake from source: tens of minutes on 2 cores) and its
# controlledEvaluate returns the raw logits of every position. Needs node and npm. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="$root/.llamacpp"
if [[ -f "$dest/node_modules/node-llama-cpp/dist/index.js" && -d "$dest/node_modules/@node-llama-cpp/linux-x64" ]]; then
  echo "llamacpp_setup: present in $dest"
  exit 0
fi
mkdir -p "$dest"
cd "$dest"
[[ -f package.json ]] || echo '{"name": "slm-llamacpp-check", "private": true}' > package.json
# --omit=optional: only the CPU build (85 MB), not the CUDA and Vulkan ones (725 MB).
NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --no-audit --no-fund --omit=optional \
  node-llama-cpp@3.22.1 @node-llama-cpp/linux-x64@3.22.1 >/dev/null
echo "llamacpp_setup: installed node-llama-cpp 3.22.1 (llama.cpp v0.5.0, prebuilt CPU) in $dest"
