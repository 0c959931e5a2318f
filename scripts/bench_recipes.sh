#!/usr/bin/env bash
# Step time and peak RSS of the recovery study's training recipes (issue 18), for one or more slm binaries run
# alternately (ROUNDS times each, so machine noise hits every binary alike): STEPS optimiser steps of batch 8 x 256
# tokens of LAMBADA on MODEL (a pruned HF directory), the first step excluded from the step time. Prints one line
# per run (binary, recipe, round, seconds per step, tokens/s, peak RSS, the losses) and the medians per binary and
# recipe. The losses let two builds be checked for the same arithmetic.
#   MODEL=out/shortgpt-13 RECIPES="klhid head3" STEPS=3 ROUNDS=2 bash scripts/bench_recipes.sh OLD_SLM target/release/slm
# Recipes (the flags of scripts/recovery_budget.sh): klhid (the layers next to the cuts, KL + hidden-state
# distillation), head3 (the last 3 layers and the LM head, KL + hidden), lm (the layers next to the cuts, LM loss),
# lora (LoRA r 8, KL + hidden). With no binary given, target/release/slm (built first).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
model="${MODEL:-out/shortgpt-13}" recipes="${RECIPES:-klhid head3}" steps="${STEPS:-3}" rounds="${ROUNDS:-2}"
[[ -f "$model/config.json" ]] || { echo "MODEL '$model' is not an HF model directory (make one with slm depth)" >&2; exit 2; }
((steps >= 2)) || { echo "STEPS must be at least 2 (the first step is excluded)" >&2; exit 2; }
bins=("$@")
if ((${#bins[@]} == 0)); then
  cargo build --release -q -p slm-cli
  bins=(target/release/slm)
fi
for b in "${bins[@]}"; do [[ -x "$b" ]] || { echo "'$b' is not an executable" >&2; exit 2; }; done
flags_of() {
  case "$1" in
    klhid) echo "--train layers --objective kl=1,hidden=1" ;;
    head3) echo "--train layers --layers last:3 --train-head --objective kl=1,hidden=1" ;;
    lm) echo "--train layers --objective lm" ;;
    lora) echo "--train lora --objective kl=1,hidden=1" ;;
    *) echo "unknown recipe '$1' (klhid, head3, lm, lora)" >&2; exit 2 ;;
  esac
}
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
log="$tmp/log"
echo "model $model, $steps steps of 8 x 256 tokens per run, $rounds rounds"
for round in $(seq "$rounds"); do
  for recipe in $recipes; do
    read -r -a flags <<<"$(flags_of "$recipe")"
    for i in "${!bins[@]}"; do
      rm -rf "$tmp/a"
      /usr/bin/time -f "%M" -o "$tmp/rss" "${bins[i]}" lora "$model" --data data/lambada_openai.test.jsonl --out "$tmp/a" \
        --max-steps "$steps" --val-size 0 --warmup-steps 0 --batch-size 8 "${flags[@]}" >/dev/null 2>"$tmp/err" \
        || { tail -3 "$tmp/err" >&2; exit 1; }
      python3 - "$tmp/a/slm_lora.json" "$tmp/rss" "${bins[i]}" "$recipe" "$round" <<'PY' | tee -a "$log"
import json, sys
h = json.load(open(sys.argv[1]))["report"]["history"]
tok = h[-1]["tokens"] - h[0]["tokens"]; sec = h[-1]["seconds"] - h[0]["seconds"]
rss = int(open(sys.argv[2]).read().split()[-1]) // 1024
print(f"{sys.argv[3]}\t{sys.argv[4]}\t{sys.argv[5]}\t{sec / (len(h) - 1):.2f}\t{tok / sec:.1f}\t{rss}\t"
      + " ".join(f"{x['loss']:.5f}" for x in h))
PY
    done
  done
done
python3 - "$log" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
print("\n| binary | recipe | s/step (median) | tokens/s (median) | peak RSS MiB (median) | runs |")
print("|---|---|---|---|---|---|")
seen = []
for r in rows:
    if (r[0], r[1]) not in seen:
        seen.append((r[0], r[1]))
for b, rec in seen:
    mine = [r for r in rows if r[0] == b and r[1] == rec]
    med = lambda k: statistics.median(float(r[k]) for r in mine)
    print(f"| {b} | {rec} | {med(3):.2f} | {med(4):.1f} | {med(5):.0f} | {len(mine)} |")
PY
