#!/usr/bin/env bash
# The LoRA recovery runs behind the README numbers: for each ~35% depth-pruned model (13 of 30 layers removed by
# SLM's reference operator and by ShortGPT), LoRA with LM loss and with --distill (teacher: the dense GGUF) on the
# default corpus (LAMBADA windows of 256 tokens), the same 30-step budget (8 sequences per step: 61,440 tokens),
# merged, then W2 PPL (first 40 windows of 128) and avg-7 (first 200 docs per task). Roughly 15 min per run on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release -q -p slm-cli
slm=./target/release/slm
dense=models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p out/lora out/evals
[[ -f out/d-slm-35/config.json ]] || $slm depth "$dense" --out out/d-slm-35 --method slm --target-layers 13
[[ -f out/d-shortgpt-35/config.json ]] || $slm depth "$dense" --out out/d-shortgpt-35 --method shortgpt --target-layers 13
budget=(--max-steps 30 --batch-size 8 --micro-batch-size 4 --warmup-steps 3 --lr 5e-4 --val-size 32 --eval-steps 15 --merge)
evaluate() {  # MODEL NAME
  $slm eval "$1" --tasks wikitext2-128 --limit 40 --output-path "out/evals/$2-wikitext2-128.json"
  $slm eval "$1" --tasks avg7 --limit 200 --output-path "out/evals/$2-avg7.json"
}
for m in slm shortgpt; do
  evaluate "out/d-$m-35" "d-$m-35"
  $slm lora "out/d-$m-35" --out "out/lora/$m-35-lm" "${budget[@]}"
  evaluate "out/lora/$m-35-lm/merged" "$m-35-lm"
  $slm lora "out/d-$m-35" --out "out/lora/$m-35-distill" "${budget[@]}" --distill --teacher "$dense"
  evaluate "out/lora/$m-35-distill/merged" "$m-35-distill"
done
