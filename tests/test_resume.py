"""Resuming interrupted training: a run killed (SIGKILL) after an epoch, or while writing its checkpoint, and
then resumed trains only the epochs left, from the checkpoint's weights and optimiser, and ends exactly as the
run that was never interrupted; damaged, foreign and hand-made checkpoints are refused in one line; TTL never
redoes a finished stage."""
import json
import shutil
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import ROOT, last_line, run_script, train
from papsmear import checkpoint as checkpoints
from papsmear.files import UserError

TRAINING = ["--epochs", 5, "--batch-size", 8, "--lr", 0.01, "--image-size", 32, "--no-pretrained", "--no-onnx"]

# Runs a project script under watch: killed with SIGKILL by the checkpoint callback after writing the checkpoint
# of epoch `epoch` (1-based, 'after') of the run whose name starts with `save_loc`, or in the middle of writing
# it ('during'); or ('watch') left to run while it counts the training batches it trains and saves the model and
# optimiser state it holds when it trains its first batch.
HARNESS = f"""
import json, os, signal, runpy, sys
sys.path.insert(0, {str(ROOT)!r})
import torch
from fastai.learner import Learner
from papsmear import checkpoint
when, epoch, save_loc, report, script = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
written = checkpoint.LastEpochCheckpoint.after_epoch
real_save, real_batch = torch.save, Learner._do_one_batch
trained = []

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

def one_batch(self):
    if self.training:
        if not trained:
            real_save(dict(model=self.model.state_dict(), opt=self.opt.state_dict()["state"]), report + ".first.pt")
        trained.append(self.epoch)
        with open(report, "w") as out:
            json.dump(trained, out)
    return real_batch(self)

checkpoint.LastEpochCheckpoint.after_epoch = after_epoch
torch.save = half_save
Learner._do_one_batch = one_batch
sys.argv = [script, *sys.argv[6:]]
runpy.run_path(script, run_name="__main__")
"""


def watched_run(tmp_path, when, epoch, script, *args, save_loc=""):
    """Run `script` with `args` under the harness: killed (SIGKILL) `when` ('after' or 'during') the checkpoint of
    `epoch` (of the run whose name starts with `save_loc`), or only watched ('watch'). Returns the process, the
    epoch of every training batch it trained, and the file holding its state at its first training batch."""
    harness, report = tmp_path / "harness.py", tmp_path / f"batches-{when}-{epoch}.json"
    harness.write_text(HARNESS)
    process = subprocess.run([sys.executable, str(harness), when, str(epoch), save_loc, str(report),
                              str(ROOT / script), *map(str, args)], capture_output=True, text=True)
    batches = json.loads(report.read_text()) if report.exists() else []
    return process, batches, report.with_name(report.name + ".first.pt")


def weights(path):
    "The tensors of a weights file."
    return torch.load(path, weights_only=True)


