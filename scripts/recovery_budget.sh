#!/usr/bin/env bash
# Recovery budget study (issue 18): pruned models (depth, width or both) retrained with one recipe for several step budgets
# (8 x 256 tokens a step), each merged model evaluated on the first LIMIT documents of the seven tasks and
# WikiText-2 (the first LIMIT windows of 128); prints the table of scripts/recovery_table.py. Each run keeps its
# output: a rerun skips what exists (and `slm lora` resumes from its checkpoint when a run was killed).
#
# Env:
#   BASES   space-separated pruned models (default "slm-dp:13 shortgpt:13"): METHOD:LAYERS for `slm depth --method
#           METHOD --target-layers LAYERS`; width:RATIO for LLM-Pruner element1 (`slm width`) removing RATIO of
#           the parameters; DEPTH+width:RATIO for depth then width (`slm run` with budget 1-RATIO and depth share
#           0.5: the depth METHOD removes half by whole layers, width the rest), e.g. "slm-dp+width:0.35"
#   STEPS   space-separated step budgets (default "100 300"); warm-up is a tenth of the steps, validation every
#           max(25, steps/6) steps; as many epochs as the steps take (`--epochs 1000`: the steps are the cap)
#   RECIPE  klhid (default: --train layers on the layers next to the cuts, KL + hidden-state distillation from the
#           dense model, lr 2e-5), lm (the same layers, next-token loss), head3 (the last 3 layers and the LM head,
#           KL + hidden), last3 (the last 3 layers alone: the head, tied to the embedding here, stays as it is),
#           lora (LoRA r 8 on every projection, KL + hidden, lr 1e-4)
#   LR      a learning rate instead of the recipe's (the run's name gets -lrLR)
#   DATA    a training file for --data (e.g. the JSONL of `slm distill-data`); default: the LAMBADA windows
#   LIMIT   documents per task (200), OUT (out/recovery-budget), SLM_BIN (a built slm), SLM_MODEL (the dense GGUF)
#   FULL    1: also evaluate every base and recovered model on the seven tasks in full and WikiText-2 (every
#           window of 128), one task per directory OUT/full-NAME/TASK (a stopped run loses at most the task it was
#           in), and print their table after the LIMIT one
set -euo pipefail
if (($#)); then # settings come from the environment only; any argument prints the header above
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit $([[ "$1" == -h || "$1" == --help ]] && echo 0 || echo 2)
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bases="${BASES:-slm-dp:13 shortgpt:13}" steps_list="${STEPS:-100 300}" recipe="${RECIPE:-klhid}"
limit="${LIMIT:-200}" out="${OUT:-$root/out/recovery-budget}"
slm="${SLM_BIN:-$root/target/release/slm}"
model="${SLM_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
case "$recipe" in
  klhid) flags=(--train layers --objective kl=1,hidden=1 --lr 2e-5) ;;
  lm) flags=(--train layers --objective lm --lr 2e-5) ;;
  head3) flags=(--train layers --layers last:3 --train-head --objective kl=1,hidden=1 --lr 2e-5) ;;
  last3) flags=(--train layers --layers last:3 --objective kl=1,hidden=1 --lr 2e-5) ;;
  lora) flags=(--train lora --objective kl=1,hidden=1 --lr 1e-4) ;;
  *) echo "RECIPE must be klhid, lm, head3, last3 or lora, not '$recipe'" >&2; exit 2 ;;
esac
tag="$recipe"
if [[ -n "${LR:-}" ]]; then
  for i in "${!flags[@]}"; do [[ "${flags[i]}" != --lr ]] || flags[i + 1]="$LR"; done
  tag="$recipe-lr$LR"
fi
if [[ -n "${DATA:-}" ]]; then
  [[ -f "$DATA" ]] || { echo "DATA '$DATA' is not a file" >&2; exit 2; }
  flags+=(--data "$DATA")
  tag="$tag-$(basename "${DATA%.*}")"
fi
bash scripts/setup.sh >/dev/null
[[ -n "${SLM_BIN:-}" ]] || cargo build --release -q -p slm-cli
mkdir -p "$out"
done_in() { compgen -G "$1/*/results_*.json" >/dev/null; } # DIR: an evaluation finished there
evaluate() { # MODEL_DIR NAME
  done_in "$out/eval-$2" || "$slm" eval "$1" --tasks avg7,wikitext2-128 --limit "$limit" \
    --output-path "$out/eval-$2" --log-samples
  if [[ "${FULL:-}" == 1 ]]; then
    for task in boolq piqa winogrande arc_easy hellaswag arc_challenge openbookqa wikitext2-128; do
      done_in "$out/full-$2/$task" || "$slm" eval "$1" --tasks "$task" --output-path "$out/full-$2/$task" --log-samples
    done
  fi
}
build_with_run() { # NAME RATIO [DEPTH_METHOD]: prints the pruned model's directory
  local dir="$out/run-$1" budget steps
  budget=$(awk -v r="$2" 'BEGIN { printf "%.6g", 1 - r }')
  steps='{ step = "width" }'
  [[ -z "${3:-}" ]] || steps="{ step = \"depth\", method = \"$3\" }, $steps"
  printf 'model = "%s"\nout = "%s"\n\n[[pipeline]]\nname = "%s"\nbudget = %s\ndepth_share = 0.5\nsteps = [%s]\n' \
    "$model" "$dir" "$1" "$budget" "$steps" > "$out/run-$1.toml"
  "$slm" run "$out/run-$1.toml" >&2
  echo "$dir/$1/$([[ -z "${3:-}" ]] && echo 1 || echo 2)-width"
}
names=()
for b in $bases; do
  method="${b%%:*}" arg="${b#*:}"
  case "$method" in
    width | *+width)
      pruned="$method-$(awk -v r="$arg" 'BEGIN { printf "%d", 100 * r + 0.5 }')"
      depth_method=""
      [[ "$method" == width ]] || depth_method="${method%+width}"
      base="$(build_with_run "$pruned" "$arg" "$depth_method")" ;;
    *)
      pruned="$method-$arg" base="$out/$pruned"
      [[ -f "$base/slm_plan.json" ]] || "$slm" depth "$model" --method "$method" --target-layers "$arg" --out "$base" ;;
  esac
  evaluate "$base" "$pruned"
  names+=("$pruned")
  for steps in $steps_list; do
    name="$pruned-$tag-s$steps" eval_steps=$((steps / 6 > 25 ? steps / 6 : 25))
    [[ -f "$out/$name/merged/slm_plan.json" ]] || "$slm" lora "$base" --out "$out/$name" --merge --resume \
      --max-steps "$steps" --epochs 1000 --batch-size 8 --val-size 32 --warmup-steps $((steps / 10)) --eval-steps "$eval_steps" \
      "${flags[@]}"
    evaluate "$out/$name/merged" "$name"
    names+=("$name")
  done
done
python3 "$root/scripts/recovery_table.py" "$out" "${names[@]}"
[[ "${FULL:-}" != 1 ]] || python3 "$root/scripts/recovery_table.py" "$out" "${names[@]/#/full-}"
