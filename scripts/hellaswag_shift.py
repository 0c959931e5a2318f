#!/usr/bin/env python3
"""How retraining moved HellaSwag's scores (issue 18): reads the logged samples of `slm eval --log-samples`
(OUT/eval-NAME/, as recovery_budget.sh writes them) of a base model and of runs retrained from it, and prints,
per run, the least-squares fit of each ending's log-likelihood change on its length in characters (acc_norm's
length: the choice without its leading space),
change ≈ a + b · chars, with the accuracies and how many acc_norm picks moved to a shorter or a longer ending.

b, a gain per character, leaves acc_norm's ranking (log-likelihood / characters) as it was; a, a gain that does
not grow with the ending, adds a / chars to each normalised score and so favours short endings.

    python3 scripts/hellaswag_shift.py out/i18c slm-dp-13 slm-dp-13-klhid-s100 slm-dp-13-head3-distill-t1-s100
"""
import sys

from eval_files import samples


def pick(doc, lengths, norm):
    scores = [ll / n if norm else ll for ll, n in zip(doc["loglikelihood"], lengths)]
    return max(range(len(scores)), key=scores.__getitem__)


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    out, base_name, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
    base = samples(out, base_name, "hellaswag")
    print("| run | docs | acc | acc_norm | a (nats) | b (nats/char) | acc_norm picks moved: shorter / longer |")
    print("|---|---|---|---|---|---|---|")
    for name in runs:
        run = samples(out, name, "hellaswag")
        if [d["doc_id"] for d in run] != [d["doc_id"] for d in base]:
            sys.exit(f"{name}: not the documents of {base_name}")
        xs, ys, shorter, longer, acc, norm = [], [], 0, 0, 0, 0
        for b, r in zip(base, run):
            # acc_norm's length: the choice's characters without the leading delimiter (lm-eval's `len(choice)`).
            lengths = [len(q["continuation"].removeprefix(" ")) for q in b["requests"]]
            for n, lb, lr in zip(lengths, b["loglikelihood"], r["loglikelihood"]):
                xs.append(n)
                ys.append(lr - lb)
            before, after = pick(b, lengths, True), pick(r, lengths, True)
            if before != after:
                shorter += lengths[after] < lengths[before]
                longer += lengths[after] >= lengths[before]
            acc += pick(r, lengths, False) == r["gold"]
            norm += after == r["gold"]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        docs = len(run)
        print(f"| {name} | {docs} | {100 * acc / docs:.1f} | {100 * norm / docs:.1f} | {my - slope * mx:.2f} "
              f"| {slope:.3f} | {shorter} / {longer} |")


if __name__ == "__main__":
    main()
