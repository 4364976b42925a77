"""Start-up and the command line: --help and refused options load no heavy library, usage errors are one line,
and progress bars write lines, not carriage returns, when the output is a file or a log."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, last_line

HEAVY = ("torch", "fastai", "sklearn", "imgaug")

# Runs a script as `python script args` would, then says which heavy libraries had been imported by its end.
PROBE = """
import json, runpy, sys
script, heavy = sys.argv[1], sys.argv[2].split(",")
sys.argv = [script, *sys.argv[3:]]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as stop:
    code = stop.code
print(json.dumps([code, sorted(m for m in heavy if m in sys.modules)]), file=sys.stderr)
"""


def imported_by(script, *args, heavy=HEAVY):
    "[exit code, heavy libraries imported] of a script run with `args`."
    result = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / script), ",".join(heavy), *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True)
    return json.loads(last_line(result.stderr))


@pytest.mark.parametrize("script, heavy", [
    ("implementation_DatasetDivision.py", HEAVY), ("implementation_DataAugmentation_Extension.py", HEAVY),
    ("R50.py", ("torch",)), ("R50Herlev.py", ("torch",)), ("Inference_FastAI.py", ("torch",)), ("app.py", ("torch",)),
    ("export_onnx.py", ("torch",)), ("operating_point.py", ("torch",)), ("Inference_Fields.py", ("torch",)),
])
def test_help_imports_no_heavy_library(script, heavy):
    assert imported_by(script, "--help", heavy=heavy) == [0, []]


@pytest.mark.parametrize("script, args", [
    ("implementation_DatasetDivision.py", ("--path-dir", "nowhere", "--output-dir", "out")),
    ("implementation_DatasetDivision.py", ("--training-size", 2)),
    ("implementation_DataAugmentation_Extension.py", ("--target-directory", "nowhere")),
    ("implementation_DataAugmentation_Extension.py", ("--n-augmentations", 0)),
])
def test_the_file_scripts_refuse_bad_options_without_heavy_libraries(script, args, tmp_path):
    assert imported_by(script, *args) == [2, []]


@pytest.mark.parametrize("script, args, message", [
    ("R50.py", ("--epochs", "many"), "error: argument --epochs: invalid int value: 'many' — run R50.py --help"),
    ("implementation_DatasetDivision.py", ("--no-such-option",), "error: unrecognized arguments: --no-such-option"),
    ("Inference_FastAI.py", ("--batch-size",), "error: argument --batch-size: expected one argument"),
])
def test_usage_errors_are_one_line_with_exit_code_2(script, args, message):
    result = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith(message)


def test_progress_bars_in_a_log_are_lines_at_every_tenth(formatted, tmp_path):
    log = tmp_path / "training.log"
    path = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    with log.open("w") as out:  # a file, as a CI log or `> training.log` is: not a terminal
        result = subprocess.run([sys.executable, str(ROOT / "R50.py"), "--path-folder", str(path), "--epochs", "2",
                                 "--batch-size", "4", "--image-size", "32", "--no-pretrained", "--no-onnx"],
                                stdout=out, stderr=subprocess.STDOUT)
    assert result.returncode == 0
    text = log.read_bytes().decode()  # as written: reading it as text would turn carriage returns into newlines
    training = [line for line in text.splitlines() if line.startswith("Epoch 1/2 :")]
    assert "\r" not in text and 2 <= len(training) <= 2 * 11  # training and validation, a line per tenth at most
    assert any(line.startswith("cache 32px:") and "100%" in line for line in text.splitlines())
