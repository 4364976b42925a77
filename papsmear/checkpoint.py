"""Resuming a training run: the last-epoch checkpoint, the record of a finished run, and the callback that
writes the one and continues from it.

The checkpoint models/<save_loc>.last.pth holds the model, the optimiser, the epoch, every random state, the
log rows so far, the best score kept so far, the run's settings and the SHA-256 of all of that, checked before
a run resumes from it. It is rewritten atomically after every epoch by rank 0 and removed when the run ends,
unless asked to keep it. A finished run leaves
models/<save_loc>.done.json, so that a resumed Triple Transfer Learning never redoes a finished stage.
"""
import hashlib
import json
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback, CancelEpochException
from fastai.torch_core import get_model
from fastcore.foundation import L

from papsmear.files import UserError, atomic_output
from papsmear.launch import is_main_process
from papsmear.record import RESUME_SETTINGS

CHECKPOINT_FORMAT = 2  # raise when the checkpoint's content changes, so an older one is refused, not misread
# What a checkpoint holds, each with the type it must have; anything else is not one of ours.
CHECKPOINT_PARTS = dict(format=int, sha256=str, epoch=int, model=dict, opt=dict, best=float, rows=list,
                        smooth_loss=dict, settings=dict, random=dict)


def checkpoint_path(models, save_loc):
    "Where a run named `save_loc` keeps its last-epoch checkpoint."
    return Path(models) / f"{save_loc}.last.pth"


def done_path(models, save_loc):
    "Where a run named `save_loc` records that it finished."
    return Path(models) / f"{save_loc}.done.json"


def random_states(learn):
    "Every random state the next epoch draws from: Python, NumPy, torch (CPU and CUDA), and each loader's own."
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return dict(python=random.getstate(), numpy=[kind, keys.tolist(), position, has_gauss, cached],
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                loaders=[loader_rng(dl).getstate() for dl in learn.dls.loaders])


def loader_rng(dl):
    "The random generator of a data loader, or of the one a distributed loader wraps (under a launcher)."
    return getattr(dl, "dl", dl).rng


def restore_random_states(learn, states):
    "Set every random state `random_states` saved."
    random.setstate(_as_tuples(states["python"]))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    for dl, state in zip(learn.dls.loaders, states["loaders"], strict=True):
        loader_rng(dl).setstate(_as_tuples(state))


def plain_values(value):
    """`value` with fastai lists and NumPy scalars (fastai's schedules set hyper-parameters as NumPy floats)
    turned into Python lists, dicts and numbers, which torch.load reads with weights_only."""
    if isinstance(value, dict):
        return {key: plain_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, L)):
        return [plain_values(item) for item in value]
    return value.item() if isinstance(value, np.generic) else value


def _as_tuples(state):
    "A Python random state read back from a checkpoint, with its lists turned back into tuples."
    return tuple(_as_tuples(part) if isinstance(part, list) else part for part in state)


