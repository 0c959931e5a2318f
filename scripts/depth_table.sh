#!/usr/bin/env bash
# Depth-pruning comparison on the default model: for each target (layers removed) and each method / operator,
# run `slm depth`, then `slm eval` (WikiText-2 128-token windows, first PPL_WINDOWS; the seven tasks, first DOCS
# documents), and print one Markdown table. Results accumulate in out/depth-table/ (a finished row is not re-run).
#   TARGETS="13 8" DOCS=200 PPL_WINDOWS=40 CONFIGS="shortgpt slm:reference ..." bash scripts/depth_table.sh
set -euo pipefail
work=out/depth-table
source "$(dirname "${BASH_SOURCE[0]}")/table_common.sh"
configs="${CONFIGS:-shortgpt ppl sleb laco:reference slm:reference slm:paper slm:average slm:delete slm:top slm:top:kl slm-dp:top}"
for n in ${TARGETS:-13 8}; do
  for c in $configs; do
    IFS=: read -r method op crit <<< "$c"
    name="$method${op:+-$op}${crit:+-$crit}-$n"
    [[ -f "$work/$name.ppl.json" ]] && continue
    args=(--method "$method" --target-layers "$n")
    [[ -n "$op" ]] && args+=(--merge "$op")
    [[ -n "$crit" ]] && args+=(--criterion "$crit")
    echo "== $name" >&2
    "$slm" depth "$model" --out "$work/$name" "${args[@]}" > "$work/$name.depth.log" 2>&1 || { tail -3 "$work/$name.depth.log" >&2; continue; }
    evaluate_split "$work/$name" "$name"
    rm -f "$work/$name/model.safetensors"   # keep config + plan; the weights are cheap to recompute
  done
done
python3 - "$work" "$dense_params" <<'PY'
import glob, json, os, sys
work, dense_params = sys.argv[1], sys.argv[2]
rows = []
for p in sorted(glob.glob(os.path.join(work, "*.ppl.json"))):
    name = os.path.basename(p)[:-len(".ppl.json")]
    ppl = json.load(open(p))["results"]["wikitext2-128"]["perplexity,none"]
    ev = json.load(open(os.path.join(work, name + ".eval.json")))
    avg = ev.get("avg-7", {}).get("value")
    per = {t: ev["results"][t] for t in ev["results"]}
    plan_path = os.path.join(work, name, "slm_plan.json")
    plan = json.load(open(plan_path)) if os.path.exists(plan_path) else None
    rows.append((name, plan, ppl, avg, per))
print("| model | layers removed | params | reduction | threshold | W2 PPL (128) | avg-7 | boolq | piqa | hellaswag(n) | winogrande | arc_e | arc_c(n) | obqa(n) | search s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
key = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
for name, plan, ppl, avg, per in rows:
    cells = [f"{100 * per[t][m + ',none']:.1f}" for t, m in key.items()]
    if plan:
        removed = plan["layers_before"] - plan["layers_after"]
        head = [name, str(removed), f"{plan['parameters_after'] / 1e6:.1f}M", f"{100 * plan['parameter_reduction']:.1f}%",
                f"{plan['threshold']:.4f}" if plan.get("threshold") is not None else "", f"{ppl:.1f}", f"{100 * avg:.2f}"]
        tail = [f"{plan['search']['seconds']:.1f}"]
    else:
        head = [name, "0", dense_params, "0%", "", f"{ppl:.1f}", f"{100 * avg:.2f}"]
        tail = [""]
    print("| " + " | ".join(head + cells + tail) + " |")
PY
