#!/usr/bin/env python3
"""The recovery-study table (issue 18): for each NAME, the seven tasks from OUT/eval-NAME (avg-7's metric per task),
avg-7, the mean of the six without BoolQ, BoolQ's share of "yes" predictions (gold share in brackets), WikiText-2
perplexity and, where OUT/NAME/slm_lora.json exists, the validation loss before and after training.

Usage: recovery_table.py OUT NAME...   (a NAME full-X reads the per-task directories OUT/full-X/TASK/)
"""
import glob, json, sys
from eval_files import AVG7_METRIC as metric, has_samples, results, samples
out, names = sys.argv[1], sys.argv[2:]
print("| model | " + " | ".join(metric) + " | avg-7 | avg-6 (no BoolQ) | BoolQ predicted yes (gold) | WikiText-2 ppl | val loss before -> after |")
print("|---" * (len(metric) + 6) + "|")
for n in names:
    res = results(out, n)
    vals = {t: res[t][f"{m},none"] for t, m in metric.items()}
    # BoolQ's "yes" share needs the logged samples (results/recovery keeps only the results files).
    bq = samples(out, n, "boolq") if has_samples(out, n, "boolq") else None
    share = "n/a"
    if bq:
        yes = sum(s["loglikelihood"][1] > s["loglikelihood"][0] for s in bq) / len(bq)
        gold = sum(s["gold"] == 1 for s in bq) / len(bq)
        share = f"{100 * yes:.1f}% ({100 * gold:.1f}%)"
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
          + f" | {100 * a7:.2f} | {100 * a6:.2f} | {share} | {ppl} | {val} |")
