"""Evaluate a trained model on a labelled folder (accuracy, confusion matrix, precision/recall/F1 per class),
or predict a single image or a folder of unlabelled images.

model_path may be the exported learner (.pkl, unpickled by fastai: only load files you trust) or the
weights (.pth) with the class list (.json) that R50.py / R50Herlev.py write beside them, which unpickles
nothing. Reports go to output_dir: metrics.json, predictions.csv, confusion_matrix.png, roc_curves.png,
calibration.png, Grad-CAM overlays under gradcam/, and report.html, one page that holds them all.
"""
import json
from pathlib import Path

import TTLR50  # noqa: I001  first: it quiets a deprecation warning that importing fastai prints

import numpy as np
import pandas as pd
import torch
from fastai.learner import load_learner
from fastcore.script import call_parse
from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score, classification_report, confusion_matrix

import papreport
from papfiles import is_inside

# --- edit these -----------------------------------------------------------------------------------
model_path = Path("data/sipakmed_formatted/models/resnet50_ttl_sipakmed.pkl")  # .pkl export, or .pth + .json
test_dataset_path = Path("data/sipakmed_formatted/test")  # class folders (labelled), images, or one image
output_dir = None      # where reports go (default: <model folder>/<model name>_inference)
batch_size = 16        # images per prediction batch (16 ran fastest on a 2-core CPU)
tta = False            # also predict with fastai's test-time augmentation and report both scores
gradcam = 3            # Grad-CAM overlays: misclassified images + this many most/least confident per class; 0: none
bootstrap = 2000       # resamples of the test images for the 95% confidence intervals (seeded)
# ---------------------------------------------------------------------------------------------------


def load_classifier(model_path, files, batch_size=batch_size):
    """(learner, class names) from an exported `.pkl`, or from `.pth` weights + their `.json` class list
    (rebuilt through TTLR50 and loaded with weights_only, so nothing is unpickled)."""
    model_path = TTLR50.user_path(model_path)
    if not model_path.is_file():
        raise TTLR50.UserError(f"model_path {model_path} does not exist — train with R50.py or R50Herlev.py first")
    if model_path.suffix == ".pth":
        info = read_class_list(model_path.with_suffix(".json"))
        state = TTLR50.read_weights(model_path)
        if TTLR50.head_classes(state, model_path) != len(info["classes"]):
            raise TTLR50.UserError(f"{model_path} and {model_path.with_suffix('.json')} disagree on the number of "
                                   "classes — put the .json saved with these weights beside them")
        learn = TTLR50.pap_learner(TTLR50.inference_dls(files, info["image_size"], batch_size),
                                   n_out=len(info["classes"]))
        learn.model.load_state_dict(state)
        classes = list(info["classes"])
    else:
        try:
            learn = load_learner(model_path, cpu=TTLR50.default_device().type != "cuda")
        except Exception as e:  # a broken pickle can raise almost anything
            raise TTLR50.UserError(f"cannot load {model_path} as a fastai export ({type(e).__name__}: {e})") from None
        classes = list(map(str, learn.dls.vocab))
    # ResNet50 ran 1.6x faster in channels-last on a 2-core CPU too (benchmarks/inference_speed.py, network alone).
    learn.model.to(memory_format=torch.channels_last)
    return learn, classes


def read_class_list(info_path):
    "The class list (.json) written beside a .pth: a dict with `classes` (names) and `image_size`."
    if not info_path.is_file():
        raise TTLR50.UserError(f"no class list {info_path} beside the weights — use the .pkl export, or "
                               "weights saved by R50.py / R50Herlev.py")
    try:
        info = json.loads(info_path.read_text())
        usable = isinstance(info["classes"], list) and info["classes"] and int(info["image_size"]) > 0
    except (ValueError, KeyError, TypeError):
        usable = False
    if not usable:
        raise TTLR50.UserError(f"{info_path} is not a class list written by R50.py / R50Herlev.py (it needs "
                               "\"classes\" and \"image_size\") — restore it, or use the .pkl export")
    return info


def list_inputs(test_dataset_path):
    """(image files, their folder label or None, images left out): class folders are labelled, plain images
    are not; images lying beside class folders are left out, and returned so that the report names them."""
    path = TTLR50.user_path(test_dataset_path)
    if path.is_file():
        return [path], [None], []
    if not path.is_dir():
        raise TTLR50.UserError(f"test_dataset_path {path} does not exist")
    folders = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    loose = [f for f in sorted(path.iterdir()) if f.is_file() and TTLR50.is_sample_image(f)]
    if folders:
        files = [f for d in folders for f in TTLR50.sample_images(d)]
        labels = [f.relative_to(path).parts[0] for f in files]
        left_out = loose
    else:
        files, labels, left_out = loose, [None] * len(loose), []
    if not files:
        raise TTLR50.UserError(f"no images in {path} — set test_dataset_path to a folder of class folders, "
                               "a folder of images, or one image")
    return files, labels, left_out


