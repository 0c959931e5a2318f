#!/usr/bin/env python3
"""How much a retrained model's task scores changed against its base, with the paired standard error (issue 18).

Both models answered the same documents, so the noise of a change is the spread of the per-document
differences (right after minus right before), not that of two independent samples. For each RUN against BASE
(the logged samples in OUT/eval-NAME/, as recovery_budget.sh writes them): the change of each of the seven tasks
(avg-7's metric per task) and of avg-6 (the six without BoolQ) and avg-7, in points, each ± one standard error
of the mean difference (tasks are independent samples, so the errors of a mean add in quadrature).

    python3 scripts/paired_change.py out/i18c slm-dp-13 slm-dp-13-klhid-s100 slm-dp-13-head3-distill-t1-s100
"""
import math
import sys

from eval_files import AVG7_METRIC as METRIC, samples


def scores(out, name, task):
    return {d["doc_id"]: d["metrics"][METRIC[task]] for d in samples(out, name, task)}


def change(before, after):
    """Mean of after − before over the documents of both, in points, and the variance of that mean."""
    if before.keys() != after.keys():
        sys.exit("the two evaluations did not score the same documents")
    d = [100 * (after[k] - before[k]) for k in before]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else 0.0
    return mean, var / len(d)


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    out, base, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
    before = {t: scores(out, base, t) for t in METRIC}
    print(f"Change against {base} in points, ± one paired standard error:\n")
    print("| run | " + " | ".join(METRIC) + " | avg-6 (no BoolQ) | avg-7 |")
    print("|---" * (len(METRIC) + 3) + "|")
    for run in runs:
        per = {t: change(before[t], scores(out, run, t)) for t in METRIC}

        def mean_of(tasks):
            m = sum(per[t][0] for t in tasks) / len(tasks)
            return m, math.sqrt(sum(per[t][1] for t in tasks)) / len(tasks)

        cells = [f"{m:+.1f} ± {math.sqrt(v):.1f}" for m, v in per.values()]
        for m, se in (mean_of([t for t in METRIC if t != "boolq"]), mean_of(list(METRIC))):
            cells.append(f"{m:+.2f} ± {se:.2f}")
        print(f"| {run} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
