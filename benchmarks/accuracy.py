"""Accuracy of training setups (a recipe, how imbalance is made up for, which score picks the best epoch),
measured as mean ± std over repeated runs: train each setup on a formatted dataset for several seeds
(optionally on k stratified, group-aware folds), evaluate every model on its test split with and without
test-time augmentation, and print and write per-run rows and the summary.

    python benchmarks/accuracy.py --path-folder ../herlev_formatted --recipes original modern --seeds 0 1 2

    python benchmarks/accuracy.py --path-folder ../herlev_formatted --balances none sampler \
        --monitors accuracy balanced_accuracy --image-size 64 --seeds 0 1

Writes <out>/runs.csv (one row per run), <out>/summary.csv (mean, std per setup) and <out>/accuracy.png.
Rows are appended as runs finish, so a stopped benchmark keeps what it measured.
"""
import itertools
import sys
import time
from pathlib import Path
from typing import Annotated

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
from fastcore.script import call_parse  # noqa: E402
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score  # noqa: E402
from sklearn.model_selection import StratifiedGroupKFold  # noqa: E402

from papsmear import balance as balancing  # noqa: E402
from papsmear import checkpoint, data, figures, learner, predict, report, screening  # noqa: E402
from papsmear.files import (  # noqa: E402
    SPLITS,
    UserError,
    is_augmentation,
    is_sample_image,
    joined,
    read_split_csv,
    same_bytes_groups,
    source_stem,
    user_errors,
    user_path,
)
from papsmear.record import TrainingSettings  # noqa: E402

SCORES = ["accuracy", "accuracy_tta", "balanced_accuracy", "balanced_accuracy_tta", "macro_f1", "macro_f1_tta",
          "sensitivity_at_threshold", "specificity_at_threshold"]


def test_scores(learn, test_folder, record, batch_size=64):
    """Accuracy, balanced accuracy and macro F1 of `learn` on a labelled test folder, plain and with test-time
    augmentation; with the model's operating point (its `record`), the abnormal-vs-rest sensitivity and
    specificity at its threshold too."""
    files, labels, _ = predict.list_inputs(test_folder)
    classes = record.classes
    truth = [classes.index(label) for label in labels]
    scores = {}
    for suffix, tta in (("", False), ("_tta", True)):
        probabilities = predict.predict_files(learn, files, batch_size, tta=tta)
        predicted = probabilities.argmax(1)
        scores[f"accuracy{suffix}"] = accuracy_score(truth, predicted)
        scores[f"balanced_accuracy{suffix}"] = balanced_accuracy_score(truth, predicted)
        scores[f"macro_f1{suffix}"] = f1_score(truth, predicted, average="macro")
        if record.operating_point and not tta:
            actual = screening.abnormal_mask(classes, record.abnormal_classes)[truth]
            flagged = screening.called_abnormal(probabilities, classes, record.abnormal_classes,
                                                record.operating_point)
            scores["sensitivity_at_threshold"], scores["specificity_at_threshold"] = report.rates(actual, flagged)
    return scores


def fold_groups(path_folder):
    """(images with their class, groups) of all images of `path_folder` (train+val+test). A group keeps together
    an image with its Extended DA outputs `<stem>_augNN`, the cells of one cluster image (split.csv's group
    column), and byte-identical images wherever they lie (the same rule as the division's)."""
    images = sorted((p, p.parent.name) for split in SPLITS for p in (path_folder / split).glob("*/*")
                    if is_sample_image(p))
    groups_by_stem = {Path(row[0]).stem: row[3] for row in read_split_csv(path_folder) or [] if len(row) > 3}
    labels = {p: f"{label}/{groups_by_stem.get(source_stem(p), source_stem(p))}" for p, label in images}
    by_digest = {}
    for p, digest in same_bytes_groups([p for p, _ in images if not is_augmentation(p)]).items():
        by_digest.setdefault(digest, []).append(p)
    merged = joined(labels, by_digest.values())
    return images, [merged[p] for p, _ in images]