def drop_unreadable(files, labels, test_dataset_path):
    "(files, labels, skipped descriptions) without the files that cannot be decoded."
    broken = TTLR50.unreadable_images(files)
    skipped = [f"{f}: {reason}" for f, reason in broken.items()]
    kept = [(f, label) for f, label in zip(files, labels) if f not in broken]
    if not kept:
        raise TTLR50.UserError(f"none of the {len(files)} images in {test_dataset_path} can be read — check that "
                               "they are image files, then run again")
    files, labels = map(list, zip(*kept))
    return files, labels, skipped


def check_split_leaks(test_dataset_path):
    """The leak check's line for a test folder that is a split of a formatted dataset (refused when the
    dataset's splits share images: `leakcheck.check_leaks`), or a line saying that it was not run."""
    path = TTLR50.user_path(test_dataset_path)
    if path.name in TTLR50.SPLITS and any((path.parent / split).is_dir() for split in TTLR50.SPLITS
                                          if split != path.name):
        return TTLR50.check_leaks(path.parent)
    return f"leak check: not run ({path} is not the {'/'.join(TTLR50.SPLITS)} folder of a formatted dataset)"


def check_classes(labels, classes, test_dataset_path):
    "Refuse test folders that are not classes of the model, listing both sets."
    unknown = sorted(set(labels) - set(classes) - {None})
    if unknown:
        raise TTLR50.UserError(f"folders {unknown} in {test_dataset_path} are not classes of the model "
                               f"{classes} — is this test set from the dataset the model was trained on?")


def predict_files(learn, files, batch_size=batch_size, tta=False):
    "Class probabilities of `files`, batched through fastai (test-time augmentation with `tta`)."
    dl = TTLR50.prediction_dl(learn, files, batch_size)
    probabilities = learn.tta(dl=dl)[0] if tta else learn.get_preds(dl=dl)[0]
    return probabilities.float().numpy()


def label_metrics(truth, predicted, classes):
    "Accuracy, confusion matrix and sklearn's classification report (by class name) of integer labels."
    labels = list(range(len(classes)))
    return dict(accuracy=float(accuracy_score(truth, predicted)),
                confusion_matrix=confusion_matrix(truth, predicted, labels=labels).tolist(),
                report=classification_report(truth, predicted, labels=labels, target_names=classes,
                                             output_dict=True, zero_division=0),
                report_text=classification_report(truth, predicted, labels=labels, target_names=classes,
                                                   digits=4, zero_division=0))


def plot_confusion(matrix, classes, png, title):
    "Confusion matrix picture with counts and class names on both axes."
    fig, ax = TTLR50.plt.subplots(figsize=(1.4 * len(classes) + 3, 1.2 * len(classes) + 2))
    ConfusionMatrixDisplay(np.array(matrix), display_labels=classes).plot(ax=ax, cmap="Blues", colorbar=False,
                                                                          xticks_rotation=35)
    ax.set_title(title)
    TTLR50.save_figure(fig, png)


def predictions_table(files, labels, runs, classes):
    """One row per image: file, true class (if known), predicted class, the probability of each class, and
    the class predicted with test-time augmentation when it was run."""
    table = pd.DataFrame({"file": [str(f) for f in files]})
    if any(label is not None for label in labels):
        table["true_class"] = labels
    table["predicted_class"] = [classes[i] for i in runs["plain"].argmax(1)]
    for i, name in enumerate(classes):
        table[f"p_{name}"] = runs["plain"][:, i]
    if "tta" in runs:
        table["tta_predicted_class"] = [classes[i] for i in runs["tta"].argmax(1)]
    return table