def content_digest(value, digest=None):
    """SHA-256 of a checkpoint's content: every tensor's type, shape and bytes and every other value's text, in
    key order (lists and tuples alike, since a checkpoint read back may hold either)."""
    top = digest is None
    digest = hashlib.sha256() if top else digest
    if isinstance(value, dict):
        digest.update(f"{{{len(value)}".encode())
        for key in sorted(value, key=str):
            digest.update(repr(key).encode())
            content_digest(value[key], digest)
    elif isinstance(value, (list, tuple, L)):
        digest.update(f"[{len(value)}".encode())
        for item in value:
            content_digest(item, digest)
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{tensor.dtype}{tuple(value.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    else:
        digest.update(repr(value).encode())
    return digest.hexdigest() if top else None


def read_checkpoint(path):
    """The checkpoint at `path` (read with weights_only: nothing is unpickled); a clear error when there is
    none, it is not one of ours, or its content no longer matches the SHA-256 written with it (a damaged or
    altered file)."""
    if not Path(path).is_file():
        raise UserError(f"no checkpoint {path} to resume from: the run finished (its checkpoint is removed "
                        "then, unless --keep-last) or never completed an epoch — run again without --resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        usable = isinstance(checkpoint, dict) and checkpoint.get("format") == CHECKPOINT_FORMAT and all(
            isinstance(checkpoint.get(part), kind) for part, kind in CHECKPOINT_PARTS.items())
        rows, smooth = (checkpoint["rows"], checkpoint["smooth_loss"]) if usable else ([], {})
        usable = usable and len(rows) == checkpoint["epoch"] + 1 and set(smooth) == {"count", "val"} and all(
            isinstance(row, (list, tuple)) and len(row) == 2 and isinstance(row[0], (list, tuple)) for row in rows)
    except Exception:  # torch.load raises many kinds for a file that is not a checkpoint
        usable = False
    if not usable:
        raise UserError(f"{path} is not a checkpoint this version can resume from — run again without --resume")
    stored = checkpoint.pop("sha256")
    if content_digest(checkpoint) != stored:
        raise UserError(f"{path} is damaged: its content does not match the SHA-256 written with it — run again "
                        "without --resume")
    return checkpoint


def setting_differences(recorded, current, names):
    "'name recorded → current' for each of `names` whose recorded setting differs from the current one."
    return [f"{name} {recorded.get(name)!r} → {current.get(name)!r}" for name in names
            if recorded.get(name) != current.get(name)]


def check_same_settings(saved, current, path):
    "Refuse to resume with settings that differ from the checkpoint's, naming each difference."
    differences = setting_differences(saved, current, RESUME_SETTINGS)
    if differences:
        raise UserError(f"cannot resume {path}: settings differ from the interrupted run's ({'; '.join(differences)})"
                        " — resume with the same settings, or run again without --resume")


def write_done(models, save_loc, settings):
    "Record that the run `save_loc` finished, with its settings (atomically; rank 0 only)."
    if is_main_process():
        record = dict(settings=settings, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with atomic_output(done_path(models, save_loc)) as tmp:
            tmp.write_text(json.dumps(record, indent=2))


def finished_settings(models, save_loc):
    "The settings recorded by a finished run `save_loc`, or None when no finished run is recorded."
    path = done_path(models, save_loc)
    try:
        return json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stage_finished(models, save_loc, expected):
    """Whether the run `save_loc` finished with the `expected` settings (those it names); a run that finished
    with other settings is refused, naming the differences."""
    recorded = finished_settings(models, save_loc)
    if recorded is None:
        return False
    differences = setting_differences(recorded, expected, expected)
    if differences:
        raise UserError(f"{done_path(models, save_loc)} records a run with other settings ({'; '.join(differences)})"
                        " — resume with the same settings, or run again without --resume")
    return True


class LastEpochCheckpoint(Callback):
    """Writes the last-epoch checkpoint after every epoch (rank 0). Given a checkpoint to resume from (loaded
    into the learner by `load_checkpoint`), it replays the finished epochs without training: their log rows
    come back from the checkpoint, and the schedule, the best-epoch keeper, the smoothed training loss and
    every random state continue where the run stopped."""
    order = 90  # after the recorder (50), the best-epoch keeper and the CSV log (60)

    def __init__(self, path, settings, keeper, resume_from=None):
        self.path, self.settings, self.keeper, self.resume_from = Path(path), settings, keeper, resume_from
        self.rows = []

    def before_fit(self):
        "Start a new list of log rows; when resuming, take over the best score kept so far."
        self.rows = []
        if self.resume_from is not None:
            self.keeper.best = self.resume_from["best"]  # after the keeper's own before_fit (order 60)

    def before_epoch(self):
        "Replay a finished epoch from its log row; at the first new one, restore the random states."
        if self.resume_from is None:
            return
        if self.epoch < len(self.resume_from["rows"]):
            values, seconds = self.resume_from["rows"][self.epoch]
            self.recorder.log = L([self.epoch, *values])
            self.recorder.start_epoch = time.time() - seconds
            raise CancelEpochException
        if self.epoch == len(self.resume_from["rows"]):
            try:
                restore_random_states(self.learn, self.resume_from["random"])
            except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as e:
                raise UserError(f"{self.path} holds random states this run cannot take ({type(e).__name__}) — "
                                "run again without --resume") from None
            # The training loss shown is a moving average that runs on across epochs.
            smooth = self.recorder.smooth_loss
            smooth.count = self.resume_from["smooth_loss"]["count"]
            smooth.val = torch.tensor(self.resume_from["smooth_loss"]["val"])

    def after_epoch(self):
        "Keep this epoch's log row and write the checkpoint (rank 0), atomically."
        if self.resume_from is not None and self.epoch < len(self.resume_from["rows"]):
            self.rows.append(self.resume_from["rows"][self.epoch])
            return
        self.rows.append([list(map(float, self.recorder.values[-1])), time.time() - self.recorder.start_epoch])
        if not is_main_process():
            return
        opt = self.learn.opt.state_dict()
        opt["hypers"] = plain_values(list(opt["hypers"]))
        checkpoint = dict(format=CHECKPOINT_FORMAT, epoch=self.epoch, model=get_model(self.learn.model).state_dict(),
                          opt=opt, best=float(self.keeper.best), rows=self.rows,
                          smooth_loss=dict(count=self.recorder.smooth_loss.count,
                                           val=float(self.recorder.smooth_loss.val)),
                          settings=self.settings, random=random_states(self.learn))
        checkpoint["sha256"] = content_digest(checkpoint)
        with atomic_output(self.path) as tmp:
            torch.save(checkpoint, tmp)


def load_checkpoint(learn, checkpoint, path):
    """Put a checkpoint's model and optimiser state into `learn` (whose optimiser is made if it has none); a
    clear error when they do not fit the learner (another network or class count)."""
    try:
        learn.model.load_state_dict(checkpoint["model"])
        if learn.opt is None:
            learn.create_opt()
        learn.opt.load_state_dict(dict(checkpoint["opt"], hypers=L(checkpoint["opt"]["hypers"])))
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{path} does not fit this run's model ({type(e).__name__}: {str(e).splitlines()[0][:160]}) "
                        "— run again without --resume") from None
