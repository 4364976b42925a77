"""Hostile input, second round, tried from a user's own working folder: user files that look like ours, outputs
aimed into the data, a damaged cache, odd numbers and odd images. Each ends in a result or a one-line error,
and nothing of the user's is lost."""
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

import synthetic_papsmear as demo
from conftest import ROOT, last_line, run_in
from papsmear import data, division
from papsmear.files import read_split_csv
from test_distributed import launch

sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy as accuracy_benchmark  # noqa: E402

KILL_DURING_COPY = """
import os, signal, sys
sys.path.insert(0, {root!r})
from papsmear import augment as extension
copies = []
real = extension.copy_atomically
def copy_then_die(source, target):
    copies.append(target)
    if len(copies) == 5:  # killed while writing the 5th copy: its temporary file stays
        target.parent.mkdir(parents=True, exist_ok=True)
        with extension.atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
    real(source, target)
extension.copy_atomically = copy_then_die
extension.copy_dataset({source!r}, {destination!r}, progress=False)
"""


def test_user_files_named_like_temporary_files_survive_every_cleanup(formatted, tmp_path):
    data = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    cells = data / "train" / "normal_columnar"
    mine = [cells / f".{next(cells.iterdir()).name}.partial", data / ".notes.partial", cells / ".x.1234.partial"]
    for file in mine:
        file.write_bytes(b"the user's own file")
    # In-place augmentation, then a rerun of the division over the same output folder.
    assert run_in(tmp_path, "implementation_DataAugmentation_Extension.py", "--target-directory", "herlev",
                  "--n-augmentations", 1, "--workers", 1).returncode == 0
    # Into an output directory, after a run killed mid-copy left a temporary file of its own there.
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_COPY.format(
        root=str(ROOT), source=str(data), destination=str(tmp_path / "extended"))], capture_output=True)
    assert killed.returncode == -9
    leftovers = [p for p in (tmp_path / "extended").rglob(".*.partial") if p.read_bytes() == b"half"]
    assert len(leftovers) == 1
    mine_there = tmp_path / "extended" / ".my notes.partial"
    mine_there.write_bytes(b"the user's own file")
    assert run_in(tmp_path, "implementation_DataAugmentation_Extension.py", "--target-directory", "herlev",
                  "--output-directory", "extended", "--n-augmentations", 1, "--workers", 1).returncode == 0
    assert not leftovers[0].exists()  # the killed run's own temporary file is gone
    for file in [*mine, mine_there, tmp_path / "extended" / mine[0].relative_to(data)]:
        assert file.read_bytes() == b"the user's own file", file
    # A division rerun over its own output keeps a user's file in a class folder, and --force refuses to delete it.
    raw = tmp_path / "raw"
    division_args = ("--path-dir", raw, "--output-dir", "divided")
    demo.generate_herlev(raw, n_images=5, seed=1)
    assert run_in(tmp_path, "implementation_DatasetDivision.py", *division_args).returncode == 0
    theirs = tmp_path / "divided" / "train" / "normal_columnar" / ".scan.bmp.partial"
    theirs.write_bytes(b"the user's own file")
    assert run_in(tmp_path, "implementation_DatasetDivision.py", *division_args).returncode == 0
    forced = run_in(tmp_path, "implementation_DatasetDivision.py", *division_args, "--random-state", 3, "--force")
    assert forced.returncode == 2 and "not copies of path_dir's images" in last_line(forced.stderr)
    assert theirs.read_bytes() == b"the user's own file"
    assert read_split_csv(tmp_path / "divided")  # the division is still there


def png_header_only(path, width, height):
    "A PNG whose header claims `width` x `height` pixels (what PIL checks against decompression bombs)."
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR: width, height, then its CRC over type and fields
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_a_decompression_bomb_is_named_and_skipped_in_prediction_and_refused_in_training(sipakmed_copy, trained,
                                                                                        tmp_path):
    png_header_only(sipakmed_copy / "test" / "Parabasal" / "bomb.png", 20000, 10000)
    predicted = run_in(tmp_path, "Inference_FastAI.py", "--model-path", trained[0] / "models" / "tiny.pkl",
                       "--test-dataset-path", "sipakmed/test", "--output-dir", "report", "--gradcam", 0, "--bootstrap",
                       100)
    assert predicted.returncode == 1, predicted.stderr[-2000:]
    assert "skipped unreadable image" in predicted.stdout and "bomb.png: DecompressionBombError" in predicted.stdout
    assert "20 images predicted, 1 skipped" in predicted.stdout
    (sipakmed_copy / "test" / "Parabasal" / "bomb.png").rename(sipakmed_copy / "train" / "Parabasal" / "bomb.png")
    for budget in (0, 1):  # reading the files every epoch, and presized in memory
        trained_run = run_in(tmp_path, "R50.py", "--no-onnx", "--path-folder", "sipakmed", "--epochs", 1,
                             "--image-size", 32,
                             "--no-pretrained", "--memory-budget", budget)
        assert trained_run.returncode == 2 and "Traceback" not in trained_run.stderr, trained_run.stderr[-2000:]
        assert "bomb.png" in last_line(trained_run.stderr) and "DecompressionBombError" in last_line(trained_run.stderr)


