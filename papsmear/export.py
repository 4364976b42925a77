"""ONNX export of a trained learner, checked against fastai on real images before the file is kept; and its
INT8 version (ONNX Runtime's static quantization), checked against the float export before it is kept."""
import contextlib
import copy
import io
import json
import random
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from fastai.torch_core import get_model
from fastai.vision.all import imagenet_stats
from torch import nn

from papsmear.files import UserError, atomic_output, is_augmentation, partial_name
from papsmear.onnx_model import OnnxClassifier, image_batch, write_metadata

OPSET = 20  # torch's exporter writes this opset by default; ONNX Runtime 1.17 and later run it
CHECK_TOLERANCE = 1e-3  # largest difference of a probability between ONNX Runtime and fastai that passes
CHECK_IMAGES = 8  # validation images run by both after the export


class ImageInputModel(nn.Module):
    "The network with ImageNet normalisation before it and softmax after it, taking uint8 [N, H, W, 3] images."
    def __init__(self, network, mean=imagenet_stats[0], std=imagenet_stats[1]):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images):
        "Class probabilities of a uint8 image batch [N, H, W, 3]."
        pixels = images.permute(0, 3, 1, 2).float() / 255
        return torch.softmax(self.network((pixels - self.mean) / self.std), dim=1)


def fastai_probabilities(learn, network, files):
    """Probabilities of `files` through fastai's own prediction pipeline (decode, resize, normalise), computed
    by a float32 CPU copy of the network, so that mixed precision on a GPU does not enter the comparison."""
    batch = learn.dls.test_dl(files, bs=len(files), num_workers=0).one_batch()[0]
    with torch.no_grad():
        return torch.softmax(network(batch.cpu().float()), dim=1).numpy()


