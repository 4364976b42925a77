"""Start-up: the CPU time (user + system, what /usr/bin/time reports) each script takes to answer --help, the
median of `repeats` runs after a warm-up run, beside the goal (1 s for the file scripts, 2 s for the others) and,
with --baseline, beside the same script of another version (a checkout of it, e.g. `git worktree add`). CPU
time, not wall time, so that other work on the machine changes it little.

    .venv/bin/python benchmarks/startup.py --baseline ../previous
"""
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from fastcore.script import call_parse

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"implementation_DatasetDivision.py": 1.0, "implementation_DataAugmentation_Extension.py": 1.0,
         "R50.py": 2.0, "R50Herlev.py": 2.0, "Inference_FastAI.py": 2.0, "Inference_Fields.py": 2.0, "app.py": 2.0,
         "export_onnx.py": 2.0, "operating_point.py": 2.0}


def cpu_seconds(script, root=ROOT):
    "User + system CPU seconds of one `python script --help` of the checkout `root`."
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, str(root / script), "--help"], cwd=root, stdout=subprocess.DEVNULL, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def median_cpu(script, root, repeats):
    "(median, min, max) CPU seconds of `repeats` runs after a warm-up run (disk cache, Python's bytecode cache)."
    cpu_seconds(script, root)
    times = [cpu_seconds(script, root) for _ in range(repeats)]
    return statistics.median(times), min(times), max(times)


@call_parse
def main(repeats: int = 5,        # timed runs per script after a warm-up run
         baseline: Path = None):  # another version's checkout, measured the same way
    "Print each script's --help CPU time (median, min–max) beside its goal and the baseline's."
    print(f"script{'':40} | CPU s, median (min–max) of {repeats} | goal | met | baseline CPU s | × faster")
    for script, goal in GOALS.items():
        median, low, high = median_cpu(script, ROOT, repeats)
        old = median_cpu(script, Path(baseline), repeats) if baseline and (Path(baseline) / script).exists() else None
        met = "yes" if median <= goal else "no"
        print(f"{script:46} | {median:5.2f} ({low:.2f}–{high:.2f}){'':14} | {goal:4.1f} | {met:3}"
              + (f" | {old[0]:5.2f} ({old[1]:.2f}–{old[2]:.2f}) | {old[0] / median:8.1f}" if old else " | -"))
