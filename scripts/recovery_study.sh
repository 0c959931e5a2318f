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
python3 - "$out" "${names[@]}" <<'PY'
import glob, json, sys
out, names = sys.argv[1], sys.argv[2:]
metric = {"boolq": "acc", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc",
          "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
print("| model | " + " | ".join(metric) + " | avg-7 | avg-6 (no BoolQ) | BoolQ predicted yes (gold) | WikiText-2 ppl | val loss before -> after |")
print("|---" * (len(metric) + 6) + "|")
for n in names:
    res = json.load(open(glob.glob(f"{out}/eval-{n}/*/results_*.json")[0]))["results"]
    vals = {t: res[t][f"{m},none"] for t, m in metric.items()}
    bq = [json.loads(l) for l in open(glob.glob(f"{out}/eval-{n}/*/samples_boolq_*.jsonl")[0])]
    yes = sum(s["loglikelihood"][1] > s["loglikelihood"][0] for s in bq) / len(bq)
    gold = sum(s["gold"] == 1 for s in bq) / len(bq)
    val = ""
    lora = glob.glob(f"{out}/{n}/slm_lora.json")
    if lora:
        r = json.load(open(lora[0]))
        val = f"{r['val_before']['loss']:.3f} -> {r['report']['best_val_loss']:.3f}" if r.get("val_before") else ""
    ppl = (f"{res['wikitext2-128']['perplexity,none']:.2f}" if "wikitext2-128" in res
           else f"{res['wikitext']['word_perplexity,none']:.2f} (word)" if "wikitext" in res else "")
    a7 = sum(vals.values()) / 7
    a6 = sum(v for t, v in vals.items() if t != "boolq") / 6
    print(f"| {n} | " + " | ".join(f"{100 * vals[t]:.2f}" for t in metric)
          + f" | {100 * a7:.2f} | {100 * a6:.2f} | {100 * yes:.1f}% ({100 * gold:.1f}%) | {ppl} | {val} |")
PY
