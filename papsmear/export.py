"""ONNX export of a trained learner, checked against fastai on real images before the file is kept."""
import copy
import json
import time

import numpy as np
import onnx
import torch
from fastai.torch_core import get_model
from fastai.vision.all import imagenet_stats
from torch import nn

from papsmear.files import UserError, atomic_output
from papsmear.onnx_model import CUTTING_RULE, METADATA_PRODUCER, OnnxClassifier, image_batch

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


def export_onnx(learn, onnx_path, classes, image_size, recipe, check_files):
    """Write `learn`'s network (whose outputs are `classes`) as an ONNX file with a dynamic batch axis, uint8
    image input and the metadata an ONNX user needs; then run it with ONNX Runtime on `check_files` and compare
    with fastai. A difference above `CHECK_TOLERANCE` is an error and no file is left. Returns (path, largest
    difference, seconds)."""
    start = time.perf_counter()
    network = copy.deepcopy(get_model(learn.model)).float().cpu().eval().to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    files = list(check_files)[:CHECK_IMAGES]
    with atomic_output(onnx_path) as tmp:
        torch.onnx.export(ImageInputModel(network).eval(), (example,), str(tmp), input_names=["image"],
                          output_names=["probabilities"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                          opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
        model = onnx.load(str(tmp))
        metadata = dict(producer=METADATA_PRODUCER, classes=json.dumps(list(map(str, classes))),
                        image_size=str(image_size),
                        input="uint8 RGB images [batch, height, width, 3]; output: class probabilities",
                        preprocessing=CUTTING_RULE.format(size=image_size), recipe=recipe, arch="resnet50")
        onnx.helper.set_model_props(model, metadata)
        onnx.save(model, str(tmp))
        exported = OnnxClassifier(tmp).probabilities(image_batch(files, image_size))
        difference = float(np.abs(exported - fastai_probabilities(learn, network, files)).max())
        if not difference <= CHECK_TOLERANCE:
            raise UserError(f"the ONNX export of {onnx_path.name} differs from fastai by {difference:.2e} on "
                            f"{len(files)} validation images (more than {CHECK_TOLERANCE:g}); no file was kept — "
                            "please report it")
    return onnx_path, difference, time.perf_counter() - start
