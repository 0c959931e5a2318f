"""What the recovery scripts read from an evaluation directory OUT/eval-NAME/ (`slm eval --output-path ...
--log-samples`, as recovery_budget.sh and recovery_study.sh write it), and avg-7's metric per task."""
import glob
import json
import sys

# avg-7's metric per task, as the papers take it (the evaluator's `avg7`).
AVG7_METRIC = {"boolq": "acc", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc",
               "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


def samples(out, name, task):
    """The logged samples of one task, in the evaluator's order; exits naming the directory unless exactly one."""
    files = glob.glob(f"{out}/eval-{name}/*/samples_{task}_*.jsonl")
    if len(files) != 1:
        sys.exit(f"{out}/eval-{name}: expected one {task} samples file, found {len(files)}")
    return [json.loads(line) for line in open(files[0])]
