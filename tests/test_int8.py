"""INT8 exports: checked against the float export on validation images, refused (and no file left) when the
calibration cannot stand for the images, read back with their settings, and used like any .onnx."""
import functools
import json
import shutil

import numpy as np
import onnx
import pandas as pd
import pytest
from PIL import Image

from conftest import run_script, train
from papsmear import export, learner
from papsmear.files import UserError, sample_images
from papsmear.onnx_model import OnnxClassifier


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory):
    "The demo model exported to ONNX and to INT8 by export_onnx.py --int8, into a folder of their own."
    folder = tmp_path_factory.mktemp("int8")
    result = run_script("export_onnx.py", "--model-path", trained[0] / "models" / "tiny.pth", "--output",
                        folder / "tiny.onnx", "--int8")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "tiny.onnx", folder / "tiny.int8.onnx", result


def test_the_int8_export_agrees_with_the_float_one_and_says_how_it_was_made(quantized, trained):
    float_path, int8_path, result = quantized
    assert "top class as the float ONNX model on 100.0% of 20 validation images" in result.stdout
    val = sample_images(trained[0] / "val")
    expected, found = OnnxClassifier(float_path).predict(val), OnnxClassifier(int8_path).predict(val)
    assert np.mean(expected.argmax(1) == found.argmax(1)) >= export.MIN_AGREEMENT
    assert len(set(expected.argmax(1))) > 1  # a model whose answers vary: agreement means something
    stored = {p.key: p.value for p in onnx.load(str(int8_path)).metadata_props}
    settings = json.loads(stored["quantization"])
    assert settings == dict(format="QDQ", per_channel=True, activations="uint8", weights="int8",
                            calibration=export.CALIBRATION_METHOD, percentile=export.CALIBRATION_PERCENTILE,
                            calibration_images=60)  # the training sources
    record = json.loads(stored["record"])
    assert record["quantization"] == settings and record["classes"] == OnnxClassifier(float_path).classes
    assert int8_path.stat().st_size < float_path.stat().st_size / 3  # weights as int8: about a quarter
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(int8_path)).graph.node)


def test_a_calibration_that_cannot_stand_for_the_images_is_refused_and_leaves_no_file(quantized, trained, tmp_path):
    float_path, _, _ = quantized
    constant = tmp_path / "grey.png"
    Image.new("RGB", (48, 48), (128, 128, 128)).save(constant)
    record = OnnxClassifier(float_path).record
    with pytest.raises(UserError, match="agrees with the float model on the top class of .* no file was kept"):
        export.quantize_export(float_path, tmp_path / "broken.int8.onnx", record, calibration_files=[constant] * 50,
                               check_files=sample_images(trained[0] / "val"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.png"]


def test_inference_takes_the_int8_file_like_any_onnx(quantized, trained, formatted, tmp_path):
    float_path, int8_path, _ = quantized
    for model in (float_path, int8_path):
        result = run_script("Inference_FastAI.py", "--model-path", model, "--test-dataset-path",
                            formatted / "sipakmed" / "test", "--output-dir", tmp_path / model.name, "--bootstrap", 100)
        assert result.returncode == 0, result.stderr[-2000:]
        assert (tmp_path / model.name / "report.html").is_file()
    tables = [pd.read_csv(tmp_path / m.name / "predictions.csv") for m in (float_path, int8_path)]
    assert list(tables[0].columns) == list(tables[1].columns)
    metrics = [json.loads((tmp_path / m.name / "metrics.json").read_text()) for m in (float_path, int8_path)]
    assert metrics[0]["classes"] == metrics[1]["classes"]
    assert np.mean(tables[0]["predicted_class"] == tables[1]["predicted_class"]) >= 0.95


def test_a_training_run_whose_int8_export_fails_its_check_still_ends_with_its_float_model(formatted, tmp_path,
                                                                                         monkeypatch, capsys):
    path = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    strict = functools.partial(export.quantize_export, min_agreement=1.01)  # no INT8 model can pass
    monkeypatch.setattr(learner, "quantize_export", strict)
    result = train(path, save_loc="strict", epochs=1, batch_size=8, image_size=32, pretrained=False, workers=0,
                   int8=True)
    printed = capsys.readouterr().out
    assert result["int8"] is None and "INT8 export not written: the INT8 export of strict.onnx agrees" in printed
    files = sorted(p.name for p in (path / "models").iterdir())
    assert files == ["strict.done.json", "strict.json", "strict.onnx", "strict.pkl", "strict.pth", "strict_curves.png",
                     "strict_log.csv"]
