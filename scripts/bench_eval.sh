#!/usr/bin/env bash
# Zero-shot evaluation speed of `slm eval` against lm-evaluation-harness 0.4.13 (`--model hf`), f32, CPU, on the
# first LIMIT documents (default 100) of boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge and
# openbookqa, same batch size (BATCH, default 16). Each side is timed as one whole process (model load, task
# set-up, scoring, results file), after the venv / export / dataset-cache set-up. Prints a table of wall seconds
# and documents/s, the ratio slm / lm-eval, lm-eval's and slm's acc / acc_norm per task side by side, and how
# far lm-eval's per-document log-likelihoods are from golden/lm-eval-first25 on the shared documents
# (proof that the offline task configs below are lm-eval's own).
#
# Offline: lm-eval reads data through generated task YAMLs (out/bench-eval/tasks/<task>_local.yaml):
# lm-eval 0.4.13's configs with `dataset_path: json` and `dataset_kwargs: {data_files: {<split>: <abs path>}}`,
# the same Python helpers (copied from the installed lm_eval package), and HF_*_OFFLINE=1.
#
# Env: LIMIT (100), BATCH (16), SKIP_BUILD=1 (do not run cargo), SKIP_SLM=1 / SKIP_LMEVAL=1 (run one side only).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
limit="${LIMIT:-100}"
batch="${BATCH:-16}"
tasks=(boolq piqa hellaswag winogrande arc_easy arc_challenge openbookqa)
tasks_csv="$(IFS=,; echo "${tasks[*]}")"
data="$(cd "$root/data" && pwd)"
golden="$(cd "$root/golden/lm-eval-first25" 2>/dev/null && pwd || true)"
work="$root/out/bench-eval"
hf="$root/out/bench-hf-f32"

# ---- set-up (not timed) ----
bash scripts/setup.sh >/dev/null
py="$(bash scripts/reference/lmeval_venv.sh)"
[[ -n "${SKIP_BUILD:-}" ]] || cargo build --release -q -p slm-cli
[[ -f "$hf/model.safetensors" ]] || ./target/release/slm export models/SmolLM2-135M-Instruct.Q4_1.gguf --out "$hf" 2>/dev/null
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export HF_DATASETS_CACHE="$work/hf-datasets" TOKENIZERS_PARALLELISM=false
rm -rf "$work/tasks" "$work/lm-eval" "$work/slm.json" "$work/lm-eval.log" "$work/slm.log"
mkdir -p "$work/tasks"

# Task YAMLs: lm-eval 0.4.13's built-in configs (lm_eval/tasks/{super_glue/boolq/default,piqa/piqa,
# hellaswag/hellaswag,winogrande/default,arc/arc_easy,arc/arc_challenge,openbookqa/openbookqa}.yaml) with the
# dataset swapped for the local JSONL and the fields that play no part in zero-shot scoring (tag, training_split,
# decontamination) dropped. Prompts, choices, targets, metrics are verbatim.
lmeval_tasks="$("$py" -c 'import lm_eval, os; print(os.path.join(os.path.dirname(lm_eval.__file__), "tasks"))')"
cp "$lmeval_tasks/hellaswag/utils.py" "$work/tasks/hellaswag_utils.py"
cp "$lmeval_tasks/winogrande/preprocess_winogrande.py" "$work/tasks/preprocess_winogrande.py"
task_yaml() {  # name, split, file, body
  cat > "$work/tasks/$1_local.yaml" <<EOF
task: $1_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    $2: $data/$3
output_type: multiple_choice
${2}_split: $2
$4
EOF
}
acc_metrics='metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0'
task_yaml boolq validation boolq.validation.jsonl 'doc_to_text: "{{passage}}\nQuestion: {{question}}?\nAnswer:"
doc_to_target: label
doc_to_choice: ["no", "yes"]
metric_list:
  - metric: acc
metadata:
  version: 2.0'
