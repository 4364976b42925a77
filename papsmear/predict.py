"""Prediction: loading a trained model (.pkl, or .pth with its .json) and the one batched prediction path."""
from pathlib import Path

import numpy as np
import torch
from fastai.learner import load_learner
from fastai.torch_core import default_device, to_detach
from fastai.vision.all import Resize

from papsmear.data import IMAGE_SIZE, inference_dls
from papsmear.files import (
    SPLITS,
    UserError,
    check_class_names,
    is_sample_image,
    sample_images,
    unreadable_images,
    user_path,
)
from papsmear.leaks import check_leaks, content_digests
from papsmear.learner import head_classes, pap_learner, read_weights
from papsmear.onnx_model import OnnxClassifier, is_onnx, square_image, store_record
from papsmear.presize import parallel_decode
from papsmear.record import ModelRecord, record_beside


def prediction_dl(learn, files, batch_size=64, decoders=None):
    """A loader of `files` for `learn`'s predictions, transformed as its validation images, each image decoded
    by its own worker task (`presize.ParallelDecodeDL`, `decoders` processes; default one per core), so every
    core works whatever the batch size; with `decoders` 0 the images are decoded in this process."""
    dl = learn.dls.test_dl(files, bs=batch_size, num_workers=0)
    return dl if decoders == 0 else parallel_decode(dl, decoders)


def load_classifier(model_path, files, batch_size=16):
    """(learner, model record) from an exported `.pkl` (with the record `.json` beside it when there is one), or
    from `.pth` weights + their record `.json` (rebuilt by `pap_learner` and loaded with weights_only, so nothing
    is unpickled); for an `.onnx` export, an `OnnxClassifier` (ONNX Runtime) in the learner's place, with the
    record its metadata holds. Class names that are not plain folder names are refused whatever the file."""
    model_path = user_path(model_path)
    if not model_path.is_file():
        raise UserError(f"model_path {model_path} does not exist — train with R50.py or R50Herlev.py first")
    if is_onnx(model_path):
        classifier = OnnxClassifier(model_path)
        return classifier, classifier.record
    if model_path.suffix == ".pth":
        record = ModelRecord.read(model_path.with_suffix(".json"))
        state = read_weights(model_path)
        if head_classes(state, model_path) != len(record.classes):
            raise UserError(f"{model_path} and {model_path.with_suffix('.json')} disagree on the number of "
                            "classes — put the .json saved with these weights beside them")
        learn = pap_learner(inference_dls(files, record.image_size, batch_size), n_out=len(record.classes))
        learn.model.load_state_dict(state)
    else:
        learn, record = load_export(model_path)
    # ResNet50 ran 1.6x faster in channels-last on a 2-core CPU too (benchmarks/inference_speed.py, network alone).
    learn.model.to(memory_format=torch.channels_last)
    return learn, record


def load_export(model_path):
    """(learner, record) of a fastai export: the record `.json` written beside it, or for an export without one,
    a record of its classes and image size."""
    try:
        learn = load_learner(model_path, cpu=default_device().type != "cuda")
    except Exception as e:  # a broken pickle can raise almost anything
        raise UserError(f"cannot load {model_path} as a fastai export ({type(e).__name__}: {e})") from None
    classes = check_class_names(list(map(str, learn.dls.vocab)), model_path)
    record = record_beside(model_path) or ModelRecord(classes=classes, image_size=export_image_size(learn))
    if record.classes != classes:
        raise UserError(f"{model_path.with_suffix('.json')} names other classes than {model_path} — put the .json "
                        "saved with this export beside it")
    return learn, record


def export_image_size(learn):
    "The image side a fastai export resizes to (its validation `Resize`), for exports without a record."
    sizes = [int(t.size[0]) for t in learn.dls.valid.after_item.fs if isinstance(t, Resize)]
    return sizes[0] if sizes else IMAGE_SIZE


def model_files(model_path):
    """The files of one trained model that hold its record: <name>.json, <name>.onnx and <name>.int8.onnx beside
    each other, those that exist (the .json also when the model is a .pth or .pkl, which it is written for)."""
    model_path = user_path(model_path)
    name = model_path.name.removesuffix(".onnx").removesuffix(".int8") if is_onnx(model_path) else model_path.stem
    folder = model_path.parent
    files = [folder / f"{name}{suffix}" for suffix in (".json", ".onnx", ".int8.onnx")]
    return [f for f in files if f.exists() or (f.suffix == ".json" and not is_onnx(model_path))]


def store_model_record(model_path, record):
    """Write `record` to every file of the model that holds one (`model_files`): the .json beside the weights and
    the metadata of its ONNX exports. Returns the files written."""
    written = []
    for file in model_files(model_path):
        if file.suffix == ".json":
            record.write(file)
        else:
            store_record(file, record)
        written.append(file)
    return written


def list_inputs(test_dataset_path):
    """(image files, their folder label or None, images left out): class folders are labelled, plain images
    are not; images lying beside class folders are left out, and returned so that the report names them."""
    path = user_path(test_dataset_path)
    if path.is_file():
        return [path], [None], []
    if not path.is_dir():
        raise UserError(f"test_dataset_path {path} does not exist")
    folders = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    loose = [f for f in sorted(path.iterdir()) if f.is_file() and is_sample_image(f)]
    if folders:
        files = [f for d in folders for f in sample_images(d)]
        labels = [f.relative_to(path).parts[0] for f in files]
        left_out = loose
    else:
        files, labels, left_out = loose, [None] * len(loose), []
    if not files:
        raise UserError(f"no images in {path} — set test_dataset_path to a folder of class folders, "
                               "a folder of images, or one image")
    return files, labels, left_out


