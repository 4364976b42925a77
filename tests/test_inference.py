"""Inference_FastAI.py: metrics equal sklearn's, safe loading, every input mode, bad input."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

from conftest import run_script
from papsmear import files as papfiles
from papsmear import report as reporting

CLASSES = ["Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate"]


@pytest.fixture(scope="module")
def evaluated(trained, formatted, tmp_path_factory):
    "The trained demo model run from the command line on the demo test split (.pkl, with TTA)."
    out = tmp_path_factory.mktemp("report")
    result = run_script("Inference_FastAI.py", "--model-path", trained[0] / "models" / "tiny.pkl",
                        "--test-dataset-path", formatted / "sipakmed" / "test", "--output-dir", out, "--tta")
    return result, out


def test_reported_metrics_equal_sklearns_on_the_same_predictions(evaluated):
    result, out = evaluated
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out / "predictions.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    truth, predicted = table["true_class"], table["predicted_class"]
    assert metrics["classes"] == CLASSES and metrics["n_images"] == len(table) == 20
    assert metrics["plain"]["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert metrics["plain"]["confusion_matrix"] == confusion_matrix(truth, predicted, labels=CLASSES).tolist()
    report = classification_report(truth, predicted, labels=CLASSES, output_dict=True, zero_division=0)
    for name in CLASSES:
        for key in ("precision", "recall", "f1-score", "support"):
            assert metrics["plain"]["report"][name][key] == pytest.approx(report[name][key])
    assert f"accuracy {metrics['plain']['accuracy']:.4f}" in result.stdout
    assert "true Superficial-Intermediate" in result.stdout and "weighted avg" in result.stdout


def test_predictions_csv_has_one_row_per_image_with_probabilities_summing_to_1(evaluated, formatted):
    _, out = evaluated
    table = pd.read_csv(out / "predictions.csv")
    files = sorted(str(p) for p in (formatted / "sipakmed" / "test").rglob("*.bmp"))
    assert sorted(table["file"]) == files
    probabilities = table[[f"p_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert (np.array(CLASSES)[probabilities.argmax(1)] == table["predicted_class"]).all()


def test_confusion_matrix_picture_and_tta_scores_are_written(evaluated):
    result, out = evaluated
    png = (out / "confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    metrics = json.loads((out / "metrics.json").read_text())
    table = pd.read_csv(out / "predictions.csv")
    tta_accuracy = accuracy_score(table["true_class"], table["tta_predicted_class"])
    assert metrics["tta"]["accuracy"] == pytest.approx(tta_accuracy)
    assert f"test-time augmentation: accuracy {tta_accuracy:.4f}" in result.stdout


def test_single_image_and_unlabelled_folder(trained, formatted, tmp_path):
    image = sorted((formatted / "sipakmed" / "test" / "Parabasal").iterdir())[0]
    single = run_script("Inference_FastAI.py", "--model-path", trained[0] / "models" / "tiny.pth",
                        "--test-dataset-path", image, "--output-dir", tmp_path / "one")
    assert single.returncode == 0 and str(image) in single.stdout
    row = pd.read_csv(tmp_path / "one" / "predictions.csv")
    assert len(row) == 1 and "true_class" not in row and row["predicted_class"][0] in CLASSES
    folder = tmp_path / "unlabelled"
    shutil.copytree(formatted / "sipakmed" / "test" / "Metaplastic", folder)
    (folder / "readme.txt").write_text("not an image")
    result = reporting.evaluate_folder(trained[0] / "models" / "tiny.pkl", folder, tmp_path / "many")
    assert len(result["table"]) == 4 and result["metrics"] == {}
    assert not (tmp_path / "many" / "confusion_matrix.png").exists()


def test_corrupt_image_is_listed_skipped_and_exit_code_is_1(trained, formatted, tmp_path):
    test = shutil.copytree(formatted / "sipakmed" / "test", tmp_path / "test")
    (test / "Parabasal" / "broken.bmp").write_bytes(b"BM truncated")
    result = run_script("Inference_FastAI.py", "--model-path", trained[0] / "models" / "tiny.pkl",
                        "--test-dataset-path", test, "--output-dir", tmp_path / "out", "--gradcam", 0,
                        "--bootstrap", 100)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"skipped unreadable image {test / 'Parabasal' / 'broken.bmp'}" in result.stdout
    assert "20 images predicted, 1 skipped" in result.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n_images"] == 20


def test_class_names_must_match_the_model(trained, formatted, tmp_path):
    # Class folders of the model beside one that is not: a labelled test set with a class the model lacks.
    test = shutil.copytree(formatted / "sipakmed" / "test", tmp_path / "test")
    shutil.copytree(formatted / "herlev" / "test" / "normal_superficiel", test / "normal_superficiel")
    result = run_script("Inference_FastAI.py", "--model-path", trained[0] / "models" / "tiny.pkl",
                        "--test-dataset-path", test, "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'normal_superficiel'" in result.stderr and "'Parabasal'" in result.stderr


@pytest.mark.parametrize("case, message", [
    ("missing_model", "does not exist — train with R50.py"),
    ("broken_model", "cannot load"),
    ("no_class_list", "no model record"),
    ("empty_folder", "no images in"),
])
def test_bad_input_is_one_line_with_exit_code_2(trained, formatted, tmp_path, capsys, case, message):
    model, test = trained[0] / "models" / "tiny.pkl", formatted / "sipakmed" / "test"
    if case == "missing_model":
        model = tmp_path / "nowhere.pkl"
    elif case == "broken_model":
        model = tmp_path / "broken.pkl"
        model.write_bytes(b"not a pickle")
    elif case == "no_class_list":
        model = shutil.copy(trained[0] / "models" / "tiny.pth", tmp_path / "bare.pth")
    elif case == "empty_folder":
        test = tmp_path / "empty"
        test.mkdir()
    with pytest.raises(SystemExit) as exit_info, papfiles.user_errors():
        reporting.evaluate_folder(model_path=model, test_dataset_path=test, output_dir=tmp_path / "out")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1