task_yaml piqa validation piqa.validation.jsonl 'doc_to_text: "Question: {{goal}}\nAnswer:"
doc_to_target: label
doc_to_choice: "{{[sol1, sol2]}}"
'"$acc_metrics"
task_yaml hellaswag validation hellaswag.validation.jsonl 'process_docs: !function hellaswag_utils.process_docs
doc_to_text: "{{query}}"
doc_to_target: "{{label}}"
doc_to_choice: "choices"
'"$acc_metrics"
task_yaml winogrande validation winogrande_xl.validation.jsonl 'doc_to_text: !function preprocess_winogrande.doc_to_text
doc_to_target: !function preprocess_winogrande.doc_to_target
doc_to_choice: !function preprocess_winogrande.doc_to_choice
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0'
for t in arc_easy arc_challenge; do
  task_yaml "$t" test "$t.test.jsonl" 'doc_to_text: "Question: {{question}}\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
'"$acc_metrics"
done
task_yaml openbookqa test openbookqa.test.jsonl 'doc_to_text: question_stem
doc_to_target: "{{choices.label.index(answerKey.lstrip())}}"
doc_to_choice: "{{choices.text}}"
'"$acc_metrics"

# Build the HF datasets cache for the seven files now (lm-eval would otherwise convert them on its first run,
# inside the timed region). Same arguments as lm-eval's ConfigurableTask.download, hence the same cache entries.
"$py" - "$data" <<'PY' >/dev/null 2>&1
import sys, datasets
d = sys.argv[1]
for split, f in [("validation", "boolq.validation.jsonl"), ("validation", "piqa.validation.jsonl"),
                 ("validation", "hellaswag.validation.jsonl"), ("validation", "winogrande_xl.validation.jsonl"),
                 ("test", "arc_easy.test.jsonl"), ("test", "arc_challenge.test.jsonl"), ("test", "openbookqa.test.jsonl")]:
    datasets.load_dataset(path="json", name=None, data_files={split: f"{d}/{f}"})
PY

now() { echo "$EPOCHREALTIME"; }
declare -A wall=()

# ---- lm-eval (timed) ----
if [[ -z "${SKIP_LMEVAL:-}" ]]; then
  local_tasks="$(printf '%s_local,' "${tasks[@]}")"
  echo "lm-eval: ${tasks_csv}, limit ${limit}, batch ${batch} (log: $work/lm-eval.log)" >&2
  t0="$(now)"
  "$py" -m lm_eval run --model hf --model_args "pretrained=$hf,dtype=float32" --device cpu \
    --tasks "${local_tasks%,}" --include_path "$work/tasks" --num_fewshot 0 --batch_size "$batch" \
    --limit "$limit" --output_path "$work/lm-eval" --log_samples > "$work/lm-eval.log" 2>&1 \
    || { tail -30 "$work/lm-eval.log" >&2; exit 1; }
  t1="$(now)"
  wall[lm-eval]="$(python3 -c "print($t1 - $t0)")"
fi

# ---- slm (timed) ----
if [[ -z "${SKIP_SLM:-}" ]]; then
  if ./target/release/slm eval --help >/dev/null 2>&1; then
    echo "slm eval: ${tasks_csv}, limit ${limit}, batch ${batch} (log: $work/slm.log)" >&2
    t0="$(now)"
    ./target/release/slm eval "$hf" --tasks "$tasks_csv" --limit "$limit" --batch-size "$batch" \
      --output-path "$work/slm.json" > "$work/slm.log" 2>&1 || { tail -30 "$work/slm.log" >&2; exit 1; }
    t1="$(now)"
    wall[slm]="$(python3 -c "print($t1 - $t0)")"
  else
    echo "slm eval: this build of slm has no 'eval' subcommand; skipped" >&2
  fi
fi

# ---- report ----
python3 - "$limit" "$data" "$work" "${golden:-}" "${wall[lm-eval]:-}" "${wall[slm]:-}" <<'PY'
import glob, json, os, sys
limit, data, work, golden, wall_lm, wall_slm = sys.argv[1:]
limit = int(limit)
files = {"boolq": "boolq.validation.jsonl", "piqa": "piqa.validation.jsonl", "hellaswag": "hellaswag.validation.jsonl",
         "winogrande": "winogrande_xl.validation.jsonl", "arc_easy": "arc_easy.test.jsonl",
         "arc_challenge": "arc_challenge.test.jsonl", "openbookqa": "openbookqa.test.jsonl"}
docs = sum(min(limit, sum(1 for _ in open(os.path.join(data, f), encoding="utf-8"))) for f in files.values())