def list_tree(test_dataset_path):
    """(every image under an unlabelled folder tree (e.g. patient/slide/field/*.png), sorted; notes on what was
    not walked). A linked folder that loops back is walked once, and one that leads out of the tree is not
    walked at all (a link to / would walk the whole disk), said in a note."""
    path = user_path(test_dataset_path)
    outside = []
    files = sample_images(path, within=path, outside=outside)
    if not files:
        raise UserError(f"no images anywhere under {path} — set test_dataset_path to a folder tree holding cell "
                        "images")
    notes = [f"linked folder {link} leads out of {path}: not walked (link the images, not the folder, to include "
             "them)" for link in outside]
    return files, notes


def is_unlabelled_tree(test_dataset_path, labels, classes, unlabelled=False):
    """Whether a folder is predicted as an unlabelled tree: when asked (`unlabelled`), or when none of its
    sub-folders is a class of the model."""
    return user_path(test_dataset_path).is_dir() and (unlabelled or not set(labels) & set(classes))


def drop_unreadable(files, labels, test_dataset_path):
    "(files, labels, skipped descriptions) without the files that cannot be decoded."
    broken = unreadable_images(files)
    skipped = [f"{f}: {reason}" for f, reason in broken.items()]
    kept = [(f, label) for f, label in zip(files, labels, strict=True) if f not in broken]
    if not kept:
        raise UserError(f"none of the {len(files)} images in {test_dataset_path} can be read — check that "
                               "they are image files, then run again")
    files, labels = map(list, zip(*kept, strict=True))
    return files, labels, skipped


def check_split_leaks(test_dataset_path):
    """The leak check's line for a test folder that is a split of a formatted dataset (refused when the
    dataset's splits share images: `papsmear.leaks.check_leaks`), or a line saying that it was not run."""
    path = user_path(test_dataset_path)
    if path.name in SPLITS and any((path.parent / split).is_dir() for split in SPLITS
                                          if split != path.name):
        return check_leaks(path.parent)
    return f"leak check: not run ({path} is not the {'/'.join(SPLITS)} folder of a formatted dataset)"


def check_trained_images(record, files, test_dataset_path, allow=False):
    """The model check of a labelled test folder, wherever it lies: test images whose bytes (SHA-256) are among
    the images the model trained on (its record lists them) are refused, with a count and three examples; with
    `allow`, reported as a warning instead. Returns the check's line for the summary and the report."""
    if not record.trained_on:
        return ("model check: not run (the model's record lists no training images: a model trained before "
                "this check, or a file without its record)")
    root = user_path(test_dataset_path)
    root = root if root.is_dir() else root.parent
    digests, _ = content_digests(root, files, progress=len(files) >= 1000, remember=False)
    trained = set(record.trained_on)
    seen = [f for f in files if digests[f] in trained]
    if not seen:
        return (f"model check: passed (none of the {len(files)} test images is among the {len(trained)} images the "
                "model trained on, by SHA-256)")
    examples = ", ".join(Path(f).relative_to(root).as_posix() for f in seen[:3])
    if not allow:
        raise UserError(f"model check: {len(seen)} of the {len(files)} test images are images the model trained on "
                        f"(same SHA-256), e.g. {examples}, so its scores would be optimistic — evaluate it on images "
                        "it has not seen (the test split of its own division), or pass --allow-trained-images to "
                        "report them with a warning")
    return (f"model check: warning: {len(seen)} of the {len(files)} test images are images the model trained on "
            f"(e.g. {examples}): the scores are optimistic")


def check_classes(labels, classes, test_dataset_path):
    "Refuse test folders that are not classes of the model, listing both sets."
    unknown = sorted(set(labels) - set(classes) - {None})
    if unknown:
        raise UserError(f"folders {unknown} in {test_dataset_path} are not classes of the model "
                               f"{classes} — is this test set from the dataset the model was trained on?")


def predict_files(learn, files, batch_size=16, tta=False, decoders=None):
    """Class probabilities of `files`, batched through fastai (test-time augmentation with `tta`; images
    decoded by `prediction_dl`'s `decoders`), or through ONNX Runtime for an `OnnxClassifier`."""
    if isinstance(learn, OnnxClassifier):
        if tta:
            raise UserError("test-time augmentation needs fastai's transforms — give the .pth or .pkl beside the "
                            ".onnx, or drop --tta")
        return learn.predict(files, batch_size)
    dl = prediction_dl(learn, files, batch_size, decoders=decoders)
    probabilities = learn.tta(dl=dl)[0] if tta else learn.get_preds(dl=dl)[0]
    return probabilities.float().numpy()


def predict_images(learn, images, batch_size=16):
    """Class probabilities of images held in memory (PIL images, such as the cells cut from a field): the
    in-memory twin of `predict_files`, through the same transforms (fastai's validation transforms, or the ONNX
    cutting rule), so that an image saved losslessly and predicted from its file gets the same probabilities."""
    if isinstance(learn, OnnxClassifier):
        size = learn.image_size
        return np.concatenate([learn.probabilities(np.stack([np.asarray(square_image(image.convert("RGB"), size))
                                                             for image in images[i:i + batch_size]]))
                               for i in range(0, len(images), batch_size)]) if images else np.zeros((0, len(
                                   learn.classes)), np.float32)
    dl = learn.dls.test_dl(list(images), bs=batch_size, num_workers=0)
    # Under a launcher fastai gathers predictions from every process; each predicts its own images here. (The
    # loader is used as it is: it keeps its order, and reordering would make a new one without this change.)
    dl.to_detach = lambda batch, cpu=True, gather=True: to_detach(batch, cpu, gather=False)
    return learn.get_preds(dl=dl, reorder=False)[0].float().numpy()
