"""Imbalanced classes: which validation score picks the best epoch, class-weighted losses, class-balanced
sampling, and the note that tells a user their training split is imbalanced."""
from collections import Counter
from pathlib import Path

import numpy as np
from fastai.callback.data import WeightedDL
from sklearn.metrics import recall_score

from papsmear.files import UserError
from papsmear.presize import PresizedDL

# Validation scores that can choose the best epoch. `accuracy` is the original's; the other two give every
# class the same say, so a model that calls every cell the majority class cannot win with them.
MONITORS = ("accuracy", "balanced_accuracy", "macro_f1")

# How training makes up for imbalance: `none` (the original), a class-weighted loss (`inverse` or `sqrt`
# of the inverse class frequency), or a sampler that draws each class equally often (`sampler`).
BALANCES = ("none", "inverse", "sqrt", "sampler")

IMBALANCE_RATIO = 3  # largest class more than this many times the smallest: the training split is imbalanced


def balanced_accuracy(truth, predicted):
    """Mean recall over the classes present in `truth` (scikit-learn's balanced accuracy), without its
    warning when a batch of predictions holds a class the truth lacks."""
    return recall_score(truth, predicted, labels=np.unique(truth), average="macro", zero_division=0)


def check_monitor(monitor):
    "Refuse a monitor that is not one of `MONITORS`."
    if monitor not in MONITORS:
        raise UserError(f"monitor {monitor!r} is unknown — use {', '.join(MONITORS)}")


def check_balance(balance):
    "Refuse a balance that is not one of `BALANCES`."
    if balance not in BALANCES:
        raise UserError(f"balance {balance!r} is unknown — use {', '.join(BALANCES)}")


def class_counts(dls):
    "Training images per class, in the order of the data's classes (`dls.vocab`)."
    counts = Counter(Path(item).parent.name for item in dls.train_ds.items)
    return np.array([counts[str(name)] for name in dls.vocab])


def class_weights(counts, balance):
    """Loss weight per class from the training counts: `inverse` gives n / (k · n_c), scikit-learn's
    "balanced" weights (every class then weighs as much in total); `sqrt` their square root, a milder
    correction; `none` and `sampler` weight every class 1."""
    counts = np.asarray(counts, dtype=np.float64)
    inverse = counts.sum() / (len(counts) * counts)
    return {"inverse": inverse, "sqrt": np.sqrt(inverse)}.get(balance, np.ones_like(counts))


class BalancedPresizedDL(WeightedDL, PresizedDL):
    "fastai's `WeightedDL` sampling over presized images held in memory."


def balanced_loader(dl, counts):
    """The training loader `dl` made to draw each class equally often per epoch, in expectation: fastai's
    `WeightedDL` with each image weighted by 1 / (its class's count), drawn with replacement (as many draws
    as images). Works on file loaders and on loaders of presized images in memory."""
    labels = [Path(item).parent.name for item in dl.dataset.items]
    per_class = dict(zip(map(str, dl.dataset.vocab), counts, strict=True))
    weights = [1 / per_class[label] for label in labels]
    return dl.new(cls=BalancedPresizedDL if isinstance(dl, PresizedDL) else WeightedDL, wgts=weights)


def imbalance_note(counts, classes, balance="none", monitor="accuracy"):
    """A line saying that the training split is imbalanced (largest class more than `IMBALANCE_RATIO` times
    the smallest), with the options that make up for it when they are off; None when it is not."""
    largest, smallest = int(np.argmax(counts)), int(np.argmin(counts))
    if counts[largest] <= IMBALANCE_RATIO * counts[smallest]:
        return None
    note = (f"imbalanced training split: {classes[largest]} has {counts[largest]} images, {classes[smallest]} "
            f"{counts[smallest]} ({counts[largest] / counts[smallest]:.1f}×)")
    advice = [option for option, off in (("--balance sampler (or inverse, sqrt)", balance == "none"),
                                         ("--monitor balanced_accuracy", monitor == "accuracy")) if off]
    return note + (f" — consider {' and '.join(advice)} (README: Imbalanced classes)" if advice else "")