def results_of(path):
    """{task: {metric: value}} from an lm-eval-style results file (task names without the _local suffix)."""
    if not path or not os.path.exists(path):
        return {}
    obj = json.load(open(path, encoding="utf-8"))
    res = obj.get("results", obj)
    out = {}
    for task, m in res.items():
        if isinstance(m, dict):
            out[task[:-len("_local")] if task.endswith("_local") else task] = m
    return out

lm_files = sorted(glob.glob(os.path.join(work, "lm-eval", "**", "results_*.json"), recursive=True))
lm = results_of(lm_files[-1] if lm_files else None)
slm_path = os.path.join(work, "slm.json")
if os.path.isdir(slm_path):
    found = sorted(glob.glob(os.path.join(slm_path, "**", "results*.json"), recursive=True))
    slm_path = found[-1] if found else None
slm = results_of(slm_path)

walls = {k: float(v) for k, v in (("lm-eval", wall_lm), ("slm", wall_slm)) if v}
print(f"\n{docs} documents ({len(files)} tasks, limit {limit}), zero-shot, f32, CPU\n")
print("| impl | wall s | docs/s |\n|---|---|---|")
for k, w in walls.items():
    print(f"| {k} | {w:.1f} | {docs / w:.2f} |")
if len(walls) == 2:
    print(f"\nratio slm / lm-eval (docs/s) = {walls['lm-eval'] / walls['slm']:.2f}x")
slm_log = os.path.join(work, "slm.log")
if os.path.exists(slm_log):
    for line in open(slm_log, encoding="utf-8"):
        if "useful compute:" in line:
            print("slm " + line[line.index("useful compute:"):].strip())

def fmt(r, t, m):
    v = r.get(t, {}).get(f"{m},none", r.get(t, {}).get(m))
    return "" if v is None else f"{v:.4f}"
print("\n| task | lm-eval acc | slm acc | lm-eval acc_norm | slm acc_norm |\n|---|---|---|---|---|")
for t in files:
    print(f"| {t} | {fmt(lm, t, 'acc')} | {fmt(slm, t, 'acc')} | {fmt(lm, t, 'acc_norm')} | {fmt(slm, t, 'acc_norm')} |")
# SLM-paper average: acc for boolq, piqa, winogrande, arc_easy; acc_norm for hellaswag, arc_challenge, openbookqa.
avg_metric = {"boolq": "acc", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc",
              "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
def avg7(r):
    vals = [r.get(t, {}).get(f"{m},none") for t, m in avg_metric.items()]
    return "" if any(v is None for v in vals) else f"{sum(vals) / len(vals):.4f}"
print(f"| avg-7 (acc / acc_norm as in SLM) | {avg7(lm)} | {avg7(slm)} | | |")

# lm-eval's per-document log-likelihoods vs the golden run (first 25 documents of each task).
if golden and lm_files:
    print("\n| task | docs vs golden | same requests | max abs Δll | acc/acc_norm identical |\n|---|---|---|---|---|")
    for t in files:
        gpath = os.path.join(golden, f"{t}.jsonl")
        spath = sorted(glob.glob(os.path.join(work, "lm-eval", "**", f"samples_{t}_local_*.jsonl"), recursive=True))
        if not os.path.exists(gpath) or not spath:
            continue
        gold = {d["doc_id"]: d for d in map(json.loads, open(gpath, encoding="utf-8"))}
        n, worst, same, same_req = 0, 0.0, True, True
        for s in map(json.loads, open(spath[-1], encoding="utf-8")):
            g = gold.get(s["doc_id"])
            if g is None:
                continue
            lls = [float(r[0]) for r in s["filtered_resps"]]
            reqs = [{"context": a["arg_0"], "continuation": a["arg_1"]} for a in s["arguments"].values()]
            same_req &= reqs == g["requests"]
            n += 1
            worst = max([worst] + [abs(a - b) for a, b in zip(lls, g["loglikelihood"])])
            same &= len(lls) == len(g["loglikelihood"]) and all(s.get(k) == v for k, v in g["metrics"].items())
        print(f"| {t} | {n} | {'yes' if same_req else 'NO'} | {worst:.2e} | {'yes' if same else 'NO'} |")
PY
