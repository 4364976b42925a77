"""The evaluation report: intervals, AUC and calibration checked against independent computations,
Grad-CAM maps that answer the class asked, and one self-contained HTML page."""
import base64
import io
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from PIL import Image
from sklearn.metrics import accuracy_score, roc_auc_score
from torch import nn

from conftest import IMAGE_SIZE, run_script
from papsmear import data
from papsmear import files as papfiles
from papsmear import report as reporting

CLASSES = ["Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate"]


class PageParts(HTMLParser):
    "Every tag with its attributes, as an HTML parser reads the page."
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.fixture(scope="module")
def reported(trained, formatted, tmp_path_factory):
    "The trained demo model evaluated from the command line on the demo test split (.pth + .json)."
    out = tmp_path_factory.mktemp("evaluation")
    result = run_script("Inference_FastAI.py", "--model-path", trained[0] / "models" / "tiny.pth",
                        "--test-dataset-path", formatted / "sipakmed" / "test", "--output-dir", out, "--gradcam", 1)
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(out / "predictions.csv")
    return result, out, json.loads((out / "metrics.json").read_text()), table


def truth_and_probabilities(table):
    return (np.array([CLASSES.index(c) for c in table["true_class"]]),
            table[[f"p_{c}" for c in CLASSES]].to_numpy())


def test_auc_per_class_and_macro_equal_sklearns(reported):
    _, _, metrics, table = reported
    truth, probabilities = truth_and_probabilities(table)
    expected = {c: roc_auc_score(truth == i, probabilities[:, i]) for i, c in enumerate(CLASSES)}
    assert metrics["plain"]["auc"] == pytest.approx(expected, abs=1e-6)
    assert metrics["plain"]["macro_auc"] == pytest.approx(np.mean(list(expected.values())), abs=1e-6)


def test_ece_equals_a_direct_computation(reported):
    _, _, metrics, table = reported
    truth, probabilities = truth_and_probabilities(table)
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == truth
    ece = 0.0
    for k in range(15):
        low, high = k / 15, (k + 1) / 15
        inside = (confidence > low) & (confidence <= high) if k else (confidence <= high)
        if inside.any():
            ece += inside.sum() / len(truth) * abs(correct[inside].mean() - confidence[inside].mean())
    assert metrics["plain"]["ece"] == pytest.approx(ece, abs=1e-5)


def test_bootstrap_interval_equals_a_direct_resampling(reported):
    result, _, metrics, table = reported
    truth, probabilities = truth_and_probabilities(table)
    predicted = probabilities.argmax(1)
    rng = np.random.default_rng(0)
    samples = [accuracy_score(truth[i], predicted[i]) for i in rng.integers(0, len(truth), (2000, len(truth)))]
    interval = metrics["plain"]["intervals"]["accuracy"]
    assert [interval["low"], interval["high"]] == pytest.approx(np.percentile(samples, [2.5, 97.5]))
    assert interval["low"] <= interval["value"] == metrics["plain"]["accuracy"] <= interval["high"]
    assert f"accuracy {interval['value']:.4f} (95% CI {interval['low']:.4f}–{interval['high']:.4f})" in result.stdout


def test_abnormal_vs_normal_counts_dyskeratotic_and_koilocytotic_as_abnormal(reported):
    _, _, metrics, table = reported
    screen = metrics["plain"]["abnormal_vs_normal"]
    actual = table["true_class"].isin(["Dyskeratotic", "Koilocytotic"])
    called = table["predicted_class"].isin(["Dyskeratotic", "Koilocytotic"])
    assert screen["abnormal_classes"] == ["Dyskeratotic", "Koilocytotic"]
    assert screen["true_positive"] == (actual & called).sum() and screen["false_negative"] == (actual & ~called).sum()
    assert screen["sensitivity"] == pytest.approx((actual & called).sum() / actual.sum())
    assert screen["specificity"] == pytest.approx((~actual & ~called).sum() / (~actual).sum())
    assert list(table["abnormal"]) == list(called) and set(table["abnormal_rule"]) == {"the most probable class is "
                                                                                      "abnormal"}
    assert reporting.abnormal_vs_normal([0, 1], np.eye(2), ["a", "b"], abnormal=None) is None  # no grouping


