"""ONNX export checked against fastai, prediction with ONNX Runtime, and prediction over unlabelled folder trees."""
import json
import os
import shutil
from collections import Counter

import numpy as np
import onnx
import pandas as pd
import pytest
from fastai.vision.all import PILImage, Resize
from PIL import Image

from conftest import last_line, run_script
from papsmear import export, predict
from papsmear import report as reporting
from papsmear.files import UserError, sample_images
from papsmear.onnx_model import CUTTING_RULE, OnnxClassifier, image_batch, square_image
from papsmear.screening import SIPAKMED_GROUPS

ABNORMAL = {"Dyskeratotic", "Koilocytotic"}


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    "The demo model's weights exported by export_onnx.py into a folder of their own."
    folder = tmp_path_factory.mktemp("onnx")
    result = run_script("export_onnx.py", "--model-path", trained[0] / "models" / "tiny.pth", "--output",
                        folder / "tiny.onnx")
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / "tiny.onnx", result


@pytest.mark.parametrize("size, shorter", [(224, 230), (224, 61), (224, 251), (299, 86), (299, 221), (224, 224),
                                           (299, 300)])
def test_the_cutting_rule_is_fastais_validation_resize_on_non_square_images(size, shorter):
    rng = np.random.default_rng(shorter)
    for width, height in ((shorter, shorter + 70), (shorter + 71, shorter)):  # tall and wide, odd margins
        image = PILImage.create(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = np.asarray(Resize(size)(image, split_idx=1))
        assert np.array_equal(np.asarray(square_image(image, size)), expected)
        # The rule as the README and the ONNX metadata state it, computed by hand.
        side = int(min(width, height) / size * size)
        left, top = int(0.5 * (width - side)), int(0.5 * (height - side))
        by_hand = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
        assert np.array_equal(np.asarray(by_hand), expected)
        if side != shorter:  # the sizes where "the shorter side" would be wrong: another crop, other pixels
            naive = image.crop(((width - shorter) // 2, (height - shorter) // 2, (width - shorter) // 2 + shorter,
                                (height - shorter) // 2 + shorter)).resize((size, size), Image.BILINEAR)
            assert not np.array_equal(np.asarray(naive), expected)
    rule = CUTTING_RULE.format(size=size)
    assert f"int(shorter / {size} * {size})" in rule and "int(0.5 * (width - side))" in rule


def test_onnx_runtime_agrees_with_fastai_on_the_test_split(trained, formatted, exported):
    onnx_path, result = exported
    assert "ONNX Runtime agrees with fastai within" in result.stdout
    files = sample_images(formatted / "sipakmed" / "test")
    learn, record = predict.load_classifier(trained[0] / "models" / "tiny.pth", files)
    classes = record.classes
    expected = predict.predict_files(learn, files)
    model = OnnxClassifier(onnx_path)
    assert np.abs(model.predict(files, batch_size=7) - expected).max() < 1e-3
    metadata = onnx.load(str(onnx_path)).metadata_props
    stored = {p.key: p.value for p in metadata}
    assert json.loads(stored["classes"]) == classes and stored["image_size"] == "48"
    assert stored["preprocessing"] == CUTTING_RULE.format(size=48) and stored["recipe"] == "original"
    assert json.loads(stored["record"])["classes"] == classes
    # Training writes the export too, checked the same way.
    assert (trained[0] / "models" / "tiny.onnx").is_file() and trained[1]["onnx"] == trained[0] / "models" / "tiny.onnx"


def test_pkl_pth_and_onnx_predict_the_same(trained, formatted, exported, tmp_path):
    test = formatted / "sipakmed" / "test"
    predicted, tables = {}, {}
    for model in (trained[0] / "models" / "tiny.pkl", trained[0] / "models" / "tiny.pth"):
        result = reporting.evaluate_folder(model, test, output_dir=tmp_path / model.suffix, gradcam=0, bootstrap=100)
        predicted[model.suffix], tables[model.suffix] = list(result["table"]["predicted_class"]), result["table"]
    probabilities = [f"p_{c}" for c in result["classes"]]
    assert np.allclose(tables[".pkl"][probabilities], tables[".pth"][probabilities], atol=1e-5)
    cli = run_script("Inference_FastAI.py", "--model-path", exported[0], "--test-dataset-path", test,
                     "--output-dir", tmp_path / "onnx", "--bootstrap", 100)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "Grad-CAM skipped: it needs the PyTorch model" in cli.stdout
    table = pd.read_csv(tmp_path / "onnx" / "predictions.csv")
    assert predicted[".pkl"] == predicted[".pth"] == list(table["predicted_class"])
    assert np.abs(table[probabilities].to_numpy() - tables[".pth"][probabilities].to_numpy()).max() < 1e-3
    assert np.abs(table["p_abnormal"] - tables[".pth"]["p_abnormal"]).max() < 1e-3
    metrics = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    pth = json.loads((tmp_path / ".pth" / "metrics.json").read_text())
    assert metrics["plain"]["accuracy"] == pytest.approx(np.mean(table["predicted_class"] == table["true_class"]))
    for key in ("accuracy", "balanced_accuracy", "confusion_matrix", "intervals"):
        assert metrics["plain"][key] == pth["plain"][key]
    screen, expected = metrics["plain"]["abnormal_vs_normal"], pth["plain"]["abnormal_vs_normal"]
    assert screen["intervals"] == expected["intervals"] and screen["auc"] == pytest.approx(expected["auc"], abs=1e-3)
    assert (tmp_path / "onnx" / "report.html").is_file()


def test_a_nested_unlabelled_tree_keeps_relative_paths_and_counts_per_folder(exported, formatted, tmp_path):
    test = formatted / "sipakmed" / "test"
    tree = tmp_path / "scanner export"
    for folder, source in (("patient A/slide 1/field 1", "Dyskeratotic"), ("patient A/slide 1/field 2", "Parabasal"),
                           ("patient B/slide 7", "Koilocytotic")):
        shutil.copytree(test / source, tree / folder)
    os.symlink(tree / "patient A", tree / "patient A" / "slide 1" / "back to patient A")  # a loop
    result = reporting.evaluate_folder(exported[0], tree, output_dir=tmp_path / "out", gradcam=0)
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    expected = sorted(f"{os.path.relpath(root, tree)}/{name}" for root, _, names in os.walk(tree) for name in names)
    assert sorted(table["relative_path"]) == expected and result["metrics"] == {}
    folders = pd.read_csv(tmp_path / "out" / "folders.csv").set_index("folder")
    for folder, rows in table.groupby("folder"):
        counts = Counter(rows["predicted_class"])
        assert folders.loc[folder, "images"] == len(rows)
        assert all(folders.loc[folder, name] == counts.get(name, 0) for name in SIPAKMED_GROUPS)
        assert folders.loc[folder, "abnormal"] == sum(counts[name] for name in ABNORMAL)
    assert set(folders.index) == {"patient A/slide 1/field 1", "patient A/slide 1/field 2", "patient B/slide 7"}
    assert "By folder" in result["report"].read_text()


def test_bad_onnx_files_are_refused_in_one_line(trained, exported, formatted, tmp_path):
    test = formatted / "sipakmed" / "test"
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model at all")
    result = run_script("Inference_FastAI.py", "--model-path", broken, "--test-dataset-path", test,
                        "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "is not an ONNX model" in last_line(result.stderr)
    model = onnx.load(str(exported[0]))
    original = {p.key: p.value for p in model.metadata_props}
    record = json.loads(original["record"])

    def mirrored(**values):
        "Metadata whose record and mirrored keys both say `values`, as a careful forger would write them."
        return {"record": json.dumps(record | values),
                **{k: json.dumps(v) if k == "classes" else str(v) for k, v in values.items() if k in original}}
    for name, change, message in (
            ("anonymous", {"producer": "someone else"}, "has no Deep Cervical Cancer metadata"),
            ("three", mirrored(classes=["a", "b", "c"], abnormal_classes=["a"]), "has 5 outputs but"),
            ("bigger", mirrored(image_size=64), "not uint8 images [batch, 64, 64, 3]"),
            ("disagreeing", {"classes": json.dumps(["a", "b", "c", "d", "e"])}, "disagrees with itself"),
            ("path as class", mirrored(classes=["../../../x", *record["classes"][1:]], abnormal_classes=None),
             "names a class '../../../x' that is not a plain folder name"),
            ("enormous", mirrored(image_size=10 ** 9), "is not a model record"),
            ("negative", mirrored(image_size=-48), "is not a model record"),
            ("broken record", {"record": "{not json"}, "is not a model record"),
            ("classes not a list", mirrored(classes="Parabasal"), "is not a model record"),
            ("abnormal not a class", mirrored(abnormal_classes=["Cancer"]), "stores abnormal classes ['Cancer']"),
            ("threshold out of range", mirrored(operating_point=dict(threshold=7, target_sensitivity=0.9,
                                                                     chosen_on="x")), "stores an operating point")):
        stored = original | change
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, stored)
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        with pytest.raises(UserError, match=message.replace("[", r"\[")):
            OnnxClassifier(tmp_path / f"{name}.onnx")
    with pytest.raises(UserError, match="no images anywhere under"):
        predict.list_tree(tmp_path / "out")


def test_the_export_check_refuses_a_wrong_export_and_leaves_no_file(trained, formatted, tmp_path, monkeypatch):
    files = sample_images(formatted / "sipakmed" / "val")
    learn, record = predict.load_classifier(trained[0] / "models" / "tiny.pth", files)

    def without_normalisation(self, images):
        return self.network(images.permute(0, 3, 1, 2).float() / 255).softmax(dim=1)

    monkeypatch.setattr(export.ImageInputModel, "forward", without_normalisation)
    with pytest.raises(UserError, match="differs from fastai by"):
        export.export_onnx(learn, tmp_path / "wrong.onnx", record, check_files=files)
    assert list(tmp_path.iterdir()) == []
    assert image_batch(files[:2], 48).shape == (2, 48, 48, 3)
