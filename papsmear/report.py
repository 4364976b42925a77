"""The evaluation report: metrics, bootstrap intervals, ROC, calibration, screening figures, Grad-CAM and one
HTML page.

`evaluate_folder` predicts a folder and writes it all: the abnormal-against-the-rest figures whenever the model
has abnormal classes (`papsmear.screening`), at argmax and at its operating point. The page's Jinja2 template
lies beside this module. Nothing here trains.
"""
import base64
import json
import textwrap
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

from papsmear.balance import balanced_accuracy
from papsmear.figures import plt, save_figure
from papsmear.files import (
    IMAGE_ERRORS,
    UserError,
    atomic_output,
    check_not_negative,
    check_positive,
    file_sha256,
    is_inside,
    progress_bar,
    spreadsheet_safe,
    user_path,
)
from papsmear.onnx_model import OnnxClassifier
from papsmear.predict import (
    check_classes,
    check_split_leaks,
    check_trained_images,
    drop_unreadable,
    is_unlabelled_tree,
    list_inputs,
    list_tree,
    load_classifier,
    predict_files,
    store_model_record,
)
from papsmear.screening import (
    SIPAKMED_GROUPS,
    abnormal_classes,
    abnormal_mask,
    abnormal_probability,
    called_abnormal,
    check_target_sensitivity,
    choose_operating_point,
    rule_text,
)

TEMPLATES = Path(__file__).resolve().parent / "templates"
BOOTSTRAP_CHUNK = 1_000_000  # test-image indices drawn at once
BOOTSTRAP_RANGE = (100, 100_000)  # fewer resamples give no 95% interval; more change it below its rounding
OVERLAY_QUALITY = 70  # JPEG quality of the Grad-CAM overlays: a report of 1000 test images stays under 3 MB