def test_damaged_cache_files_and_manifest_are_rebuilt_and_reported(sipakmed_copy, capsys):
    data.pap_dls(sipakmed_copy, 32, 10, workers=0)
    root = sipakmed_copy / "cache" / "32px"
    entry = sorted((root / "train" / "Parabasal").iterdir())[0]
    good = entry.read_bytes()
    entry.write_bytes(good[:len(good) // 2])
    capsys.readouterr()
    data.pap_dls(sipakmed_copy, 32, 10, workers=0)
    assert f"1 damaged file(s) presized again from their source, e.g. train/Parabasal/{entry.stem}.png" in \
        capsys.readouterr().out
    assert entry.read_bytes() == good
    (root / "manifest.json").write_text("{ not json")
    entry.write_bytes(b"")
    data.pap_dls(sipakmed_copy, 32, 10, workers=0)
    assert "its manifest manifest.json cannot be read (JSONDecodeError" in capsys.readouterr().out
    assert entry.read_bytes() == good and json.loads((root / "manifest.json").read_text())["images"]


def test_reports_inside_the_test_folder_are_refused(sipakmed_copy, trained, tmp_path):
    for inside in ("sipakmed/test/report", "sipakmed/test/Parabasal/../report"):
        result = run_in(tmp_path, "Inference_FastAI.py", "--model-path", trained[0] / "models" / "tiny.pkl",
                        "--test-dataset-path", "sipakmed/test", "--output-dir", inside)
        assert result.returncode == 2 and "is inside test_dataset_path" in last_line(result.stderr)
        assert not (sipakmed_copy / "test" / "report").exists()


@pytest.mark.parametrize("args, message", [
    (("--bootstrap", 1), "bootstrap is 1; a 95% interval needs between 100 and 100000 resamples"),
    (("--bootstrap", 10 ** 9), "bootstrap is 1000000000; a 95% interval needs between 100 and 100000"),
])
def test_bootstrap_out_of_range_is_refused_before_predicting(trained, formatted, tmp_path, args, message):
    result = run_in(tmp_path, "Inference_FastAI.py", "--model-path", trained[0] / "models" / "tiny.pkl",
                    "--test-dataset-path", formatted / "sipakmed" / "test", "--output-dir", "report", *args)
    assert result.returncode == 2 and last_line(result.stderr).startswith(f"error: {message}")
    assert not (tmp_path / "report").exists()


def test_a_batch_of_one_image_is_refused_before_training(sipakmed_copy, tmp_path):
    result = run_in(tmp_path, "R50.py", "--no-onnx", "--path-folder", "sipakmed", "--batch-size", 1, "--image-size", 32)
    assert result.returncode == 2
    assert last_line(result.stderr) == ("error: batch_size is 1; training needs at least 2 images per batch "
                                        "(BatchNorm normalises over the batch) — set --batch-size 2 or more")
    assert not list((sipakmed_copy / "models").iterdir())


@pytest.mark.parametrize("options, message", [
    (dict(recipes=["original", "bogus"]), "recipe 'bogus' is unknown"),
    (dict(recipes=["modern-"]), "recipe 'modern-' is unknown"),
    (dict(folds=1), "folds is 1; use 0"),
    (dict(folds=-1), "folds is -1; use 0"),
    (dict(folds=2), "folds is 2; use 0"),
    (dict(folds=50), "image group(s)"),
    (dict(epochs=0), "epochs is 0"),
    (dict(path_folder="missing"), "has no train/<class> folders"),
])
def test_the_accuracy_benchmark_refuses_bad_options_before_any_run(sipakmed_copy, tmp_path, monkeypatch, capsys,
                                                                  options, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        accuracy_benchmark.main(**{"path_folder": "sipakmed", **options})
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (sipakmed_copy / "models" / "accuracy").exists() and not (tmp_path / "missing").exists()


def test_cells_are_grouped_by_cluster_number_not_by_its_spelling():
    samples = {"Parabasal": [f"p/{name}.bmp" for name in ("001_01", "1_02", "01_03", "002_01", "2_02", "003_01",
                                                           "004_01", "005_01", "006_01")]}
    rows = division.plan_division(samples, (0.6, 0.2, 0.2), 42, grouped=True)
    groups = {Path(file).stem: group for file, _, _, group in rows}
    assert groups["001_01"] == groups["1_02"] == groups["01_03"] == "001" and groups["2_02"] == "002"
    split_of = {Path(file).stem: split for file, _, split, _ in rows}
    assert split_of["001_01"] == split_of["1_02"] == split_of["01_03"]


def test_under_a_launcher_one_process_prints_the_error_and_all_stop(sipakmed_copy, tmp_path):
    test_image = sorted((sipakmed_copy / "test" / "Parabasal").iterdir())[0]
    shutil.copy(test_image, sipakmed_copy / "train" / "Parabasal" / "c.bmp")
    result = launch("R50.py", "--no-onnx", "--path-folder", sipakmed_copy, "--epochs", 1, "--image-size", 32,
                    "--no-pretrained")
    assert result.returncode != 0
    assert result.stderr.count("error: leak check: 1 image(s)") == 1, result.stderr[-3000:]
    assert "internal error" not in result.stderr and not list((sipakmed_copy / "models").iterdir())


def test_a_broken_first_training_image_is_named_on_every_data_path(sipakmed_copy, tmp_path):
    first = sorted((sipakmed_copy / "train").rglob("*.bmp"))[0]
    first.write_bytes(first.read_bytes()[:200])  # a truncated BMP: its header reads, its pixels do not
    for budget in (0, 1):  # reading the files (fastai opens the first image while it builds the loaders), in memory
        result = run_in(tmp_path, "R50.py", "--no-onnx", "--path-folder", "sipakmed", "--epochs", 1, "--image-size", 32,
                        "--no-pretrained", "--memory-budget", budget)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert first.name in last_line(result.stderr), last_line(result.stderr)