def test_gradcam_maps_have_the_input_size_and_answer_the_class_asked(trained, formatted):
    learn = load_learner(trained[0] / "models" / "tiny.pkl")
    files = sorted((formatted / "sipakmed" / "test" / "Parabasal").iterdir())[:2]
    maps_a, images = reporting.gradcam_maps(learn, files, [0, 0])
    maps_b, _ = reporting.gradcam_maps(learn, files, [3, 3])
    assert maps_a.shape == maps_b.shape == (2, IMAGE_SIZE, IMAGE_SIZE)
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(maps_a).all() and maps_a.min() >= 0 and maps_a.max() <= 1
    assert not np.allclose(maps_a, maps_b)  # another class, another map


def test_report_is_one_self_contained_page(reported):
    result, out, metrics, table = reported
    html = (out / "report.html").read_text()
    assert f"report: {out / 'report.html'}" in result.stdout
    parts = PageParts()
    parts.feed(html)
    images = [attrs["src"] for tag, attrs in parts.tags if tag == "img"]
    gallery = sorted((out / "gradcam").iterdir())
    assert len(images) == 3 + len(gallery) and gallery  # ROC, screening ROC, calibration, one per overlay
    for src in images:
        assert src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    links = [value for _, attrs in parts.tags for key, value in attrs.items() if key in ("src", "href")]
    assert all(link.startswith("data:") for link in links)
    assert not [tag for tag, _ in parts.tags if tag in ("script", "link", "iframe")]
    for needle in (papfiles.file_sha256(metrics["model_path"]), ", ".join(CLASSES), "Grad-CAM",
                   f"{100 * metrics['plain']['accuracy']:.1f}%", "abnormal against the rest", "row-normalised"):
        assert needle in html
    misclassified = (table["true_class"] != table["predicted_class"]).sum()
    assert html.count("misclassified · true") == misclassified


def test_no_labels_and_a_missing_class_are_reported_not_errors(trained, formatted, tmp_path):
    test = shutil.copytree(formatted / "sipakmed" / "test", tmp_path / "test")
    shutil.rmtree(test / "Metaplastic")
    result = run_script("Inference_FastAI.py", "--model-path", trained[0] / "models" / "tiny.pkl",
                        "--test-dataset-path", test, "--output-dir", tmp_path / "labelled", "--gradcam", 1,
                        "--bootstrap", 100)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "labelled" / "metrics.json").read_text())
    assert metrics["plain"]["auc"]["Metaplastic"] is None and metrics["plain"]["macro_auc"] is not None
    assert "undefined (no test image of this class)" in (tmp_path / "labelled" / "report.html").read_text()
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for image in sorted((test / "Parabasal").iterdir()):
        shutil.copy(image, unlabelled / f"cell_{image.name}")
    result = run_script("Inference_FastAI.py", "--model-path", trained[0] / "models" / "tiny.pkl",
                        "--test-dataset-path", unlabelled, "--output-dir", tmp_path / "plain", "--gradcam", 1)
    assert result.returncode == 0, result.stderr[-2000:]
    html = (tmp_path / "plain" / "report.html").read_text()
    assert "no accuracy, interval, ROC or calibration can be computed" in html
    assert list((tmp_path / "plain" / "gradcam").iterdir()) and "Grad-CAM of" in html


def test_a_model_without_a_convolutional_body_skips_gradcam_in_one_line(formatted, tmp_path):
    dls = data.pap_dls(formatted / "sipakmed", IMAGE_SIZE, workers=0)
    learn = Learner(dls, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5)),
                    loss_func=CrossEntropyLossFlat())
    learn.export(tmp_path / "pooled.pkl")
    result = run_script("Inference_FastAI.py", "--model-path", tmp_path / "pooled.pkl", "--test-dataset-path",
                        formatted / "sipakmed" / "test", "--output-dir", tmp_path / "out", "--bootstrap", 100)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Grad-CAM skipped: the model has no convolutional body" in result.stdout
    assert (tmp_path / "out" / "report.html").exists() and not (tmp_path / "out" / "gradcam").exists()