def test_a_killed_run_resumed_trains_only_the_epochs_left_and_ends_exactly_as_the_uninterrupted_one(formatted,
                                                                                                   tmp_path):
    path = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    models = path / "models"
    straight, straight_batches, _ = watched_run(tmp_path, "watch", 0, "R50.py", "--path-folder", path, "--save-loc",
                                                "straight", *TRAINING)
    assert straight.returncode == 0, straight.stderr[-2000:]
    per_epoch = straight_batches.count(0)
    assert per_epoch > 1 and straight_batches == [e for e in range(5) for _ in range(per_epoch)]
    run = ["R50.py", "--path-folder", path, "--save-loc", "resumed", *TRAINING]
    # Killed after epoch 1; resumed and killed again while writing epoch 4's checkpoint (epoch 3's stays the
    # one to resume from); resumed to the end.
    killed, _, _ = watched_run(tmp_path, "after", 1, *run)
    assert killed.returncode == -signal.SIGKILL
    assert not (models / "resumed.pth").exists() and (models / "resumed.last.pth").is_file()
    again, again_batches, _ = watched_run(tmp_path, "during", 4, *run, "--resume")
    assert again.returncode == -signal.SIGKILL and "resuming resumed after epoch 1 of 5" in again.stdout
    assert again_batches == [e for e in (1, 2, 3) for _ in range(per_epoch)]  # epoch 0 was not trained again
    saved = torch.load(models / "resumed.last.pth", weights_only=True)
    assert saved["epoch"] == 2
    with pytest.raises(UserError, match="settings differ.*lr 0.01 → 0.02"):
        train(path, save_loc="resumed", epochs=5, batch_size=8, lr=0.02, image_size=32, pretrained=False, onnx=False,
              resume=True)
    resumed, resumed_batches, first = watched_run(tmp_path, "watch", 0, *run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming resumed after epoch 3 of 5" in resumed.stdout
    assert resumed_batches == [e for e in (3, 4) for _ in range(per_epoch)]  # only the epochs left
    # At its first batch the resumed run holds the checkpoint's weights and optimiser state, exactly.
    state = torch.load(first, weights_only=True)
    assert all(torch.equal(state["model"][k], saved["model"][k]) for k in saved["model"])
    assert len(state["opt"]) == len(saved["opt"]["state"]) and all(
        mine.keys() == theirs.keys() and all(torch.equal(mine[name], theirs[name]) for name in mine
                                             if isinstance(mine[name], torch.Tensor))
        for mine, theirs in zip(state["opt"], saved["opt"]["state"], strict=True))
    assert any(torch.is_tensor(v) and v.abs().sum() > 0 for moments in state["opt"] for v in moments.values())
    kept, expected = weights(models / "resumed.pth"), weights(models / "straight.pth")
    assert kept.keys() == expected.keys() and all(torch.equal(kept[k], expected[k]) for k in kept)
    straight_log, resumed_log = (pd.read_csv(models / f"{n}_log.csv") for n in ("straight", "resumed"))
    columns = [c for c in straight_log.columns if c != "time"]
    assert straight_log[columns].equals(resumed_log[columns])
    assert not (models / "resumed.last.pth").exists() and (models / "resumed.done.json").is_file()
    with pytest.raises(UserError, match="no checkpoint"):
        train(path, save_loc="resumed", epochs=5, batch_size=8, lr=0.01, image_size=32, pretrained=False, onnx=False,
              resume=True)


@pytest.fixture(scope="module")
def interrupted(formatted, tmp_path_factory):
    "A formatted Herlev copy whose run `stopped` kept its checkpoint after 1 of 2 epochs (its best epoch too)."
    path = shutil.copytree(formatted / "herlev", tmp_path_factory.mktemp("interrupted") / "herlev")
    tmp = tmp_path_factory.mktemp("harness")
    killed, _, _ = watched_run(tmp, "after", 1, "R50.py", "--path-folder", path, "--save-loc", "stopped", "--epochs", 2,
                               "--batch-size", 8, "--image-size", 32, "--no-pretrained", "--no-onnx")
    assert killed.returncode == -signal.SIGKILL
    return path


def flip_bytes(data, start, count=256):
    "The bytes `data` with `count` bytes from `start` inverted."
    return data[:start] + bytes(b ^ 0xFF for b in data[start:start + count]) + data[start + count:]


def hand_made(original, change):
    "A checkpoint file's content changed by `change` (a dict → dict), saved with a digest that matches it."
    content = torch.load(original, weights_only=True)
    content.pop("sha256")
    content = change(content)
    content["sha256"] = checkpoints.content_digest(content)
    return content


@pytest.mark.parametrize("case, message", [
    ("flipped", "is damaged: its content does not match the SHA-256"),
    ("truncated", "is not a checkpoint this version can resume from"),
    ("foreign", "is not a checkpoint this version can resume from"),
    ("no settings", "is not a checkpoint this version can resume from"),
    ("other classes", "does not fit this run's model"),
    ("other dataset", "settings differ from the interrupted run's (data"),
    ("intact", None),
])
def test_damaged_foreign_and_hand_made_checkpoints_are_refused_in_one_line(interrupted, tmp_path, case, message):
    path = shutil.copytree(interrupted, tmp_path / "herlev")
    last = path / "models" / "stopped.last.pth"
    # The copy's own checkpoint, as if the run had been interrupted here: it resumes (checked below).
    torch.save(hand_made(last, lambda c: c | dict(settings=c["settings"] | dict(data=str(path)))), last)
    good = last.read_bytes()
    if case == "flipped":  # bytes flipped inside the weights' data, where a zip reader does not look
        last.write_bytes(flip_bytes(good, len(good) // 2))
    elif case == "truncated":
        last.write_bytes(good[:len(good) // 3])
    elif case == "foreign":
        torch.save({"model": torch.nn.Linear(2, 2).state_dict()}, last)
    elif case == "no settings":
        torch.save(hand_made(last, lambda c: {k: v for k, v in c.items() if k != "settings"}), last)
    elif case == "other classes":
        def three_classes(content):
            head = max(k for k in content["model"] if k.endswith(".weight") and content["model"][k].ndim == 2)
            content["model"][head] = content["model"][head][:3]
            return content
        torch.save(hand_made(last, three_classes), last)
    elif case == "other dataset":
        torch.save(hand_made(last, lambda c: c | dict(settings=c["settings"] | dict(data="/elsewhere"))), last)
    before = {p.name: p.read_bytes() for p in (path / "models").iterdir() if p.is_file()}
    result = run_script("R50.py", "--path-folder", path, "--save-loc", "stopped", "--epochs", 2, "--batch-size", 8,
                        "--image-size", 32, "--no-pretrained", "--no-onnx", "--resume")
    if message is None:  # the untouched copy resumes: the cases above are refused for what was done to them
        assert result.returncode == 0 and "resuming stopped after epoch 1 of 2" in result.stdout, result.stderr[-2000:]
        return
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last_line(result.stderr).startswith("error: ") and message in last_line(result.stderr)
    assert {p.name: p.read_bytes() for p in (path / "models").iterdir() if p.is_file()} == before  # nothing lost


def test_ttl_killed_in_its_second_stage_resumes_without_redoing_the_first(trained, formatted, tmp_path):
    herlev = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    sipakmed = shutil.copytree(formatted / "sipakmed", tmp_path / "sipakmed")
    args = ["--previous-model-da", trained[0] / "models" / "tiny.pth", "--herlev-path", herlev, "--sipakmed-path",
            sipakmed, "--herlev-epochs", 1, "--herlev-batch-size", 8, "--epochs", 3, "--batch-size", 8,
            "--image-size", 32, "--no-onnx"]
    # One SIPaKMeD epoch written (stage 2's first checkpoint), then killed.
    killed, _, _ = watched_run(tmp_path, "after", 1, "R50Herlev.py", *args, "--keep-last",
                               save_loc="resnet50_ttl_sipakmed")
    assert killed.returncode == -signal.SIGKILL
    herlev_weights = herlev / "models" / "resnet50_ttl_herlev.pth"
    first_stage = herlev_weights.read_bytes(), herlev_weights.stat().st_mtime_ns
    assert (herlev / "models" / "resnet50_ttl_herlev.done.json").is_file()
    resumed, batches, _ = watched_run(tmp_path, "watch", 0, "R50Herlev.py", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Herlev stage: finished earlier" in resumed.stdout and "herlev stage:" not in resumed.stdout
    assert (herlev_weights.read_bytes(), herlev_weights.stat().st_mtime_ns) == first_stage
    assert "resuming resnet50_ttl_sipakmed after epoch 1 of 3" in resumed.stdout
    assert sorted(set(batches)) == [1, 2]  # neither the Herlev stage nor SIPaKMeD's first epoch trained again
    assert len(pd.read_csv(sipakmed / "models" / "resnet50_ttl_sipakmed_log.csv")) == 3
    assert not (sipakmed / "models" / "resnet50_ttl_sipakmed.last.pth").exists()
    finished = run_script("R50Herlev.py", *args, "--resume")
    assert finished.returncode == 2 and "nothing to resume: both stages finished" in last_line(finished.stderr)
