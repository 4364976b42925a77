"""The evaluation report: metrics, bootstrap intervals, ROC, calibration, Grad-CAM and one HTML page.

`evaluate_folder` predicts a folder and writes it all (SIPaKMeD's abnormal-vs-normal figures where the classes
are SIPaKMeD's); the page's Jinja2 template lies beside this module. Nothing here trains.
"""
import base64
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.vision.all import imagenet_stats
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)
from torch import nn
from tqdm import tqdm

from papsmear.balance import balanced_accuracy
from papsmear.figures import plt, save_figure
from papsmear.files import (
    IMAGE_ERRORS,
    UserError,
    atomic_output,
    check_not_negative,
    check_positive,
    is_inside,
    user_path,
)
from papsmear.onnx_model import OnnxClassifier
from papsmear.predict import (
    check_classes,
    check_split_leaks,
    drop_unreadable,
    is_unlabelled_tree,
    list_inputs,
    list_tree,
    load_classifier,
    predict_files,
)

TEMPLATES = Path(__file__).resolve().parent / "templates"

# The grouping of SIPaKMeD's classes in its own paper (Plissiti et al., ICIP 2018, section 2): superficial-
# intermediate and parabasal cells are normal, koilocytotic and dyskeratotic cells abnormal, metaplastic
# cells benign. Screening asks "abnormal or not", so benign cells count with the normal ones as negatives.
SIPAKMED_GROUPS = {"Dyskeratotic": "abnormal", "Koilocytotic": "abnormal", "Metaplastic": "benign",
                   "Parabasal": "normal", "Superficial-Intermediate": "normal"}


BOOTSTRAP_CHUNK = 1_000_000  # test-image indices drawn at once
BOOTSTRAP_RANGE = (100, 100_000)  # fewer resamples give no 95% interval; more change it below its rounding


def bootstrap_intervals(truth, predicted, n_classes, n_resamples=2000, seed=0, level=0.95):
    """Accuracy, balanced accuracy (mean recall of the classes in the resample), macro F1 and weighted F1
    with percentile bootstrap intervals: the test images are resampled with replacement `n_resamples` times
    (seeded), each score recomputed by scikit-learn."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    labels = list(range(n_classes))
    scores = {"accuracy": accuracy_score,
              "balanced_accuracy": balanced_accuracy,
              "macro_f1": lambda t, p: f1_score(t, p, labels=labels, average="macro", zero_division=0),
              "weighted_f1": lambda t, p: f1_score(t, p, labels=labels, average="weighted", zero_division=0)}
    rng, samples = np.random.default_rng(seed), {name: [] for name in scores}
    # Resamples are drawn in chunks of about a million indices, so memory stays bounded for any count; the
    # draws are the same as in one go (the generator's stream does not depend on the chunking).
    chunk = max(1, BOOTSTRAP_CHUNK // len(truth))
    with tqdm(total=n_resamples, desc="bootstrap", unit="resample", disable=n_resamples * len(truth) < 10 ** 7) as bar:
        for start in range(0, n_resamples, chunk):
            for i in rng.integers(0, len(truth), (min(chunk, n_resamples - start), len(truth))):
                for name, score in scores.items():
                    samples[name].append(score(truth[i], predicted[i]))
            bar.update(min(chunk, n_resamples - start))
    tail = 100 * (1 - level) / 2
    intervals = {}
    for name, score in scores.items():
        low, high = np.percentile(samples[name], [tail, 100 - tail])
        intervals[name] = dict(value=float(score(truth, predicted)), low=float(low), high=float(high))
    return intervals


def roc_per_class(truth, probabilities, classes):
    """One-vs-rest ROC curve and AUC of every class, and the macro AUC over the classes where it is defined
    (a class without test images, or with only its own, has no ROC: its AUC is None)."""
    truth = np.asarray(truth)
    curves = {}
    for i, name in enumerate(classes):
        positive = truth == i
        if positive.all() or not positive.any():
            curves[name] = dict(auc=None, fpr=[], tpr=[])
            continue
        fpr, tpr, _ = roc_curve(positive, probabilities[:, i])
        curves[name] = dict(auc=float(roc_auc_score(positive, probabilities[:, i])), fpr=fpr.tolist(),
                            tpr=tpr.tolist())
    defined = [c["auc"] for c in curves.values() if c["auc"] is not None]
    return curves, (float(np.mean(defined)) if defined else None)


def folder_counts(table, classes):
    """Per folder of an unlabelled tree: images, predictions per class and, for SIPaKMeD's classes, how many
    were called abnormal."""
    counts = pd.crosstab(table["folder"], table["predicted_class"]).reindex(columns=classes, fill_value=0)
    counts.insert(0, "images", counts.sum(axis=1))
    if sorted(classes) == sorted(SIPAKMED_GROUPS):
        counts["abnormal"] = counts[[c for c in classes if SIPAKMED_GROUPS[c] == "abnormal"]].sum(axis=1)
    return counts.reset_index()


def abnormal_vs_normal(truth, probabilities, classes):
    """SIPaKMeD's screening question, abnormal (Dyskeratotic, Koilocytotic) against the rest: sensitivity,
    specificity and the AUC of the summed abnormal probability. None when the classes are not SIPaKMeD's."""
    if sorted(classes) != sorted(SIPAKMED_GROUPS):
        return None
    abnormal = np.array([SIPAKMED_GROUPS[c] == "abnormal" for c in classes])
    actual = abnormal[np.asarray(truth)]
    called = abnormal[probabilities.argmax(1)]
    tn, fp, fn, tp = confusion_matrix(actual, called, labels=[False, True]).ravel()
    score = probabilities[:, abnormal].sum(1)
    both = actual.any() and not actual.all()
    return dict(sensitivity=float(tp / (tp + fn)) if tp + fn else None,
                specificity=float(tn / (tn + fp)) if tn + fp else None,
                auc=float(roc_auc_score(actual, score)) if both else None,
                true_positive=int(tp), false_negative=int(fn), true_negative=int(tn), false_positive=int(fp),
                groups=SIPAKMED_GROUPS)


