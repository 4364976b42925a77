"""INT8 against float on real cells: a trained model (.pth + .json, from R50.py) exported to ONNX, then quantized
with each calibration method (ONNX Runtime's static quantization, calibrated on the dataset's training images).
Prints, on the dataset's test split, the accuracy and balanced accuracy of the float and of each INT8 model, the
top-1 agreement of INT8 with float (on the validation split, the export's check, and on the test split) and the
largest probability difference, and the network's speed at batch 16
(warm-up, then the median of `repeats`). The calibration method the exports use was chosen with this.

    python R50.py --path-folder ../herlev_formatted --epochs 30 --image-size 64 --no-pretrained --save-loc herlev64
    python benchmarks/int8.py --model-path ../herlev_formatted/models/herlev64.pth
"""
import sys
import tempfile
from pathlib import Path
from typing import Annotated

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from fastcore.script import call_parse  # noqa: E402
from sklearn.metrics import accuracy_score, balanced_accuracy_score  # noqa: E402

from papsmear import export, predict  # noqa: E402
from papsmear.files import available_cpus, sample_images, user_errors, user_path  # noqa: E402
from papsmear.onnx_model import OnnxClassifier, image_batch  # noqa: E402
from timing import repeated, spread  # noqa: E402


def network_speed(model, images, batch_size, repeats):
    "(median, min, max) seconds of the network alone on already-cut images, `batch_size` at a time."
    chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    return repeated(lambda: [model.probabilities(chunk) for chunk in chunks], repeats=repeats)[:3]


@call_parse
def main(model_path: Path = Path("../herlev_formatted/models/herlev64.pth"),  # .pth with its .json
         methods: Annotated[list, {"nargs": "+", "type": str}] = ("MinMax", "Entropy", "Percentile"),
         batch_size: int = 16,   # batch of the speed figures
         repeats: int = 5):      # timed runs after a warm-up
    "Quantize a trained model with each calibration method; compare with float on the test split."
    with user_errors():
        model_path = user_path(model_path)
        dataset = model_path.parent.parent
        test, labels, _ = predict.list_inputs(dataset / "test")
        learn, record = predict.load_classifier(model_path, test)
        truth = [record.classes.index(label) for label in labels]
        with tempfile.TemporaryDirectory() as folder:
            float_path, _, _ = export.export_onnx(learn, Path(folder) / "float.onnx", record,
                                                  check_files=sample_images(dataset / "val"))
            models = {"float": OnnxClassifier(float_path, threads=available_cpus())}
            validation = {"float": 1.0}  # top-1 agreement with float on the validation split (the export's check)
            for method in methods:
                quantized = export.quantize_export(float_path, Path(folder) / f"{method}.int8.onnx", record,
                                                   calibration_files=sample_images(dataset / "train"),
                                                   check_files=sample_images(dataset / "val"), method=method,
                                                   min_agreement=0)  # every method's figures, passing or not
                models[method] = OnnxClassifier(quantized["path"], threads=available_cpus())
                validation[method] = quantized["agreement"]
            images = image_batch(test, record.image_size)
            expected = models["float"].probabilities(images)
            print(f"{model_path.name} on {dataset / 'test'} ({len(test)} images, {record.image_size} px), "
                  f"{available_cpus()} cores; network alone at batch {batch_size}, median of {repeats} (min–max)")
            print("model      | accuracy | balanced accuracy | top-1 as float (val) | top-1 as float (test) | "
                  "largest p difference | seconds | images/s | × float")
            float_seconds = None
            for name, model in models.items():
                probabilities = model.probabilities(images)
                predicted = probabilities.argmax(1)
                timing = network_speed(model, images, batch_size, repeats)
                float_seconds = float_seconds or timing[0]
                agreement, difference = np.mean(predicted == expected.argmax(1)), np.abs(probabilities - expected).max()
                print(f"{name:10} | {accuracy_score(truth, predicted):8.4f} | "
                      f"{balanced_accuracy_score(truth, predicted):17.4f} | {validation[name]:20.4f} | "
                      f"{agreement:21.4f} | {difference:20.4f} | "
                      f"{spread(*timing):7} | {len(test) / timing[0]:8.1f} | {float_seconds / timing[0]:7.2f}")