def fold_datasets(path_folder, folds, seed, out):
    """k formatted datasets over all images of `path_folder` (train+val+test): fold i tests on part i,
    validates on part i+1 and trains on the rest. Parts are stratified by class and keep each group
    (`fold_groups`) together. Extended DA outputs only ever train: validation and test parts leave them out.
    Images are linked, not copied."""
    images, groups = fold_groups(path_folder)
    labels = [label for _, label in images]
    parts = [test for _, test in StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
             .split(images, labels, groups)]
    datasets = []
    for fold in range(folds):
        root = out / f"fold{fold}"
        roles = {"test": parts[fold], "val": parts[(fold + 1) % folds]}
        for split in SPLITS:
            indices = roles.get(split, [i for k, part in enumerate(parts) if k not in (fold, (fold + 1) % folds)
                                        for i in part])
            for i in [i for i in indices if split == "train" or not is_augmentation(images[i][0])]:
                link = root / split / labels[i] / images[i][0].name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to(images[i][0].resolve())
        (root / "models").mkdir(exist_ok=True)
        datasets.append(root)
    return datasets


def check_folds(folds):
    "Refuse a number of folds that leaves no training part: 0 (the division's split) or at least 3."
    if folds and folds < 3:
        raise UserError(f"folds is {folds}; use 0 (the division's own test split) or 3 or more (each fold tests "
                               "on one part, validates on the next and trains on the rest)")


def check_fold_groups(path_folder, folds):
    "Refuse more folds than a class has groups (`fold_groups`: cluster images, or images with their augmentations)."
    images, groups = fold_groups(path_folder)
    counts = pd.DataFrame(dict(label=[label for _, label in images], group=groups)).groupby("label")["group"].nunique()
    if counts.min() < folds:
        raise UserError(f"class {counts.idxmin()} has {counts.min()} image group(s) (an image with its "
                               f"augmentations, or the cells of one cluster image), fewer than folds {folds} — "
                               "lower --folds")


def finished_runs(runs_csv):
    "The rows of the runs an interrupted benchmark measured (none when it wrote no runs.csv)."
    return pd.read_csv(runs_csv).to_dict("records") if runs_csv.is_file() else []


def setup_name(recipe, balance, monitor):
    "A setup's name in the tables: the recipe, and its balance and monitor when they are not the original's."
    return " ".join([recipe, *([f"balance={balance}"] if balance != "none" else []),
                     *([f"monitor={monitor}"] if monitor != "accuracy" else [])])


def summarise(runs):
    "Mean, std (sample, n-1) and number of runs of every score, per setup, in the order first run."
    grouped = runs.groupby("setup", sort=False)[[score for score in SCORES if score in runs] + ["seconds"]]
    table = grouped.agg(["mean", "std"])
    table.columns = [f"{score}_{stat}" for score, stat in table.columns]
    table.insert(0, "runs", grouped.size())
    return table


def plot_summary(runs, png):
    "Per setup: each run's test accuracy as a dot and the mean ± std as a bar with an error line."
    summary = summarise(runs)
    fig, ax = figures.plt.subplots(figsize=(1.4 * len(summary) + 3, 4))
    x = range(len(summary))
    ax.bar(x, summary["accuracy_mean"], yerr=summary["accuracy_std"].fillna(0), color="#9ecae1", capsize=6)
    for i, setup in enumerate(summary.index):
        ax.plot([i] * (runs.setup == setup).sum(), runs.loc[runs.setup == setup, "accuracy"], "ko", ms=4)
    ax.set_xticks(list(x), summary.index, rotation=20)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("test accuracy per setup: runs (dots), mean ± std (bars)")
    figures.save_figure(fig, png)


def format_summary(summary):
    "The summary as a reader wants it: mean ± std per score, in percent."
    return pd.DataFrame({"runs": summary["runs"], "seconds": summary["seconds_mean"].round(0), **{
        score: [f"{100 * m:.1f} ± {100 * s:.1f}" if s == s else f"{100 * m:.1f}"
                for m, s in zip(summary[f"{score}_mean"], summary[f"{score}_std"], strict=True)]
        for score in SCORES if f"{score}_mean" in summary}},
        index=summary.index).to_string()


