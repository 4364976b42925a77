"""A trained classifier as an ONNX file, run by ONNX Runtime with NumPy and Pillow only (no torch, no fastai).

The file's input is a batch of uint8 RGB images, [batch, size, size, 3], already cut to a square by
`square_image`; normalisation and softmax are inside the graph, so its output is the class probabilities.
Its metadata names the classes in output order, the image size, the cutting rule and the training recipe.
"""
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from papsmear.files import UserError, atomic_output, available_cpus, user_path
from papsmear.record import ModelRecord

METADATA_PRODUCER = "Deep Cervical Cancer"
# Written into every export: an ONNX user needs nothing else to prepare images. It is fastai's validation
# Resize, whose float arithmetic makes the square one pixel smaller than the shorter side for some sizes (a
# shorter side of 230 at 224 gives 229), so the side is stated as the formula, not as "the shorter side".
CUTTING_RULE = ("side = int(shorter / {size} * {size}) in double precision (the shorter side of the image, one pixel "
                "less for some sizes, e.g. 229 for 230 at 224); crop the square of that side whose top-left corner is "
                "(int(0.5 * (width - side)), int(0.5 * (height - side))), then resize it to {size}x{size} pixels "
                "with Pillow's bilinear resampling; RGB, uint8, layout [batch, height, width, 3]")


def square_side(width, height, size):
    "The side of the square fastai's validation `Resize(size)` crops: int(shorter / size * size), as it computes it."
    scale = width / size if width / size < height / size else height / size
    return int(scale * size)


def square_image(image, size):
    """The `size` x `size` square the network sees of a PIL image: the centred square of `square_side`, resized
    with bilinear resampling — fastai's validation `Resize(size)`, computed the same way."""
    width, height = image.size
    side = square_side(width, height, size)
    left, top = int(0.5 * (width - side)), int(0.5 * (height - side))
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)


def cut_image(file, size):
    "uint8 array [size, size, 3] of an image file cut by `square_image` (PIL raises for an unreadable one)."
    with Image.open(file) as image:
        return np.asarray(square_image(image.convert("RGB"), size))


def image_batch(files, size):
    """uint8 array [n, size, size, 3] of image files cut by `square_image`, decoded on every core (Pillow
    decodes and resizes outside Python's lock)."""
    with ThreadPoolExecutor(available_cpus()) as pool:
        return np.stack(list(pool.map(cut_image, files, [size] * len(files))))


class OnnxClassifier:
    """An exported classifier loaded into an ONNX Runtime session, with its classes and image size read from
    the file's metadata; refused with a clear error when the file is not such a model."""
    def __init__(self, path, threads=None):
        import onnxruntime  # only ONNX users pay for its import

        self.path = user_path(path)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime raises its own kinds for files it cannot read as models
            raise UserError(f"{path} is not an ONNX model ONNX Runtime can run ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}) — export it again with export_onnx.py") from None
        self.record, self.metadata = read_metadata(self.session, path)
        self.classes, self.image_size = self.record.classes, self.record.image_size
        check_signature(self.session, self.image_size, len(self.classes), path)

    def predict(self, files, batch_size=16):
        "Class probabilities [n, classes] of image files, `batch_size` images per run."
        return np.concatenate([self.probabilities(image_batch(files[i:i + batch_size], self.image_size))
                               for i in range(0, len(files), batch_size)])

    def probabilities(self, images):
        "Class probabilities of a uint8 batch [n, size, size, 3]."
        return self.session.run(None, {self.session.get_inputs()[0].name: images})[0]


def read_metadata(session, path):
    """(model record, all metadata) of an export of this project: the whole record when the file holds one, else
    (exports of earlier versions) the classes and image size; a clear error for any other ONNX file, and for
    metadata a model of ours cannot have (class names that are not plain folder names, an absurd image size)."""
    metadata = session.get_modelmeta().custom_metadata_map
    if metadata.get("producer") != METADATA_PRODUCER or "classes" not in metadata:
        raise UserError(f"{path} has no {METADATA_PRODUCER} metadata (classes, image_size) — export the model with "
                        "R50.py, R50Herlev.py or export_onnx.py")
    try:
        values = json.loads(metadata["record"]) if "record" in metadata else dict(
            classes=json.loads(metadata["classes"]), image_size=metadata.get("image_size"))
    except ValueError:
        values = {}
    record = ModelRecord.from_json(values if isinstance(values, dict) else {}, f"{path}'s metadata")
    try:
        mirrored = json.loads(metadata["classes"]) == record.classes and int(metadata["image_size"]) == \
            record.image_size
    except (KeyError, ValueError, TypeError):
        mirrored = False
    if not mirrored:
        raise UserError(f"{path}'s metadata disagrees with itself (classes or image_size differ from its record) — "
                        "export the model again with export_onnx.py")
    return record, metadata


def check_signature(session, image_size, n_classes, path):
    "Refuse a model whose input is not a uint8 image batch of the stored size, or whose outputs are not the classes."
    image, probabilities = session.get_inputs()[0], session.get_outputs()[0]
    if image.type != "tensor(uint8)" or list(image.shape[1:]) != [image_size, image_size, 3]:
        raise UserError(f"{path} takes {image.type} {image.shape}, not uint8 images [batch, {image_size}, "
                        f"{image_size}, 3] as its metadata says — export it again with export_onnx.py")
    if probabilities.shape[-1] != n_classes:
        raise UserError(f"{path} has {probabilities.shape[-1]} outputs but its metadata names {n_classes} classes "
                        "— export it again with export_onnx.py")


def write_metadata(model, record, extra=None):
    """Set an ONNX model's (an `onnx.ModelProto`'s) metadata to the model record (`papsmear.record.ModelRecord`),
    the cutting rule and `extra` keys."""
    import onnx

    metadata = dict(producer=METADATA_PRODUCER, **record.onnx_metadata(),
                    input="uint8 RGB images [batch, height, width, 3]; output: class probabilities",
                    preprocessing=CUTTING_RULE.format(size=record.image_size), **(extra or {}))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata)
    return model


def store_record(onnx_path, record):
    "Rewrite the metadata of an ONNX file of ours with `record`, atomically (its quantization settings are kept)."
    import onnx

    model = onnx.load(str(onnx_path))
    extra = {p.key: p.value for p in model.metadata_props if p.key == "quantization"}
    if extra:
        record = replace(record, quantization=json.loads(extra["quantization"]))
    with atomic_output(onnx_path) as tmp:
        onnx.save(write_metadata(model, record, extra), str(tmp))


def is_onnx(model_path):
    "Whether a model path names an ONNX file."
    return Path(model_path).suffix.lower() == ".onnx"
