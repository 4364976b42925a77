"""Prediction: loading a trained model (.pkl, or .pth with its .json) and the one batched prediction path."""
import json

import torch
from fastai.learner import load_learner
from fastai.torch_core import default_device

from papsmear.data import inference_dls
from papsmear.files import SPLITS, UserError, is_sample_image, sample_images, unreadable_images, user_path
from papsmear.leaks import check_leaks
from papsmear.learner import head_classes, pap_learner, read_weights
from papsmear.onnx_model import OnnxClassifier, is_onnx
from papsmear.presize import parallel_decode


def prediction_dl(learn, files, batch_size=64, decoders=None):
    """A loader of `files` for `learn`'s predictions, transformed as its validation images, each image decoded
    by its own worker task (`presize.ParallelDecodeDL`, `decoders` processes; default one per core), so every
    core works whatever the batch size; with `decoders` 0 the images are decoded in this process."""
    dl = learn.dls.test_dl(files, bs=batch_size, num_workers=0)
    return dl if decoders == 0 else parallel_decode(dl, decoders)


def load_classifier(model_path, files, batch_size=16):
    """(learner, class names) from an exported `.pkl`, or from `.pth` weights + their `.json` class list
    (rebuilt by `pap_learner` and loaded with weights_only, so nothing is unpickled); for an `.onnx` export,
    an `OnnxClassifier` (ONNX Runtime) in the learner's place."""
    model_path = user_path(model_path)
    if not model_path.is_file():
        raise UserError(f"model_path {model_path} does not exist — train with R50.py or R50Herlev.py first")
    if is_onnx(model_path):
        classifier = OnnxClassifier(model_path)
        return classifier, classifier.classes
    if model_path.suffix == ".pth":
        info = read_class_list(model_path.with_suffix(".json"))
        state = read_weights(model_path)
        if head_classes(state, model_path) != len(info["classes"]):
            raise UserError(f"{model_path} and {model_path.with_suffix('.json')} disagree on the number of "
                                   "classes — put the .json saved with these weights beside them")
        learn = pap_learner(inference_dls(files, info["image_size"], batch_size),
                                   n_out=len(info["classes"]))
        learn.model.load_state_dict(state)
        classes = list(info["classes"])
    else:
        try:
            learn = load_learner(model_path, cpu=default_device().type != "cuda")
        except Exception as e:  # a broken pickle can raise almost anything
            raise UserError(f"cannot load {model_path} as a fastai export ({type(e).__name__}: {e})") from None
        classes = list(map(str, learn.dls.vocab))
    # ResNet50 ran 1.6x faster in channels-last on a 2-core CPU too (benchmarks/inference_speed.py, network alone).
    learn.model.to(memory_format=torch.channels_last)
    return learn, classes


def read_class_list(info_path):
    "The class list (.json) written beside a .pth: a dict with `classes` (names) and `image_size`."
    if not info_path.is_file():
        raise UserError(f"no class list {info_path} beside the weights — use the .pkl export, or "
                               "weights saved by R50.py / R50Herlev.py")
    try:
        info = json.loads(info_path.read_text())
        usable = isinstance(info["classes"], list) and info["classes"] and int(info["image_size"]) > 0
    except (ValueError, KeyError, TypeError):
        usable = False
    if not usable:
        raise UserError(f"{info_path} is not a class list written by R50.py / R50Herlev.py (it needs "
                               "\"classes\" and \"image_size\") — restore it, or use the .pkl export")
    return info


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
    """Every image under an unlabelled folder tree (e.g. patient/slide/field/*.png), sorted; a linked folder
    that loops back is walked once."""
    path = user_path(test_dataset_path)
    files = sample_images(path)
    if not files:
        raise UserError(f"no images anywhere under {path} — set test_dataset_path to a folder tree holding cell "
                        "images")
    return files


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