@call_parse
def main(path_folder: Path = Path("data/herlev_formatted"),                     # formatted dataset
         # recipes to compare (modern-<ingredient>: modern without one ingredient)
         recipes: Annotated[list, {"nargs": "+", "type": str}] = ("original", "modern"),
         # how training makes up for imbalanced classes: none, inverse, sqrt, sampler (each one a setup)
         balances: Annotated[list, {"nargs": "+", "type": str}] = ("none",),
         # validation scores that pick the best epoch: accuracy, balanced_accuracy, macro_f1 (each one a setup)
         monitors: Annotated[list, {"nargs": "+", "type": str}] = ("accuracy",),
         seeds: Annotated[list, {"nargs": "+", "type": int}] = (0, 1, 2),       # one run per seed
         folds: int = 0,                          # 0: the division's own test split; k: k group-aware folds
         epochs: int = None,                      # default: each recipe's
         batch_size: int = None,                  # default: each recipe's
         lr: float = None,                        # default: each recipe's
         image_size: int = 224,                   # training image side in pixels
         workers: int = None,                     # data loader processes (default as R50.py)
         memory_budget: float = None,             # GB for presized images in memory (default as R50.py; 0: off)
         target_sensitivity: float = None,        # choose each model's operating point on val; score it on test
         resume: bool = False,                    # keep the runs in <out>/runs.csv; continue an interrupted one
         out: Path = None):                       # results folder (default: path_folder/models/accuracy)
    """Train and test each setup (every recipe with every balance and monitor) for each seed (and fold); print
    and write per-run scores and mean ± std."""
    with user_errors():
        # Every option is checked before the first run, so that a bad one never stops a benchmark half-way.
        path_folder = user_path(path_folder)
        for recipe in recipes:
            data.recipe_settings(recipe)
        for balance in balances:
            balancing.check_balance(balance)
        for monitor in monitors:
            balancing.check_monitor(monitor)
        check_folds(folds)
        learner.check_training_options("accuracy", epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size,
                                      workers=workers, memory_budget=memory_budget)
        data.check_formatted(path_folder)
        if folds:
            check_fold_groups(path_folder, folds)
        out = user_path(out or path_folder / "models" / "accuracy")
        out.mkdir(parents=True, exist_ok=True)
        datasets = fold_datasets(path_folder, folds, seeds[0], out) if folds else [path_folder]
        rows = finished_runs(out / "runs.csv") if resume else []
        for recipe, balance, monitor in itertools.product(recipes, balances, monitors):
            setup = setup_name(recipe, balance, monitor)
            for seed, (fold, dataset) in itertools.product(seeds, enumerate(datasets)):
                if any((row["setup"], row["seed"], row["fold"]) == (setup, seed, fold) for row in rows):
                    continue  # measured before the benchmark was interrupted
                save_loc = f"accuracy_{setup.replace(' ', '_')}_seed{seed}"
                start = time.perf_counter()
                result = learner.train_r50(TrainingSettings(
                    dataset, save_loc=save_loc, epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size,
                    pretrained=False, seed=seed, workers=workers, recipe=recipe, memory_budget=memory_budget,
                    monitor=monitor, balance=balance, onnx=False, target_sensitivity=target_sensitivity,
                    resume=resume and checkpoint.checkpoint_path(dataset / "models", save_loc).is_file()))
                scores = test_scores(result["learner"], dataset / "test", result["record"])
                rows.append(dict(setup=setup, recipe=recipe, balance=balance, monitor=monitor, seed=seed, fold=fold,
                                 **scores, val_accuracy=result["scores"].loc["validation", "accuracy"],
                                 seconds=round(time.perf_counter() - start, 1)))
                runs = pd.DataFrame(rows)
                runs.to_csv(out / "runs.csv", index=False)
                print(f"\n== {setup} seed {seed} fold {fold}: test accuracy {scores['accuracy']:.4f} "
                      f"(TTA {scores['accuracy_tta']:.4f}), balanced accuracy {scores['balanced_accuracy']:.4f}, "
                      f"macro F1 {scores['macro_f1']:.4f}", flush=True)
        summary = summarise(runs)
        summary.to_csv(out / "summary.csv")
        plot_summary(runs, out / "accuracy.png")
        print(runs.round(4).to_string(index=False))
        print(f"\n{format_summary(summary)}\n\nruns: {out / 'runs.csv'}, summary: {out / 'summary.csv'}, "
              f"plot: {out / 'accuracy.png'}")
