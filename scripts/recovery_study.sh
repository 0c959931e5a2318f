#!/usr/bin/env bash
# Recovery diagnosis (issue 18): a depth-pruned model, then LoRA runs that differ in one setting each, every model
# evaluated on the first LIMIT documents of the seven tasks with per-document records; prints one table: each
# task's metric (avg-7's choice), avg-7, the mean of the six without BoolQ, BoolQ's share of "yes" predictions
# (against the gold share) and the LoRA validation loss before and after. Steps whose output exists are kept.
#
# Env: METHOD (shortgpt), LAYERS (13), LIMIT (200), STEPS (30), BATCH (8), VARIANTS (a space-separated list of
#      name=flags, flags separated by commas, default: "lr5e-4=--lr=5e-4 lr1e-4=--lr=1e-4"), SLM_BIN (a built slm, for
#      a study that runs while the tree changes), TASKS (avg7,wikitext2-128:
#      the LLM-Pruner/SLM WikiText-2 perplexity, 128-token windows, the first LIMIT of them, gets its own column;
#      `wikitext` (lm-eval's document-level word perplexity, 8192-token windows here) takes about 25 minutes a
#      model on 2 cores), OUT (out/recovery-study). A variant's flags may name
#      --train layers (full tuning) or --distill; every variant is `slm lora BASE --max-steps STEPS ...`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
method="${METHOD:-shortgpt}" layers="${LAYERS:-13}" limit="${LIMIT:-200}" steps="${STEPS:-30}" batch="${BATCH:-8}"
out="${OUT:-$root/out/recovery-study}"
variants="${VARIANTS:-lr5e-4=--lr=5e-4 lr1e-4=--lr=1e-4}"
tasks="${TASKS:-avg7,wikitext2-128}"
slm="${SLM_BIN:-$root/target/release/slm}"
model="${SLM_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
bash scripts/setup.sh >/dev/null
[[ -n "${SLM_BIN:-}" ]] || cargo build --release -q -p slm-cli
mkdir -p "$out"
base="$out/$method-$layers"
[[ -f "$base/slm_plan.json" ]] || "$slm" depth "$model" --method "$method" --target-layers "$layers" --out "$base"
evaluate() { # MODEL_DIR NAME
  [[ -d "$out/eval-$2" ]] || "$slm" eval "$1" --tasks "$tasks" --limit "$limit" --output-path "$out/eval-$2" --log-samples
}
evaluate "$base" "$method-$layers"
names=("$method-$layers")
for v in $variants; do
  name="${v%%=*}" flags="${v#*=}"
  dir="$out/$method-$layers-$name"
  # shellcheck disable=SC2086  # flags are split on commas into separate arguments
  [[ -f "$dir/merged/slm_plan.json" ]] || "$slm" lora "$base" --max-steps "$steps" --batch-size "$batch" --val-size 32 \
    --merge --out "$dir" $(tr ',' ' ' <<< "$flags")
  evaluate "$dir/merged" "$method-$layers-$name"
  names+=("$method-$layers-$name")
done
python3 "$root/scripts/recovery_table.py" "$out" "${names[@]}"