def resampled(scores, n_items, n_resamples=2000, seed=0, level=0.95):
    """{name: value, low, high} of each score (a function of an index array into the test images) on all the
    images, with its percentile bootstrap interval: the images resampled with replacement `n_resamples` times
    (seeded; a resample where a score is undefined, NaN, is left out of its interval)."""
    rng, samples = np.random.default_rng(seed), {name: [] for name in scores}
    # Resamples are drawn in chunks of about a million indices, so memory stays bounded for any count; the
    # draws are the same as in one go (the generator's stream does not depend on the chunking).
    chunk = max(1, BOOTSTRAP_CHUNK // n_items)
    with progress_bar(total=n_resamples, desc="bootstrap", unit="resample",
                      disable=n_resamples * n_items < 10 ** 7) as bar:
        for start in range(0, n_resamples, chunk):
            for i in rng.integers(0, n_items, (min(chunk, n_resamples - start), n_items)):
                for name, score in scores.items():
                    samples[name].append(score(i))
            bar.update(min(chunk, n_resamples - start))
    tail, everything = 100 * (1 - level) / 2, np.arange(n_items)
    intervals = {}
    for name, score in scores.items():
        defined = [v for v in samples[name] if v == v]
        low, high = np.percentile(defined, [tail, 100 - tail]) if defined else (float("nan"),) * 2
        value = score(everything)
        intervals[name] = dict(value=None if value != value else float(value), low=float(low), high=float(high))
    return intervals


def bootstrap_intervals(truth, predicted, n_classes, n_resamples=2000, seed=0, level=0.95):
    """Accuracy, balanced accuracy (mean recall of the classes in the resample), macro F1 and weighted F1
    with percentile bootstrap intervals (`resampled`), each score computed by scikit-learn."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    labels = list(range(n_classes))
    scores = {"accuracy": lambda i: accuracy_score(truth[i], predicted[i]),
              "balanced_accuracy": lambda i: balanced_accuracy(truth[i], predicted[i]),
              "macro_f1": lambda i: f1_score(truth[i], predicted[i], labels=labels, average="macro", zero_division=0),
              "weighted_f1": lambda i: f1_score(truth[i], predicted[i], labels=labels, average="weighted",
                                                zero_division=0)}
    return resampled(scores, len(truth), n_resamples=n_resamples, seed=seed, level=level)


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
    """Per folder of an unlabelled tree: images, predictions per class and, when the model has abnormal classes,
    how many images were called abnormal (the predictions table's `abnormal` column, by its rule)."""
    counts = pd.crosstab(table["folder"], table["predicted_class"]).reindex(columns=classes, fill_value=0)
    counts.insert(0, "images", counts.sum(axis=1))
    if "abnormal" in table:
        counts["abnormal"] = table.groupby("folder")["abnormal"].sum().reindex(counts.index).astype(int)
    return counts.reset_index()


def rates(actual, flagged):
    "(sensitivity, specificity) of flagged cells against the abnormal ones; NaN where a group is empty."
    actual, flagged = np.asarray(actual, bool), np.asarray(flagged, bool)
    sensitivity = (actual & flagged).sum() / actual.sum() if actual.any() else float("nan")
    specificity = (~actual & ~flagged).sum() / (~actual).sum() if (~actual).any() else float("nan")
    return sensitivity, specificity


def flagged_figures(actual, flagged, n_resamples, seed):
    """Sensitivity and specificity of flagged cells with their bootstrap intervals (the same resamples as the
    other intervals), and the four counts behind them."""
    tn, fp, fn, tp = confusion_matrix(actual, flagged, labels=[False, True]).ravel()
    intervals = resampled({"sensitivity": lambda i: rates(actual[i], flagged[i])[0],
                           "specificity": lambda i: rates(actual[i], flagged[i])[1]},
                          len(actual), n_resamples=n_resamples, seed=seed)
    return dict(sensitivity=intervals["sensitivity"]["value"], specificity=intervals["specificity"]["value"],
                intervals=intervals, true_positive=int(tp), false_negative=int(fn), true_negative=int(tn),
                false_positive=int(fp))


def abnormal_vs_normal(truth, probabilities, classes, abnormal, operating_point=None, n_resamples=2000, seed=0):
    """The screening question, abnormal against the rest, for a model whose abnormal classes are `abnormal`
    (None: no grouping, no figures): sensitivity and specificity when the most probable class decides, and at the
    operating point when the model has one (p(abnormal) against its threshold), each with bootstrap intervals;
    the AUC and ROC curve of p(abnormal)."""
    if not abnormal:
        return None
    actual = abnormal_mask(classes, abnormal)[np.asarray(truth)]
    score = abnormal_probability(probabilities, classes, abnormal)
    both = actual.any() and not actual.all()
    curve = roc_curve(actual, score) if both else ([], [], [])
    at_argmax = flagged_figures(actual, called_abnormal(probabilities, classes, abnormal), n_resamples, seed)
    figures = dict(abnormal_classes=list(abnormal), rule=rule_text(operating_point), **at_argmax,
                   auc=float(roc_auc_score(actual, score)) if both else None,
                   roc=dict(fpr=list(map(float, curve[0])), tpr=list(map(float, curve[1]))),
                   groups=SIPAKMED_GROUPS if sorted(classes) == sorted(SIPAKMED_GROUPS) else None)
    if operating_point:
        flagged = called_abnormal(probabilities, classes, abnormal, operating_point)
        figures["at_threshold"] = dict(operating_point=operating_point,
                                       **flagged_figures(actual, flagged, n_resamples, seed))
    return figures


def plot_screening_roc(screen, png):
    "ROC of p(abnormal) against the rest, with the argmax point and the stored operating point marked."
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    ax.plot(screen["roc"]["fpr"], screen["roc"]["tpr"], color="#08519c", label=f"p(abnormal), AUC {screen['auc']:.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.plot(1 - screen["specificity"], screen["sensitivity"], "s", color="#6a51a3", ms=8,
            label="argmax (most probable class)")
    if "at_threshold" in screen:
        point = screen["at_threshold"]
        ax.plot(1 - point["specificity"], point["sensitivity"], "o", color="#cf222e", ms=9,
                label=f"operating point: p ≥ {point['operating_point']['threshold']:.3f}")
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="Screening: abnormal against the rest", xlim=(0, 1),
           ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, png)


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
    """(index, why) of the images to show, and how many misclassified images each confusion cell leaves out:
    per confusion cell (true class, predicted class) its `n` most confident mistakes, and per class the `n` most
    and `n` least confident correct ones (per predicted class when there are no labels). So the gallery grows
    with the number of classes, not with the test set."""
    predicted, confidence = probabilities.argmax(1), probabilities.max(1)
    labelled = truth is not None
    truth = np.asarray(truth) if labelled else predicted
    chosen, more = [], {}
    for actual, called in sorted({(int(t), int(p)) for t, p in zip(truth, predicted, strict=True) if t != p}):
        members = np.flatnonzero((truth == actual) & (predicted == called))
        ranked = members[np.argsort(-confidence[members], kind="stable")]
        chosen += [(int(i), "misclassified") for i in ranked[:n]]
        if len(ranked) > n:
            more[(classes[actual], classes[called])] = len(ranked) - n
    label = "correct" if labelled else "predicted"
    for c in range(len(classes)):
        members = np.flatnonzero((truth == c) & (predicted == c))
        ranked = members[np.argsort(-confidence[members], kind="stable")]
        chosen += [(int(i), f"most confident {label}") for i in ranked[:n]]
        chosen += [(int(i), f"least confident {label}") for i in ranked[::-1][:n] if i not in ranked[:n]]
    return chosen, more


def fit_title(ax, title, fontsize=8):
    """Set a title wrapped so that it fits the figure's width: long class names are broken over lines (inside a
    word when they have no space), never clipped. Rewraps narrower until the rendered text fits."""
    figure = ax.figure
    renderer = figure.canvas.get_renderer()
    width = figure.bbox.width
    for characters in range(44, 5, -2):
        lines = [textwrap.fill(line, characters, break_long_words=True, break_on_hyphens=True)
                 for line in title.split("\n")]
        text = ax.set_title("\n".join(lines), fontsize=fontsize)
        if text.get_window_extent(renderer).width <= 0.96 * width:
            return text
    return text


def save_overlay(image, heat, path, title):
    "The heat map over the image the network saw, with a title wrapped to the picture's width, as JPEG."
    fig, ax = plt.subplots(figsize=(2.8, 3.0))
    ax.imshow(show_cam_on_image(image.astype(np.float32), heat, use_rgb=True))
    fit_title(ax, title, fontsize=7)
    ax.axis("off")
    save_figure(fig, path, format="jpeg", pil_kwargs=dict(quality=OVERLAY_QUALITY))


def gradcam_gallery(learn, files, truth, probabilities, classes, output_dir, n, names=None):
    """Write Grad-CAM overlays (predicted class) of the selected images (`gradcam_selection`) under
    output_dir/gradcam/; `names` are what the gallery calls the files (default: folder/name). Returns (gallery
    entries, confusion cells with overlays left out: {(true, predicted): count}, reason when skipped)."""
    if n <= 0:
        return [], {}, "Grad-CAM turned off (gradcam = 0)"
    if isinstance(learn, OnnxClassifier):
        return [], {}, ("Grad-CAM skipped: it needs the PyTorch model's gradients — give the .pth or .pkl beside "
                        "the .onnx")
    chosen, more = gradcam_selection(truth, probabilities, classes=classes, n=n)
    if not chosen:
        return [], more, None
    predicted = probabilities.argmax(1)
    result = gradcam_maps(learn, [files[i] for i, _ in chosen], [predicted[i] for i, _ in chosen])
    if result is None:
        return [], more, "Grad-CAM skipped: the model has no convolutional body (it is not this project's ResNet50)"
    folder = Path(output_dir) / "gradcam"
    folder.mkdir(exist_ok=True)
    names = names or [f"{Path(f).parent.name}/{Path(f).name}" for f in files]  # the folder tells classes apart
    gallery = []
    for rank, ((i, why), heat, image) in enumerate(zip(chosen, *result, strict=True)):
        top3 = [(classes[k], float(probabilities[i, k])) for k in np.argsort(-probabilities[i])[:3]]
        true_class = classes[truth[i]] if truth is not None else None
        picture = folder / f"{rank:03d}_{Path(files[i]).stem}.jpg"
        save_overlay(image, heat, path=picture, title=f"{Path(names[i]).name}\npredicted {top3[0][0]} "
                     f"({top3[0][1]:.2f})" + (f", true {true_class}" if true_class else ""))
        gallery.append(dict(file=str(files[i]), name=names[i], why=why, true=true_class,
                            predicted=top3[0][0], top3=top3, picture=picture))
    return gallery, more, None


def inline_picture(path):
    "A PNG or JPEG file as a data: URL, so that the report is one file."
    kind = "jpeg" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "png"
    return f"data:image/{kind};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def write_html(context, html, template="report.html"):
    "Render a report template (templates/) with `context` into `html` (written atomically)."
    environment = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    environment.filters["inline"] = inline_picture
    page = environment.get_template(template).render(
        **context, created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    with atomic_output(html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return html


def labelled_figures(truth, probabilities, record, output_dir, n_resamples=2000, seed=0):
    """What labelled predictions add to the original's numbers: bootstrap intervals, per-class and macro AUC,
    the abnormal-vs-rest screening figures (at argmax, and at the model's operating point), calibration; draws
    roc_curves.png, screening_roc.png and calibration.png. Returns a dict for metrics.json."""
    output_dir, classes = Path(output_dir), record.classes
    curves, macro_auc = roc_per_class(truth, probabilities, classes)
    ece, bins = calibration(probabilities, truth)
    if macro_auc is not None:
        plot_roc(curves, macro_auc, output_dir / "roc_curves.png")
    plot_calibration(bins, ece, output_dir / "calibration.png")
    intervals = bootstrap_intervals(truth, probabilities.argmax(1), n_classes=len(classes), n_resamples=n_resamples,
                                    seed=seed)
    screen = abnormal_vs_normal(truth, probabilities, classes, record.abnormal_classes, record.operating_point,
                                n_resamples=n_resamples, seed=seed)
    if screen and screen["auc"] is not None:
        plot_screening_roc(screen, output_dir / "screening_roc.png")
    return dict(intervals=intervals,
                bootstrap=dict(resamples=n_resamples, seed=seed, level=0.95),
                auc={name: curve["auc"] for name, curve in curves.items()}, macro_auc=macro_auc,
                abnormal_vs_normal=screen, ece=ece, calibration_bins=bins)


def write_report(learn, files, truth, probabilities, classes, summary, output_dir, gradcam=3, folders=None,
                 names=None):
    """Grad-CAM gallery and report.html for one evaluation; `summary` is what metrics.json holds, `folders`
    the counts per folder of an unlabelled tree, `names` what the report calls the files (default: their
    paths). Returns (report path, reason Grad-CAM was skipped or None)."""
    output_dir = Path(output_dir)
    names = names or [str(f) for f in files]
    gallery, more, skipped = gradcam_gallery(learn, files, truth=truth, probabilities=probabilities, classes=classes,
                                             output_dir=output_dir, n=gradcam,
                                             names=None if summary.get("plain") else names)
    plain = summary.get("plain")
    matrix = np.array(plain["confusion_matrix"]) if plain else None
    flagged = summary.get("flagged")
    context = dict(summary=summary, plain=plain, classes=classes, gallery=gallery, gradcam_note=skipped,
                   more=[dict(true=t, predicted=p, count=n) for (t, p), n in more.items()],
                   folders=None if folders is None else folders.to_dict("records"),
                   model_sha256=file_sha256(summary["model_path"]),
                   normalised=(matrix / np.maximum(matrix.sum(1, keepdims=True), 1)).tolist() if plain else None,
                   pictures={name: output_dir / f"{name}.png"
                             for name in ("roc_curves", "screening_roc", "calibration")
                             if plain and (output_dir / f"{name}.png").exists()},
                   predictions=None if plain else [
                       dict(name=name, predicted=classes[index], probability=p,
                            abnormal=None if flagged is None else bool(flagged[k]))
                       for k, (name, index, p) in enumerate(zip(names, probabilities.argmax(1), probabilities.max(1),
                                                                strict=True))])
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
    """Confusion matrix picture with counts and class names on both axes; long names are wrapped over lines so
    that they are never clipped, and the figure grows with the number of classes."""
    wrapped = [textwrap.fill(c, 18, break_long_words=True) for c in classes]
    lines = max(name.count("\n") + 1 for name in wrapped)
    fig, ax = plt.subplots(figsize=(1.3 * len(classes) + 2.5 + 0.6 * lines, 1.1 * len(classes) + 1.5 + 0.3 * lines))
    ConfusionMatrixDisplay(np.array(matrix), display_labels=wrapped).plot(ax=ax, cmap="Blues", colorbar=False,
                                                                          xticks_rotation=35)
    ax.tick_params(labelsize=8)
    fit_title(ax, title, fontsize=10)
    save_figure(fig, png)


def predictions_table(files, labels, runs, record):
    """One row per image: file, true class (if known), predicted class, the probability of each class, the
    class predicted with test-time augmentation when it was run, and, when the model has abnormal classes,
    p(abnormal), whether the cell is flagged abnormal and the rule that flagged it (`papsmear.screening`)."""
    classes = record.classes
    table = pd.DataFrame({"file": [spreadsheet_safe(f) for f in files]})
    if any(label is not None for label in labels):
        table["true_class"] = labels
    table["predicted_class"] = [classes[i] for i in runs["plain"].argmax(1)]
    for i, name in enumerate(classes):
        table[f"p_{name}"] = runs["plain"][:, i]
    if "tta" in runs:
        table["tta_predicted_class"] = [classes[i] for i in runs["tta"].argmax(1)]
    if record.abnormal_classes:
        table["p_abnormal"] = abnormal_probability(runs["plain"], classes, record.abnormal_classes)
        table["abnormal"] = called_abnormal(runs["plain"], classes, record.abnormal_classes, record.operating_point)
        table["abnormal_rule"] = rule_text(record.operating_point)
    return table


def check_evaluation_options(batch_size, gradcam, bootstrap):
    "Refuse evaluation options out of range before any work."
    check_positive(batch_size=batch_size)
    low, high = BOOTSTRAP_RANGE
    if not low <= bootstrap <= high:
        raise UserError(f"bootstrap is {bootstrap}; a 95% interval needs between {low} and {high} resamples "
                        "(2000 is the default) — set --bootstrap in that range")
    check_not_negative(gradcam=gradcam)


def predict_all(learn, files, labels, test_dataset_path, batch_size, tta):
    """({"plain": probabilities, "tta": probabilities with TTA}, files, labels, skipped descriptions): a file
    that cannot be decoded is found (only then is each decoded on its own), skipped and named."""
    skipped = []
    try:
        runs = {"plain": predict_files(learn, files, batch_size)}
    except IMAGE_ERRORS:
        files, labels, skipped = drop_unreadable(files, labels, test_dataset_path)
        runs = {"plain": predict_files(learn, files, batch_size)}
    if tta:
        runs["tta"] = predict_files(learn, files, batch_size, tta=True)
    return runs, files, labels, skipped


def evaluate_folder(model_path, test_dataset_path, output_dir=None, batch_size=16, tta=False, gradcam=3,
                    bootstrap=2000, unlabelled=False, allow_trained_images=False):
    """Predict every image of `test_dataset_path` and write the reports. A folder is walked as an unlabelled
    tree when `unlabelled`, or when none of its sub-folders is a class of the model: each prediction keeps its
    relative path, and folders.csv counts the predictions per folder. A labelled folder is checked against the
    images the model trained on (`papsmear.predict.check_trained_images`; `allow_trained_images` makes that a
    warning). Returns a dict with the predictions table, the model's record and classes, the metrics (labelled
    input), the folder counts (a tree), the skipped files, the checks' lines, the output folder and the report."""
    check_evaluation_options(batch_size, gradcam, bootstrap)
    model_path = user_path(model_path)
    files, labels, left_out = list_inputs(test_dataset_path)
    leak_check = check_split_leaks(test_dataset_path)
    output_dir = user_path(output_dir or model_path.with_name(f"{model_path.stem}_inference"))
    test_folder = user_path(test_dataset_path)
    if test_folder.is_dir() and is_inside(output_dir, test_folder):
        raise UserError(f"output_dir {output_dir} is inside test_dataset_path {test_folder}: the reports "
                        "would become test images — choose an output_dir outside it")
    output_dir.mkdir(parents=True, exist_ok=True)  # before the slow part: an unusable folder fails at once
    learn, record = load_classifier(model_path, files, batch_size)
    classes = record.classes
    tree = is_unlabelled_tree(test_dataset_path, labels, classes, unlabelled=unlabelled)
    tree_notes = []
    if tree:
        (files, tree_notes), left_out = list_tree(test_dataset_path), []
        labels = [None] * len(files)
    check_classes(labels, classes, test_dataset_path)
    model_check = (check_trained_images(record, files, test_dataset_path, allow=allow_trained_images)
                   if labels[0] is not None else "model check: not run (no labels: nothing is scored)")
    runs, files, labels, skipped = predict_all(learn, files, labels, test_dataset_path, batch_size, tta)
    table = predictions_table(files, labels, runs=runs, record=record)
    folders = None
    if tree:
        relative = [Path(f).relative_to(test_folder) for f in files]
        table.insert(1, "relative_path", [spreadsheet_safe(p.as_posix()) for p in relative])
        table.insert(2, "folder", [spreadsheet_safe(p.parent.as_posix()) for p in relative])
        folders = folder_counts(table, classes)
        with atomic_output(output_dir / "folders.csv") as tmp:
            folders.to_csv(tmp, index=False)
    with atomic_output(output_dir / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False)
    result = dict(table=table, classes=classes, record=record, skipped=skipped, left_out=left_out,
                  output_dir=output_dir, metrics={}, leak_check=leak_check, model_check=model_check, folders=folders,
                  tree_notes=tree_notes)
    truth = None if labels[0] is None else [classes.index(label) for label in labels]
    if truth is not None:
        for name, probabilities in runs.items():
            result["metrics"][name] = label_metrics(truth, probabilities.argmax(1), classes)
        result["metrics"]["plain"].update(labelled_figures(truth, runs["plain"], record, output_dir=output_dir,
                                                           n_resamples=bootstrap))
        plot_confusion(result["metrics"]["plain"]["confusion_matrix"], classes, png=output_dir / "confusion_matrix.png",
                       title=f"{Path(model_path).name} on {Path(test_dataset_path).name}: "
                       f"accuracy {result['metrics']['plain']['accuracy']:.4f}")
    summary = dict(model_path=str(model_path), test_dataset_path=str(test_dataset_path), classes=classes,
                   abnormal_classes=record.abnormal_classes, abnormal_rule=rule_text(record.operating_point)
                   if record.abnormal_classes else None, operating_point=record.operating_point,
                   n_images=len(files), skipped=skipped, left_out=list(map(str, left_out)), leak_check=leak_check,
                   model_check=model_check, **{name: {k: v for k, v in m.items() if k != "report_text"}
                                               for name, m in result["metrics"].items()})
    with atomic_output(output_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    names = list(table["relative_path"]) if tree else None
    summary["flagged"] = list(table["abnormal"]) if "abnormal" in table else None
    result["report"], result["gradcam_skipped"] = write_report(
        learn, files, truth=truth, probabilities=runs["plain"], classes=classes, summary=summary,
        output_dir=output_dir, gradcam=gradcam, folders=folders, names=names)
    return result


def choose_on_folder(model_path, labelled_folder, target_sensitivity, abnormal=None, normal=None, batch_size=16):
    """Choose a model's operating point on a labelled folder (class folders), reaching `target_sensitivity` there
    (`papsmear.screening.choose_operating_point`), with the abnormal classes named (`abnormal` or `normal`), or
    else those the model's record holds or its class set's known grouping; store it in every file of the model
    that holds its record. Images the model trained on are refused (`check_trained_images`). Returns (record,
    files written)."""
    check_target_sensitivity(target_sensitivity)
    check_positive(batch_size=batch_size)
    files, labels, _ = list_inputs(labelled_folder)
    learn, record = load_classifier(model_path, files, batch_size)
    chosen = abnormal_classes(record.classes, abnormal, normal) if abnormal or normal else (
        record.abnormal_classes or abnormal_classes(record.classes))
    if not chosen:
        raise UserError(f"the model's classes {record.classes} have no known grouping — name the abnormal ones with "
                        "--abnormal-classes (or the normal ones with --normal-classes)")
    if labels[0] is None or is_unlabelled_tree(labelled_folder, labels, record.classes):
        raise UserError(f"{labelled_folder} holds no class folders of the model's classes — name a labelled folder "
                        "(such as the val/ split of its dataset)")
    check_classes(labels, record.classes, labelled_folder)
    check_trained_images(record, files, labelled_folder)
    runs, files, labels, _ = predict_all(learn, files, labels, labelled_folder, batch_size, tta=False)
    truth = abnormal_mask(record.classes, chosen)[[record.classes.index(label) for label in labels]]
    record.abnormal_classes = chosen
    record.operating_point = choose_operating_point(truth, abnormal_probability(runs["plain"], record.classes, chosen),
                                                    target_sensitivity, chosen_on=user_path(labelled_folder))
    return record, store_model_record(model_path, record)


def interval_text(figure):
    "A figure with its interval, as the summary prints it."
    if figure["value"] is None:
        return "undefined"
    return f"{figure['value']:.4f} (95% CI {figure['low']:.4f}–{figure['high']:.4f})"


def print_report(result, classes):
    "What a reader wants on screen: accuracy, the screening figures, the confusion matrix with class names, the report."
    for name, metrics in result["metrics"].items():
        label = "test-time augmentation" if name == "tta" else "predictions"
        baseline = metrics["majority_baseline"]
        print(f"\n== {label}: accuracy {metrics['accuracy']:.4f}, balanced accuracy {metrics['balanced_accuracy']:.4f} "
              f"(majority-class baseline {baseline['accuracy']:.4f}: every image called {baseline['class']})")
        for key, figure in metrics.get("intervals", {}).items():
            print(f"   {key.replace('_', ' ')} {interval_text(figure)}")
        if "macro_auc" in metrics:
            auc = "undefined" if metrics["macro_auc"] is None else f"{metrics['macro_auc']:.4f}"
            print(f"   macro AUC {auc}, expected calibration error {metrics['ece']:.4f}")
        screen = metrics.get("abnormal_vs_normal")
        if screen:
            print(f"   abnormal ({', '.join(screen['abnormal_classes'])}) vs the rest, most probable class: "
                  f"sensitivity {interval_text(screen['intervals']['sensitivity'])}, "
                  f"specificity {interval_text(screen['intervals']['specificity'])}")
            if "at_threshold" in screen:
                point = screen["at_threshold"]
                print(f"   at the operating point p(abnormal) ≥ {point['operating_point']['threshold']:.4f}: "
                      f"sensitivity {interval_text(point['intervals']['sensitivity'])}, "
                      f"specificity {interval_text(point['intervals']['specificity'])}")
        matrix = pd.DataFrame(metrics["confusion_matrix"], index=[f"true {c}" for c in classes], columns=classes)
        print(matrix.to_string())
        print(metrics["report_text"])