def evaluate_folder(model_path, test_dataset_path, output_dir=None, batch_size=batch_size, tta=False,
                    gradcam=gradcam, bootstrap=bootstrap):
    """Predict every image of `test_dataset_path` and write the reports. Returns a dict with the
    predictions table, the model's classes, the metrics (labelled input), the skipped files, the
    output folder and the HTML report."""
    TTLR50.check_positive(batch_size=batch_size)
    low, high = papreport.BOOTSTRAP_RANGE
    if not low <= bootstrap <= high:
        raise TTLR50.UserError(f"bootstrap is {bootstrap}; a 95% interval needs between {low} and {high} resamples "
                               "(2000 is the default) — set --bootstrap in that range")
    TTLR50.check_not_negative(gradcam=gradcam)
    model_path = TTLR50.user_path(model_path)
    files, labels, left_out = list_inputs(test_dataset_path)
    leak_check = check_split_leaks(test_dataset_path)
    output_dir = TTLR50.user_path(output_dir or model_path.with_name(f"{model_path.stem}_inference"))
    test_folder = TTLR50.user_path(test_dataset_path)
    if test_folder.is_dir() and is_inside(output_dir, test_folder):
        raise TTLR50.UserError(f"output_dir {output_dir} is inside test_dataset_path {test_folder}: the reports "
                               "would become test images — choose an output_dir outside it")
    output_dir.mkdir(parents=True, exist_ok=True)  # before the slow part: an unusable folder fails at once
    learn, classes = load_classifier(model_path, files, batch_size)
    check_classes(labels, classes, test_dataset_path)
    skipped = []
    try:
        runs = {"plain": predict_files(learn, files, batch_size)}
    except TTLR50.IMAGE_ERRORS:
        # Some file cannot be decoded: only now pay for decoding each one to find which, then go on without them.
        files, labels, skipped = drop_unreadable(files, labels, test_dataset_path)
        runs = {"plain": predict_files(learn, files, batch_size)}
    if tta:
        runs["tta"] = predict_files(learn, files, batch_size, tta=True)
    table = predictions_table(files, labels, runs, classes)
    with TTLR50.atomic_output(output_dir / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False)
    result = dict(table=table, classes=classes, skipped=skipped, left_out=left_out, output_dir=output_dir,
                  metrics={}, leak_check=leak_check)
    truth = None if labels[0] is None else [classes.index(label) for label in labels]
    if truth is not None:
        for name, probabilities in runs.items():
            result["metrics"][name] = label_metrics(truth, probabilities.argmax(1), classes)
        result["metrics"]["plain"].update(papreport.labelled_figures(truth, runs["plain"], classes, output_dir,
                                                                      bootstrap))
        plot_confusion(result["metrics"]["plain"]["confusion_matrix"], classes, output_dir / "confusion_matrix.png",
                       f"{Path(model_path).name} on {Path(test_dataset_path).name}: "
                       f"accuracy {result['metrics']['plain']['accuracy']:.4f}")
    summary = dict(model_path=str(model_path), test_dataset_path=str(test_dataset_path), classes=classes,
                   n_images=len(files), skipped=skipped, left_out=list(map(str, left_out)), leak_check=leak_check,
                   **{name: {k: v for k, v in m.items() if k != "report_text"} for name, m in result["metrics"].items()})
    with TTLR50.atomic_output(output_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    result["report"], result["gradcam_skipped"] = papreport.write_report(learn, files, truth, runs["plain"], classes,
                                                                         summary, output_dir, gradcam)
    return result


def print_report(result, classes):
    "What a reader wants on screen: accuracy, the confusion matrix with class names, the report."
    for name, metrics in result["metrics"].items():
        label = "test-time augmentation" if name == "tta" else "predictions"
        print(f"\n== {label}: accuracy {metrics['accuracy']:.4f}")
        for key, figure in metrics.get("intervals", {}).items():
            print(f"   {key.replace('_', ' ')} {figure['value']:.4f} (95% CI {figure['low']:.4f}–{figure['high']:.4f})")
        if "macro_auc" in metrics:
            auc = "undefined" if metrics["macro_auc"] is None else f"{metrics['macro_auc']:.4f}"
            print(f"   macro AUC {auc}, expected calibration error {metrics['ece']:.4f}")
        if metrics.get("abnormal_vs_normal"):
            screen = metrics["abnormal_vs_normal"]
            print("   abnormal vs the rest: " + ", ".join(
                f"{key} {'undefined' if screen[key] is None else format(screen[key], '.4f')}"
                for key in ("sensitivity", "specificity")))
        matrix = pd.DataFrame(metrics["confusion_matrix"], index=[f"true {c}" for c in classes], columns=classes)
        print(matrix.to_string())
        print(metrics["report_text"])


@call_parse
def main(model_path: Path = model_path,                # .pkl export, or .pth weights with their .json
         test_dataset_path: Path = test_dataset_path,  # class folders (labelled), a folder of images, or one image
         output_dir: Path = output_dir,                # reports folder (default: <model folder>/<model name>_inference)
         batch_size: int = batch_size,                 # images per prediction batch
         tta: bool = tta,                              # also report scores with test-time augmentation
         gradcam: int = gradcam,                       # Grad-CAM overlays: misclassified + N most/least confident per class (0: off)
         bootstrap: int = bootstrap):                  # resamples for the 95% bootstrap confidence intervals
    "Evaluate a trained Pap-smear classifier, or predict unlabelled images."
    with TTLR50.user_errors():
        result = evaluate_folder(model_path, test_dataset_path, output_dir, batch_size, tta, gradcam, bootstrap)
        table = result["table"]
        if result["metrics"]:
            print_report(result, result["classes"])
        else:
            print(table.to_string(index=False, float_format="%.4f"))
        for problem in result["skipped"]:
            print(f"skipped unreadable image {problem}")
        if result["left_out"]:
            print(f"left out {len(result['left_out'])} image(s) lying beside the class folders, not in one "
                  f"(e.g. {result['left_out'][0].name}): their class is unknown — move them into a class folder")
        if result["gradcam_skipped"]:
            print(result["gradcam_skipped"])
        print(result["leak_check"])
        print(f"\n{len(table)} images predicted, {len(result['skipped'])} skipped; reports in {result['output_dir']}")
        print(f"report: {result['report']}")
        if result["skipped"]:
            raise SystemExit(1)
