#!/usr/bin/env bash
# The README's first command: set everything up and run the main job on the default model.
# Today: fetch the model, build, inspect it, export it as an HF directory, and a WikiText-2 perplexity smoke run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo build --release -p slm-cli
slm="${CARGO_TARGET_DIR:-$root/target}/release/slm"
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
"$slm" inspect "$model"
"$slm" export "$model" --out out/smollm2-135m-f32 --dtype f32
# LLM-Pruner/SLM protocol: non-overlapping 128-token windows of WikiText-2 test; the first 16 windows here.
"$slm" eval out/smollm2-135m-f32 --tasks wikitext2-128 --limit "${PPL_WINDOWS:-16}"