def export_onnx(learn, onnx_path, record, check_files):
    """Write `learn`'s network (whose outputs are the record's classes) as an ONNX file with a dynamic batch axis,
    uint8 image input and the metadata an ONNX user needs (the model record among it); then run it with ONNX
    Runtime on `check_files` and compare with fastai. A difference above `CHECK_TOLERANCE` is an error and no
    file is left. Returns (path, largest difference, seconds)."""
    image_size = record.image_size
    start = time.perf_counter()
    network = copy.deepcopy(get_model(learn.model)).float().cpu().eval().to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    files = list(check_files)[:CHECK_IMAGES]
    with atomic_output(onnx_path) as tmp:
        torch.onnx.export(ImageInputModel(network).eval(), (example,), str(tmp), input_names=["image"],
                          output_names=["probabilities"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                          opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
        onnx.save(write_metadata(onnx.load(str(tmp)), record), str(tmp))
        exported = OnnxClassifier(tmp).probabilities(image_batch(files, image_size))
        difference = float(np.abs(exported - fastai_probabilities(learn, network, files)).max())
        if not difference <= CHECK_TOLERANCE:
            raise UserError(f"the ONNX export of {onnx_path.name} differs from fastai by {difference:.2e} on "
                            f"{len(files)} validation images (more than {CHECK_TOLERANCE:g}); no file was kept — "
                            "please report it")
    return onnx_path, difference, time.perf_counter() - start


# INT8: ONNX Runtime's static quantization in QDQ form, weights per output channel, uint8 activations and int8
# weights (the pairing ONNX Runtime's documentation advises for x86 CPUs), ranges calibrated on training images.
# The first convolution and the head (pooling, fastai's BatchNorm/Linear layers, softmax) stay float: they are a
# few percent of the work, and quantizing them moved a trained model's probabilities ten times as much as the
# rest of the network did (benchmarks/int8.py).
CALIBRATION_IMAGES = 200  # training images the activation ranges are measured on, at most (seeded draw)
CALIBRATION_METHOD = "Percentile"  # chosen on real Herlev cells by benchmarks/int8.py (README: INT8)
# Percentile's range keeps 99.99 % of each activation's values: ONNX Runtime's default, 99.999 %, let rare outliers
# widen the ranges, and agreed with float on fewer real Herlev cells (benchmarks/int8.py).
CALIBRATION_PERCENTILE = 99.99
MIN_AGREEMENT = 0.99  # share of the check images whose top class the INT8 model must share with the float one


class ImageCalibration:
    "ONNX Runtime's calibration data reader over image files cut by the project's one rule, one image per run."
    def __init__(self, files, image_size, input_name):
        self.files, self.image_size, self.input_name = list(files), image_size, input_name
        self.position = 0

    def get_next(self):
        "The next image as the model's input, or None when all have been read."
        if self.position == len(self.files):
            return None
        self.position += 1
        return {self.input_name: image_batch(self.files[self.position - 1:self.position], self.image_size)}

    def rewind(self):
        "Start again at the first image (ONNX Runtime may read the images more than once)."
        self.position = 0


def calibration_sample(files, n=CALIBRATION_IMAGES, seed=0):
    """Up to `n` of `files`, drawn with a fixed seed so that the same training split gives the same INT8 model.
    Extended DA outputs are left out: edge maps, shuffled channels and the like are not images the model will be
    given, and calibrating on them widened the ranges enough to flip a model's answers (benchmarks/int8.py)."""
    files = sorted(str(f) for f in files if not is_augmentation(f)) or sorted(map(str, files))
    return sorted(random.Random(seed).sample(files, min(n, len(files))))


def quantize_export(onnx_path, int8_path, record, calibration_files, check_files, method=CALIBRATION_METHOD,
                    seed=0, min_agreement=MIN_AGREEMENT):
    """Write the INT8 version of the float export `onnx_path` to `int8_path`: static quantization calibrated on
    a seeded sample of `calibration_files` (the training split's images) by `method` (MinMax, Entropy or
    Percentile), with the float file's metadata plus the quantization settings. It is checked on `check_files`
    (the validation split): the top class must agree with the float model's on at least `min_agreement` of them,
    otherwise no file is left and the error says by how much it missed. Returns a dict with the path, the
    agreement, the largest probability difference, the seconds and a line that says so."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    start = time.perf_counter()
    calibration = calibration_sample(calibration_files, seed=seed)
    check_files = sorted(map(str, check_files))
    if not calibration or not check_files:
        raise UserError("the INT8 export needs training images to calibrate on and validation images to check on")
    float_model = OnnxClassifier(onnx_path)
    settings = dict(format="QDQ", per_channel=True, activations="uint8", weights="int8", calibration=method,
                    calibration_images=len(calibration))
    extra = {}
    if method == "Percentile":
        settings["percentile"] = extra["CalibPercentile"] = CALIBRATION_PERCENTILE
    int8_path = Path(int8_path)
    prepared = partial_name(int8_path.with_name(int8_path.name + ".prepared"))
    try:
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        with atomic_output(int8_path) as tmp:
            reader = ImageCalibration(calibration, record.image_size, float_model.session.get_inputs()[0].name)
            with contextlib.redirect_stdout(io.StringIO()):  # ONNX Runtime's calibration prints its progress
                quantize_static(str(prepared), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod[method], extra_options=extra,
                                nodes_to_exclude=float_nodes(onnx.load(str(prepared))))
            quantized = copy.copy(record)
            quantized.quantization = settings
            onnx.save(write_metadata(onnx.load(str(tmp)), quantized,
                                     extra=dict(quantization=json.dumps(settings))), str(tmp))
            agreement, difference = compare_exports(float_model, OnnxClassifier(tmp), check_files)
            if agreement < min_agreement:
                raise UserError(f"the INT8 export of {onnx_path.name} agrees with the float model on the top class of "
                                f"{agreement:.1%} of {len(check_files)} validation images (at least "
                                f"{min_agreement:.0%} needed; largest probability difference {difference:.3f}); no "
                                "file was kept — calibrate on more varied training images, or use the float .onnx")
    finally:
        prepared.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    line = (f"INT8 export {int8_path}: top class as the float ONNX model on {agreement:.1%} of {len(check_files)} "
            f"validation images, largest probability difference {difference:.3f}; calibrated by {method} on "
            f"{len(calibration)} training images ({seconds:.0f} s)")
    return dict(path=int8_path, agreement=agreement, difference=difference, seconds=seconds, line=line,
                settings=settings)


def float_nodes(model):
    "The nodes an INT8 export keeps float: the first convolution, and every node after the last one (the head)."
    nodes = model.graph.node
    convolutions = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    return [nodes[convolutions[0]].name] + [node.name for node in nodes[convolutions[-1] + 1:]]


def compare_exports(float_model, int8_model, files, batch_size=16):
    "(top-class agreement, largest probability difference) of two ONNX classifiers on image files."
    expected, found = float_model.predict(files, batch_size), int8_model.predict(files, batch_size)
    return float(np.mean(expected.argmax(1) == found.argmax(1))), float(np.abs(expected - found).max())
