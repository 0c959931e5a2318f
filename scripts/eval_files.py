"""What the recovery scripts read from an evaluation directory OUT/eval-NAME/ (`slm eval --output-path ...
--log-samples`, as recovery_budget.sh and recovery_study.sh write it), and avg-7's metric per task.

A NAME that starts with `full-` is read from OUT/NAME/TASK/, one evaluation per task (the full-task runs of
issue 18, which write each task to its own directory so that a stopped queue loses at most one task)."""
import glob
import json
import sys

# avg-7's metric per task, as the papers take it (the evaluator's `avg7`).
AVG7_METRIC = {"boolq": "acc", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc",
               "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


def _dir(out, name, task="*"):
    return f"{out}/{name}/{task}" if name.startswith("full-") else f"{out}/eval-{name}"


def has_samples(out, name, task):
    """Whether the evaluation logged the samples of `task`."""
    return bool(glob.glob(f"{_dir(out, name, task)}/*/samples_{task}_*.jsonl"))


def samples(out, name, task):
    """The logged samples of one task, in the evaluator's order; exits naming the directory unless exactly one."""
    files = glob.glob(f"{_dir(out, name, task)}/*/samples_{task}_*.jsonl")
    if len(files) != 1:
        sys.exit(f"{_dir(out, name, task)}: expected one {task} samples file, found {len(files)}")
    return [json.loads(line) for line in open(files[0])]


def results(out, name):
    """The `results` of an evaluation (task -> metrics), the tasks of every results file of NAME merged; exits
    naming the directory when there is none or a task is in two files."""
    merged = {}
    files = sorted(glob.glob(f"{_dir(out, name)}/*/results_*.json"))
    if not files:
        sys.exit(f"{_dir(out, name)}: no results file")
    for f in files:
        for task, metrics in json.load(open(f))["results"].items():
            if task in merged:
                sys.exit(f"{_dir(out, name)}: task {task} in two results files")
            merged[task] = metrics
    return merged
