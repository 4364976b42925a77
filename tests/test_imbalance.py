"""Imbalanced classes: scores a majority-class model cannot win, the monitor that picks the best epoch, balanced
sampling and class weights, and the warnings of the division and of training."""
import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.metrics import ValueMetric
from fastai.vision.all import DataLoaders
from torch import nn

import synthetic_papsmear as demo
from conftest import run_script
from papsmear import balance, data, division, learner
from papsmear import report as reporting

MAJORITY = "normal_intermediate"
COUNTS = {MAJORITY: 40, "carcinoma_in_situ": 4, "light_dysplastic": 4}  # one class 10x the others


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    "(raw, divided) synthetic Herlev-like data with one class ten times the size of the others."
    root = tmp_path_factory.mktemp("imbalanced")
    demo.generate_herlev(root / "raw", n_images=COUNTS, size=40, seed=5, classes=tuple(COUNTS))
    division.divide_dataset(root / "raw", root / "divided", progress=False)
    return root / "raw", root / "divided"


def train_counts(path):
    "Training images per class, counted on disk."
    return {folder.name: len(list(folder.iterdir())) for folder in (path / "train").iterdir()}


def test_a_majority_class_model_gets_one_over_k_balanced_accuracy(trained, imbalanced, tmp_path):
    _, divided = imbalanced
    state = learner.read_weights(trained[0] / "models" / "tiny.pth")
    # A copy of the demo model made to answer the majority class for every image: the head's last BatchNorm
    # outputs ones whatever the image, and the last layer (no bias) turns ones into a vote for that class only.
    linears = [k for k in state if k.startswith("1.") and k.endswith(".weight") and state[k].ndim == 2]
    last = max(linears, key=lambda k: int(k.split(".")[1]))
    norm = f"1.{int(last.split('.')[1]) - 2}"  # BatchNorm1d, Dropout, Linear
    state[f"{norm}.weight"], state[f"{norm}.bias"] = torch.zeros_like(state[f"{norm}.weight"]), torch.ones_like(
        state[f"{norm}.bias"])
    state[last] = torch.zeros(len(COUNTS), state[last].shape[1])
    state[last][list(COUNTS).index(MAJORITY)] = 1.0
    torch.save(state, tmp_path / "majority.pth")
    (tmp_path / "majority.json").write_text(json.dumps(dict(classes=list(COUNTS), image_size=48)))
    result = reporting.evaluate_folder(tmp_path / "majority.pth", divided / "test", output_dir=tmp_path / "out",
                                       gradcam=0, bootstrap=100)
    plain = json.loads((tmp_path / "out" / "metrics.json").read_text())["plain"]
    matrix = np.array(plain["confusion_matrix"])
    assert (matrix.argmax(1) == list(COUNTS).index(MAJORITY)).all()  # every image called the majority class
    recalls = [matrix[i, i] / matrix[i].sum() for i in range(len(COUNTS))]
    assert plain["balanced_accuracy"] == pytest.approx(np.mean(recalls)) == pytest.approx(1 / len(COUNTS))
    assert plain["intervals"]["balanced_accuracy"]["value"] == pytest.approx(1 / len(COUNTS))
    share = matrix[list(COUNTS).index(MAJORITY)].sum() / matrix.sum()
    assert plain["accuracy"] == pytest.approx(share) == pytest.approx(plain["majority_baseline"]["accuracy"])
    assert plain["majority_baseline"]["class"] == MAJORITY
    page = result["report"].read_text()
    assert f"majority-class baseline: {100 * share:.1f}%" in page and "balanced accuracy" in page


class WeightsPerEpoch(Callback):
    "Records the model's weights at the end of every epoch."
    def before_fit(self):
        self.seen = []

    def after_epoch(self):
        self.seen.append(self.learn.model.weight.detach().clone())