def calibration(probabilities, truth, n_bins=15):
    """Expected calibration error over `n_bins` equal-width confidence bins (confidence = top probability),
    and per bin (upper edge, images, mean confidence, accuracy) for the reliability diagram."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == np.asarray(truth)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)  # (k/n, (k+1)/n]
    table, ece = [], 0.0
    for k in range(n_bins):
        members = bins == k
        if members.any():
            gap = abs(correct[members].mean() - confidence[members].mean())
            ece += members.mean() * gap
            table.append(dict(upper=(k + 1) / n_bins, images=int(members.sum()),
                              confidence=float(confidence[members].mean()), accuracy=float(correct[members].mean())))
    return float(ece), table


def plot_roc(curves, macro_auc, png):
    "One-vs-rest ROC curves of every class with its AUC in the legend."
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    for name, curve in curves.items():
        if curve["auc"] is not None:
            ax.plot(curve["fpr"], curve["tpr"], label=f"{name} (AUC {curve['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate (1 − specificity)", ylabel="true positive rate (sensitivity)",
           title=f"ROC, one class against the rest (macro AUC {macro_auc:.3f})" if macro_auc else "ROC")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, png)


def plot_calibration(table, ece, png):
    "Reliability diagram: accuracy against mean confidence per bin, bars sized by the images they hold."
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    width = 1 / 15
    ax.bar([row["upper"] - width / 2 for row in table], [row["accuracy"] for row in table], width=width * 0.9,
           color="#6baed6", edgecolor="#08519c", label="accuracy in the bin")
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    ax.plot([row["confidence"] for row in table], [row["accuracy"] for row in table], "o", color="#08519c", ms=3)
    for row in table:
        ax.annotate(str(row["images"]), (row["upper"] - width / 2, row["accuracy"]), ha="center", va="bottom",
                    fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence (top probability)", ylabel="accuracy",
           title=f"calibration: ECE {ece:.3f} (numbers: images per bin)")
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, png)


def conv_target_layer(model):
    """The last block of a fastai vision model's convolutional body (ResNet50: layer4), where Grad-CAM
    looks; None for a model without a convolutional body."""
    try:
        block = model[0][-1]
    except (TypeError, IndexError, KeyError, NotImplementedError):
        return None
    return block if any(isinstance(m, nn.Conv2d) for m in block.modules()) else None


def network_view(batch):
    "Normalised input tensors back to the RGB images (0–1, height × width × 3) that the network saw."
    mean, std = (torch.tensor(s, device=batch.device).view(1, 3, 1, 1) for s in imagenet_stats)
    return (batch * std + mean).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def gradcam_maps(learn, files, class_indices, batch_size=16):
    """Grad-CAM maps (0–1, image_size × image_size) of `files` for the classes asked, in batches on the
    learner's device, with the images the network saw. None when the model has no convolutional body."""
    layer = conv_target_layer(learn.model)
    if layer is None:
        return None
    dl = learn.dls.test_dl(files, bs=batch_size, num_workers=0)
    learn.model.eval()
    maps, images, start = [], [], 0
    with GradCAM(model=learn.model, target_layers=[layer]) as cam:
        for (batch,) in dl:
            batch = batch.as_subclass(torch.Tensor).contiguous()
            targets = [ClassifierOutputTarget(int(c)) for c in class_indices[start:start + len(batch)]]
            maps.append(cam(input_tensor=batch, targets=targets))
            images.append(network_view(batch))
            start += len(batch)
    return np.concatenate(maps), np.concatenate(images)


