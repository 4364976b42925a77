"""Resuming interrupted training: a run killed (SIGKILL) after an epoch, or while writing its checkpoint, and
then resumed ends as the run that was never interrupted; TTL never redoes a finished stage."""
import shutil
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import ROOT, last_line, run_script
from papsmear import learner
from papsmear.files import UserError

TRAINING = ["--epochs", 5, "--batch-size", 8, "--lr", 0.01, "--image-size", 32, "--no-pretrained", "--no-onnx"]

# Runs a project script, killed with SIGKILL by the checkpoint callback: after writing the checkpoint of epoch
# `after` (1-based) of the run whose name starts with `save_loc`, or in the middle of writing the one of epoch
# `during`.
KILLER = f"""
import os, signal, runpy, sys
sys.path.insert(0, {str(ROOT)!r})
import torch
from papsmear import checkpoint
when, epoch, save_loc, script = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
written = checkpoint.LastEpochCheckpoint.after_epoch
real_save = torch.save

def after_epoch(self):
    written(self)
    if when == "after" and self.epoch + 1 == epoch and self.path.name.startswith(save_loc):
        os.kill(os.getpid(), signal.SIGKILL)

def half_save(obj, f, *args, **kwargs):
    if when == "during" and isinstance(obj, dict) and obj.get("epoch", -1) + 1 == epoch:
        with open(f, "wb") as out:
            out.write(b"half of a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

checkpoint.LastEpochCheckpoint.after_epoch = after_epoch
torch.save = half_save
sys.argv = [script, *sys.argv[5:]]
runpy.run_path(script, run_name="__main__")
"""


def killed_run(tmp_path, when, epoch, script, *args, save_loc=""):
    """Run `script` with `args`, killed (SIGKILL) `when` ('after' or 'during') the checkpoint of `epoch` (of the
    run whose name starts with `save_loc`)."""
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    return subprocess.run([sys.executable, str(killer), when, str(epoch), save_loc, str(ROOT / script),
                           *map(str, args)], capture_output=True, text=True)


def same_weights(a, b):
    "Whether two weight files hold the same tensors, within float tolerance."
    first, second = (torch.load(p, weights_only=True) for p in (a, b))
    return first.keys() == second.keys() and all(torch.allclose(first[k].float(), second[k].float(), atol=1e-6)
                                                  for k in first)


def test_a_killed_run_resumed_ends_as_the_uninterrupted_one(formatted, tmp_path):
    path = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    models = path / "models"
    straight = run_script("R50.py", "--path-folder", path, "--save-loc", "straight", *TRAINING)
    assert straight.returncode == 0, straight.stderr[-2000:]
    run = ["R50.py", "--path-folder", path, "--save-loc", "resumed", *TRAINING]
    # Killed after epoch 1; resumed and killed again while writing epoch 4's checkpoint (epoch 3's stays the
    # one to resume from); resumed to the end.
    assert killed_run(tmp_path, "after", 1, *run).returncode == -signal.SIGKILL
    assert not (models / "resumed.pth").exists() and (models / "resumed.last.pth").is_file()
    again = killed_run(tmp_path, "during", 4, *run, "--resume")
    assert again.returncode == -signal.SIGKILL and "resuming resumed after epoch 1 of 5" in again.stdout
    with pytest.raises(UserError, match="settings differ.*lr 0.01 → 0.02"):
        learner.train_r50(path, save_loc="resumed", epochs=5, batch_size=8, lr=0.02, image_size=32,
                          pretrained=False, onnx=False, resume=True)
    resumed = run_script(*run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming resumed after epoch 3 of 5" in resumed.stdout
    assert same_weights(models / "straight.pth", models / "resumed.pth")
    straight_log, resumed_log = (pd.read_csv(models / f"{n}_log.csv") for n in ("straight", "resumed"))
    columns = [c for c in straight_log.columns if c != "time"]
    assert straight_log[columns].to_numpy() == pytest.approx(resumed_log[columns].to_numpy(), abs=1e-6)
    assert not (models / "resumed.last.pth").exists() and (models / "resumed.done.json").is_file()
    with pytest.raises(UserError, match="no checkpoint"):
        learner.train_r50(path, save_loc="resumed", epochs=5, batch_size=8, lr=0.01, image_size=32,
                          pretrained=False, onnx=False, resume=True)


def test_ttl_killed_in_its_second_stage_resumes_without_redoing_the_first(trained, formatted, tmp_path):
    herlev = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    sipakmed = shutil.copytree(formatted / "sipakmed", tmp_path / "sipakmed")
    args = ["--previous-model-da", trained[0] / "models" / "tiny.pth", "--herlev-path", herlev, "--sipakmed-path",
            sipakmed, "--herlev-epochs", 1, "--herlev-batch-size", 8, "--epochs", 3, "--batch-size", 8,
            "--image-size", 32, "--no-onnx"]
    # One SIPaKMeD epoch written (stage 2's first checkpoint), then killed.
    killed = killed_run(tmp_path, "after", 1, "R50Herlev.py", *args, "--keep-last", save_loc="resnet50_ttl_sipakmed")
    assert killed.returncode == -signal.SIGKILL
    herlev_weights = herlev / "models" / "resnet50_ttl_herlev.pth"
    first_stage = herlev_weights.read_bytes(), herlev_weights.stat().st_mtime_ns
    assert (herlev / "models" / "resnet50_ttl_herlev.done.json").is_file()
    resumed = run_script("R50Herlev.py", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Herlev stage: finished earlier" in resumed.stdout and "herlev stage:" not in resumed.stdout
    assert (herlev_weights.read_bytes(), herlev_weights.stat().st_mtime_ns) == first_stage
    assert "resuming resnet50_ttl_sipakmed after epoch 1 of 3" in resumed.stdout
    assert len(pd.read_csv(sipakmed / "models" / "resnet50_ttl_sipakmed_log.csv")) == 3
    assert not (sipakmed / "models" / "resnet50_ttl_sipakmed.last.pth").exists()
    finished = run_script("R50Herlev.py", *args, "--resume")
    assert finished.returncode == 2 and "nothing to resume: both stages finished" in last_line(finished.stderr)