def test_the_monitor_keeps_the_epoch_with_its_best_score(tmp_path):
    # Accuracy is best at epoch 1, balanced accuracy at epoch 2, macro F1 at epoch 0: the kept weights must be
    # those of the monitor's best epoch.
    scores = {"accuracy": [0.5, 0.8, 0.7], "balanced_accuracy": [0.4, 0.3, 0.6], "macro_f1": [0.3, 0.2, 0.1]}
    for monitor, values in scores.items():
        dls = DataLoaders.from_dsets([(torch.randn(3), torch.tensor(i % 2)) for i in range(8)],
                                     [(torch.randn(3), torch.tensor(0))] * 4, bs=4, device="cpu")
        current = {}
        metrics = [ValueMetric(lambda v=v, c=current: v[c["learn"].epoch], metric_name=name)
                   for name, v in scores.items()]
        learn = current["learn"] = Learner(dls, nn.Linear(3, 2), loss_func=nn.CrossEntropyLoss(), path=tmp_path,
                                           metrics=metrics)
        recorder = WeightsPerEpoch()
        keeper = learner.best_epoch_keeper(learn, f"scripted_{monitor}", monitor=monitor)
        learn.fit(3, 0.5, cbs=[keeper, recorder])
        best_epoch = int(np.argmax(values))
        assert keeper.best == pytest.approx(values[best_epoch])
        saved = torch.load(tmp_path / "models" / f".scripted_{monitor}.running.pth", weights_only=True)
        assert torch.equal(saved["weight"], recorder.seen[best_epoch])
        assert not any(torch.equal(saved["weight"], w) for e, w in enumerate(recorder.seen) if e != best_epoch)
    with pytest.raises(Exception, match="monitor 'loss' is unknown"):
        learner.best_epoch_keeper(learn, "x", monitor="loss")


def test_the_sampler_draws_each_class_equally_in_expectation(imbalanced):
    _, divided = imbalanced
    on_disk = train_counts(divided)
    assert max(on_disk.values()) >= 10 * min(on_disk.values())
    for memory_budget in (None, 0):  # presized in memory, then read from the files
        dls = data.pap_dls(divided, image_size=16, batch_size=8, memory_budget=memory_budget, balance="sampler")
        # The labels of the batches the training loader yields, epoch after epoch.
        drawn = torch.cat([y for _ in range(40 if memory_budget is None else 10) for _, y in dls.train])
        shares = {dls.vocab[int(label)]: n / len(drawn) for label, n in Counter(drawn.tolist()).items()}
        assert shares == pytest.approx({name: 1 / len(on_disk) for name in on_disk}, abs=0.04 if memory_budget is None
                                       else 0.07)
        assert len(drawn) % (len(dls.train_ds) // 8 * 8) == 0  # as many draws per epoch as images (full batches)


def test_class_weights_follow_the_formula_on_the_training_counts(imbalanced):
    _, divided = imbalanced
    on_disk = train_counts(divided)
    dls = data.pap_dls(divided, image_size=16, batch_size=4)
    n, k = sum(on_disk.values()), len(on_disk)
    for rule, expected in (("inverse", {c: n / (k * m) for c, m in on_disk.items()}),
                           ("sqrt", {c: (n / (k * m)) ** 0.5 for c, m in on_disk.items()})):
        weight = learner.pap_learner(dls, balance=rule).loss_func.func.weight
        assert dict(zip(dls.vocab, weight.tolist(), strict=True)) == pytest.approx(expected)
    assert learner.pap_learner(dls).loss_func.func.weight is None  # the original: unweighted


def test_division_and_training_say_when_classes_are_small_or_imbalanced(imbalanced, tmp_path):
    raw, _ = imbalanced
    result = run_script("implementation_DatasetDivision.py", "--path-dir", raw, "--output-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(tmp_path / "out" / "split.csv")
    assert len(table) == sum(COUNTS.values())
    for name in COUNTS:
        val, test = (len(list((tmp_path / "out" / split / name).iterdir())) for split in ("val", "test"))
        warned = f"warning: class {name} gets" in result.stdout
        assert warned == (min(val, test) < 5), result.stdout
    note = balance.imbalance_note(np.array([40, 4]), ["big", "small"])
    assert note.startswith("imbalanced training split: big has 40 images, small 4 (10.0×)")
    assert "--balance sampler" in note and "--monitor balanced_accuracy" in note
    assert balance.imbalance_note(np.array([12, 4]), ["big", "small"]) is None
    assert "consider" not in balance.imbalance_note(np.array([40, 4]), ["big", "small"], balance="sampler",
                                                    monitor="macro_f1")


def test_training_logs_every_score_of_the_whole_validation_set(trained):
    _, result = trained
    log = pd.read_csv(result["log"])
    assert {"accuracy", "balanced_accuracy", "macro_f1", "f2_weighted", "f1_weighted"} <= set(log.columns)
    learn = result["learner"]
    probabilities, truth = learn.get_preds(dl=learn.dls.valid)
    predicted, truth = probabilities.argmax(1).numpy(), truth.numpy()
    best = log.loc[log["accuracy"].idxmax()]  # the kept epoch, loaded back at the end of training
    recalls = [np.mean(predicted[truth == c] == c) for c in np.unique(truth)]
    assert best["balanced_accuracy"] == pytest.approx(np.mean(recalls), abs=1e-6)
    assert result["scores"].loc["validation", "balanced_accuracy"] == pytest.approx(np.mean(recalls), abs=1e-6)