def gradcam_selection(truth, probabilities, classes, n):
    """(index, why) of the images to show: every misclassified one, and per class the `n` most and `n` least
    confident correct ones (per predicted class when there are no labels)."""
    predicted, confidence = probabilities.argmax(1), probabilities.max(1)
    labelled = truth is not None
    correct = predicted == np.asarray(truth) if labelled else np.ones(len(predicted), bool)
    chosen = [(int(i), "misclassified") for i in np.flatnonzero(~correct)]
    for c in range(len(classes)):
        members = np.flatnonzero(correct & (predicted == c))
        ranked = members[np.argsort(-confidence[members], kind="stable")]
        seen = {i for i, _ in chosen}
        label = "correct" if labelled else "predicted"
        chosen += [(int(i), f"most confident {label}") for i in ranked[:n] if i not in seen]
        seen |= {int(i) for i in ranked[:n]}
        chosen += [(int(i), f"least confident {label}") for i in ranked[::-1][:n] if i not in seen]
    return chosen


def save_overlay(image, heat, png, title):
    "The heat map over the image the network saw, with a title."
    fig, ax = plt.subplots(figsize=(3.2, 3.4))
    ax.imshow(show_cam_on_image(image.astype(np.float32), heat, use_rgb=True))
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    save_figure(fig, png)


def gradcam_gallery(learn, files, truth, probabilities, classes, output_dir, n):
    """Write Grad-CAM overlays (predicted class) of the selected images under output_dir/gradcam/; returns
    (gallery entries, reason when skipped)."""
    if n <= 0:
        return [], "Grad-CAM turned off (gradcam = 0)"
    if isinstance(learn, OnnxClassifier):
        return [], "Grad-CAM skipped: it needs the PyTorch model's gradients — give the .pth or .pkl beside the .onnx"
    chosen = gradcam_selection(truth, probabilities, classes=classes, n=n)
    if not chosen:
        return [], None
    predicted = probabilities.argmax(1)
    result = gradcam_maps(learn, [files[i] for i, _ in chosen], [predicted[i] for i, _ in chosen])
    if result is None:
        return [], "Grad-CAM skipped: the model has no convolutional body (it is not this project's ResNet50)"
    folder = Path(output_dir) / "gradcam"
    folder.mkdir(exist_ok=True)
    gallery = []
    for rank, ((i, why), heat, image) in enumerate(zip(chosen, *result, strict=True)):
        top3 = [(classes[k], float(probabilities[i, k])) for k in np.argsort(-probabilities[i])[:3]]
        true_class = classes[truth[i]] if truth is not None else None
        png = folder / f"{rank:03d}_{Path(files[i]).stem}.png"
        save_overlay(image, heat, png=png, title=f"{Path(files[i]).name}\npredicted {top3[0][0]} ({top3[0][1]:.2f})"
                     + (f", true {true_class}" if true_class else ""))
        name = f"{Path(files[i]).parent.name}/{Path(files[i]).name}"  # the folder tells cells of two classes apart
        gallery.append(dict(file=str(files[i]), name=name, why=why, true=true_class,
                            predicted=top3[0][0], top3=top3, png=png))
    return gallery, None


