"""Training on two processes through `accelerate launch` (fastai's distrib_ctx, gloo on CPU): one process
writes every file, the metrics cover the whole validation set, and the weights are the model it reports."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import TTLR50
from conftest import ROOT
from papsmear import data, learner

ACCELERATE = Path(sys.executable).parent / "accelerate"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, *args):
    """Run a script under `accelerate launch` with 2 processes on the CPU (gloo), as the README says."""
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(ROOT / script), *map(str, args)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def printed_validation_accuracy(stdout):
    "The accuracy in the `validation` row of the scores R50.py prints."
    row = next(line for line in stdout.splitlines() if line.startswith("validation "))
    return float(row.split()[2])


def test_two_processes_write_each_file_once_and_report_the_whole_validation_set(formatted, tmp_path):
    path = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    result = launch("R50.py", "--no-onnx", "--path-folder", path, "--save-loc", "ddp", "--epochs", 2, "--batch-size", 8,
                    "--image-size", 32, "--no-pretrained", "--workers", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes × batch 8 = effective batch 16, lr 0.001 as given" in result.stdout
    assert result.stdout.count("validation ") == 1 and result.stdout.count("Next: evaluate") == 1
    files = sorted(p.name for p in (path / "models").iterdir())
    assert files == ["ddp.done.json", "ddp.json", "ddp.pkl", "ddp.pth", "ddp_curves.png", "ddp_log.csv"]
    assert "held in memory" in result.stdout  # the default in-memory path, on each process
    cache = path / "cache" / "32px"  # presized once, by process 0, before the others read it
    assert len(list(cache.rglob("*.png"))) == len(list((path / "train").rglob("*.BMP"))) + len(
        list((path / "val").rglob("*.BMP"))) and not list(cache.rglob("*.partial"))
    log = pd.read_csv(path / "models" / "ddp_log.csv")
    assert list(log["epoch"]) == [0, 1]  # one writer: no line twice
    learn = learner.pap_learner(data.pap_dls(path, 32, 8, workers=0), path=path)
    learner.load_weights(learn, path / "models" / "ddp.pth")
    recomputed = float(learn.validate()[1])
    assert printed_validation_accuracy(result.stdout) == pytest.approx(recomputed, abs=1e-4)
    assert log["accuracy"].max() == pytest.approx(recomputed, abs=1e-4)  # the best epoch, on all 21 images


def test_a_ttl_stage_on_two_processes_ends_with_one_final_model(trained, formatted, tmp_path):
    for name in ("herlev", "sipakmed"):
        shutil.copytree(formatted / name, tmp_path / name)
    shutil.copy(trained[0] / "models" / "tiny.pth", tmp_path / "herlev" / "models" / "resnet50_ttl_herlev.pth")
    result = launch("R50Herlev.py", "--no-onnx", "--herlev-path", tmp_path / "herlev", "--sipakmed-path",
                    tmp_path / "sipakmed",
                    "--start-stage", 2, "--epochs", 1, "--batch-size", 8, "--image-size", 32, "--workers", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Final model:") == 1
    final = sorted(p.name for p in (tmp_path / "sipakmed" / "models").iterdir())
    assert final == [f"{TTLR50.save_loc}{suffix}" for suffix in (".done.json", ".json", ".pkl", ".pth", "_curves.png",
                                                              "_log.csv")]