def file_sha256(path):
    "SHA-256 of a file, read in chunks (model files are ~100 MB)."
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inline_png(path):
    "A PNG file as a data: URL, so that the report is one file."
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def write_html(context, html):
    "Render the report template with `context` into `html` (written atomically)."
    environment = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    environment.filters["png"] = inline_png
    page = environment.get_template("report.html").render(
        **context, created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    with atomic_output(html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return html


def labelled_figures(truth, probabilities, classes, output_dir, n_resamples=2000, seed=0):
    """What labelled predictions add to the original's numbers: bootstrap intervals, per-class and macro
    AUC, the abnormal-vs-normal screening figures (SIPaKMeD), calibration; draws roc_curves.png and
    calibration.png. Returns a dict for metrics.json."""
    output_dir = Path(output_dir)
    curves, macro_auc = roc_per_class(truth, probabilities, classes)
    ece, bins = calibration(probabilities, truth)
    if macro_auc is not None:
        plot_roc(curves, macro_auc, output_dir / "roc_curves.png")
    plot_calibration(bins, ece, output_dir / "calibration.png")
    intervals = bootstrap_intervals(truth, probabilities.argmax(1), n_classes=len(classes), n_resamples=n_resamples,
                                    seed=seed)
    return dict(intervals=intervals,
                bootstrap=dict(resamples=n_resamples, seed=seed, level=0.95),
                auc={name: curve["auc"] for name, curve in curves.items()}, macro_auc=macro_auc,
                abnormal_vs_normal=abnormal_vs_normal(truth, probabilities, classes),
                ece=ece, calibration_bins=bins)


def write_report(learn, files, truth, probabilities, classes, summary, output_dir, gradcam=3, folders=None):
    """Grad-CAM gallery and report.html for one evaluation; `summary` is what metrics.json holds, `folders`
    the counts per folder of an unlabelled tree. Returns (report path, reason Grad-CAM was skipped or None)."""
    output_dir = Path(output_dir)
    gallery, skipped = gradcam_gallery(learn, files, truth=truth, probabilities=probabilities, classes=classes,
                                       output_dir=output_dir, n=gradcam)
    plain = summary.get("plain")
    matrix = np.array(plain["confusion_matrix"]) if plain else None
    context = dict(summary=summary, plain=plain, classes=classes, gallery=gallery, gradcam_note=skipped,
                   folders=None if folders is None else folders.to_dict("records"),
                   model_sha256=file_sha256(summary["model_path"]),
                   normalised=(matrix / np.maximum(matrix.sum(1, keepdims=True), 1)).tolist() if plain else None,
                   pictures={name: output_dir / f"{name}.png" for name in ("roc_curves", "calibration")
                             if plain and (output_dir / f"{name}.png").exists()},
                   predictions=None if plain else list(zip(files, probabilities.argmax(1), probabilities.max(1),
                                                           strict=True)))
    return write_html(context, output_dir / "report.html"), skipped


def label_metrics(truth, predicted, classes):
    """Accuracy, balanced accuracy, the majority-class baseline (the accuracy of a model that calls every image
    the test set's most frequent class), confusion matrix and sklearn's classification report (by class name)
    of integer labels."""
    labels = list(range(len(classes)))
    majority = int(np.bincount(truth, minlength=len(classes)).argmax())
    return dict(accuracy=float(accuracy_score(truth, predicted)),
                balanced_accuracy=float(balanced_accuracy(truth, predicted)),
                majority_baseline={"class": classes[majority],
                                   "accuracy": float(np.mean(np.asarray(truth) == majority))},
                confusion_matrix=confusion_matrix(truth, predicted, labels=labels).tolist(),
                report=classification_report(truth, predicted, labels=labels, target_names=classes,
                                             output_dict=True, zero_division=0),
                report_text=classification_report(truth, predicted, labels=labels, target_names=classes,
                                                   digits=4, zero_division=0))


def plot_confusion(matrix, classes, png, title):
    "Confusion matrix picture with counts and class names on both axes."
    fig, ax = plt.subplots(figsize=(1.4 * len(classes) + 3, 1.2 * len(classes) + 2))
    ConfusionMatrixDisplay(np.array(matrix), display_labels=classes).plot(ax=ax, cmap="Blues", colorbar=False,
                                                                          xticks_rotation=35)
    ax.set_title(title)
    save_figure(fig, png)


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


def evaluate_folder(model_path, test_dataset_path, output_dir=None, batch_size=16, tta=False, gradcam=3,
                    bootstrap=2000, unlabelled=False):
    """Predict every image of `test_dataset_path` and write the reports. A folder is walked as an unlabelled
    tree when `unlabelled`, or when none of its sub-folders is a class of the model: each prediction keeps its
    relative path, and folders.csv counts the predictions per folder. Returns a dict with the predictions
    table, the model's classes, the metrics (labelled input), the folder counts (a tree), the skipped files,
    the output folder and the HTML report."""
    check_positive(batch_size=batch_size)
    low, high = BOOTSTRAP_RANGE
    if not low <= bootstrap <= high:
        raise UserError(f"bootstrap is {bootstrap}; a 95% interval needs between {low} and {high} resamples "
                               "(2000 is the default) — set --bootstrap in that range")
    check_not_negative(gradcam=gradcam)
    model_path = user_path(model_path)
    files, labels, left_out = list_inputs(test_dataset_path)
    leak_check = check_split_leaks(test_dataset_path)
    output_dir = user_path(output_dir or model_path.with_name(f"{model_path.stem}_inference"))
    test_folder = user_path(test_dataset_path)
    if test_folder.is_dir() and is_inside(output_dir, test_folder):
        raise UserError(f"output_dir {output_dir} is inside test_dataset_path {test_folder}: the reports "
                               "would become test images — choose an output_dir outside it")
    output_dir.mkdir(parents=True, exist_ok=True)  # before the slow part: an unusable folder fails at once
    learn, classes = load_classifier(model_path, files, batch_size)
    tree = is_unlabelled_tree(test_dataset_path, labels, classes, unlabelled=unlabelled)
    if tree:
        files, left_out = list_tree(test_dataset_path), []
        labels = [None] * len(files)
    check_classes(labels, classes, test_dataset_path)
    skipped = []
    try:
        runs = {"plain": predict_files(learn, files, batch_size)}
    except IMAGE_ERRORS:
        # Some file cannot be decoded: only now pay for decoding each one to find which, then go on without them.
        files, labels, skipped = drop_unreadable(files, labels, test_dataset_path)
        runs = {"plain": predict_files(learn, files, batch_size)}
    if tta:
        runs["tta"] = predict_files(learn, files, batch_size, tta=True)
    table = predictions_table(files, labels, runs=runs, classes=classes)
    folders = None
    if tree:
        relative = [Path(f).relative_to(test_folder) for f in files]
        table.insert(1, "relative_path", [p.as_posix() for p in relative])
        table.insert(2, "folder", [p.parent.as_posix() for p in relative])
        folders = folder_counts(table, classes)
        with atomic_output(output_dir / "folders.csv") as tmp:
            folders.to_csv(tmp, index=False)
    with atomic_output(output_dir / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False)
    result = dict(table=table, classes=classes, skipped=skipped, left_out=left_out, output_dir=output_dir,
                  metrics={}, leak_check=leak_check, folders=folders)
    truth = None if labels[0] is None else [classes.index(label) for label in labels]
    if truth is not None:
        for name, probabilities in runs.items():
            result["metrics"][name] = label_metrics(truth, probabilities.argmax(1), classes)
        result["metrics"]["plain"].update(labelled_figures(truth, runs["plain"], classes=classes,
                                                           output_dir=output_dir, n_resamples=bootstrap))
        plot_confusion(result["metrics"]["plain"]["confusion_matrix"], classes, png=output_dir / "confusion_matrix.png",
                       title=f"{Path(model_path).name} on {Path(test_dataset_path).name}: "
                       f"accuracy {result['metrics']['plain']['accuracy']:.4f}")
    summary = dict(model_path=str(model_path), test_dataset_path=str(test_dataset_path), classes=classes,
                   n_images=len(files), skipped=skipped, left_out=list(map(str, left_out)), leak_check=leak_check,
                   **{name: {k: v for k, v in m.items() if k != "report_text"}
                      for name, m in result["metrics"].items()})
    with atomic_output(output_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    result["report"], result["gradcam_skipped"] = write_report(
        learn, files, truth=truth, probabilities=runs["plain"], classes=classes, summary=summary,
        output_dir=output_dir, gradcam=gradcam, folders=folders)
    return result


def print_report(result, classes):
    "What a reader wants on screen: accuracy, the confusion matrix with class names, the report."
    for name, metrics in result["metrics"].items():
        label = "test-time augmentation" if name == "tta" else "predictions"
        baseline = metrics["majority_baseline"]
        print(f"\n== {label}: accuracy {metrics['accuracy']:.4f}, balanced accuracy {metrics['balanced_accuracy']:.4f} "
              f"(majority-class baseline {baseline['accuracy']:.4f}: every image called {baseline['class']})")
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
