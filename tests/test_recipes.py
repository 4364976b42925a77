"""Group-aware division of cropped cells, training recipes, and the repeated-runs accuracy benchmark."""
import hashlib
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from fastai.callback.mixup import MixUp
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat

from conftest import ROOT, run_script, train
from papsmear import data, division
from papsmear import files as papfiles

# split.csv of the demo raw data (seed 3) as divided before cropped cells were grouped: these divisions
# must stay the original's rule, byte for byte.
UNCHANGED_SPLITS = {
    "sipakmed": ({}, "cd1fbaff4c610c40acd197ddf02990d9d6cb201f33e204f54df688fa4a0de69f"),
    "herlev": ({}, "b3df8d3c68caa41f2fa31fe33eca16412ec3a5b6bf057d132aea838274d89489"),
    "cells one by one": (dict(cropped=True, group_cells=False),
                         "5f49d4db20bd9464f995b3e9a45bbdc918d67e310e45019eef88e68a349ae5a0"),
}


@pytest.mark.parametrize("case", list(UNCHANGED_SPLITS))
def test_cluster_image_and_ungrouped_divisions_are_unchanged(raw_data, tmp_path, case):
    options, digest = UNCHANGED_SPLITS[case]
    dataset = "herlev" if case == "herlev" else "sipakmed"
    division.divide_dataset(raw_data / dataset, tmp_path / "out", progress=False, **options)
    assert hashlib.sha256((tmp_path / "out" / "split.csv").read_bytes()).hexdigest() == digest


def test_cropped_cells_are_divided_by_cluster_image(raw_data, tmp_path):
    table, _, _ = division.divide_dataset(raw_data / "sipakmed", tmp_path / "a", cropped=True, progress=False)
    rows = pd.read_csv(tmp_path / "a" / "split.csv", dtype=str)
    assert list(rows.columns) == ["file", "class", "split", "group"]
    cells = sorted(p.relative_to(raw_data / "sipakmed").as_posix()
                   for p in (raw_data / "sipakmed").glob("im_*/im_*/CROPPED/*.bmp"))
    assert sorted(rows["file"]) == cells  # every cell placed, once
    assert (rows.groupby(["class", "group"])["split"].nunique() == 1).all()  # no cluster image in two splits
    assert (rows["group"] == rows["file"].str.extract(r"/(\d+)_\d+\.bmp$")[0]).all()
    # 20 cluster images per class, split 12/4/4 by the original's rule applied to cluster images
    assert table.loc["total", ["train_groups", "val_groups", "test_groups"]].tolist() == [60, 20, 20]
    assert table.loc["total", ["train", "val", "test"]].sum() == len(cells)
    division.divide_dataset(raw_data / "sipakmed", tmp_path / "b", cropped=True, progress=False)
    assert (tmp_path / "a" / "split.csv").read_bytes() == (tmp_path / "b" / "split.csv").read_bytes()
    division.divide_dataset(raw_data / "sipakmed", tmp_path / "c", cropped=True, random_state=1, progress=False)
    assert (tmp_path / "a" / "split.csv").read_bytes() != (tmp_path / "c" / "split.csv").read_bytes()


def test_the_command_line_names_the_grouping_and_refuses_unnamed_cells(raw_data, tmp_path):
    result = run_script("implementation_DatasetDivision.py", "--path-dir", raw_data / "sipakmed", "--output-dir",
                        tmp_path / "out", "--cropped")
    assert result.returncode == 0 and "Divided by cluster image" in result.stdout and "test_groups" in result.stdout
    stray = next((raw_data / "sipakmed").glob("im_*/im_*/CROPPED")) / "extra.bmp"
    try:
        stray.write_bytes(b"")
        refused = run_script("implementation_DatasetDivision.py", "--path-dir", raw_data / "sipakmed",
                             "--output-dir", tmp_path / "other", "--cropped")
    finally:
        stray.unlink()
    assert refused.returncode == 2 and "cannot tell which cluster image" in refused.stderr
    assert "--no-group-cells" in refused.stderr


def test_recipes_name_their_ingredients():
    assert data.recipe_settings("original") == dict(data.RECIPES["original"])
    without_mixup = data.recipe_settings("modern-mixup")
    assert without_mixup["mixup"] == 0 and without_mixup["label_smoothing"] == data.RECIPES["modern"]["label_smoothing"]
    for wrong in ("fancy", "original-mixup", "modern-nothing"):
        with pytest.raises(papfiles.UserError, match="is unknown"):
            data.recipe_settings(wrong)
    augment = {r: {f.func.__name__: f.keywords for f in data.pap_transforms(64, r)[1][0].aff_fs}
               for r in ("original", "modern")}
    assert augment["original"]["zoom_mat"]["max_zoom"] == 1.1 and augment["original"]["rotate_mat"]["max_deg"] == 10
    assert "flip_mat" in augment["original"] and "dihedral_mat" in augment["modern"]  # vertical flips too
    assert augment["modern"]["zoom_mat"]["max_zoom"] == data.RECIPES["modern"]["max_zoom"]
    assert augment["modern"]["rotate_mat"]["max_deg"] == data.RECIPES["modern"]["max_rotate"]


def test_modern_recipe_trains_with_its_loss_schedule_and_mixup(formatted, tmp_path, monkeypatch):
    fits = []
    real_fit = Learner.fit_flat_cos

    def spy(self, n_epoch, lr, cbs=None, **kwargs):
        fits.append((n_epoch, lr, cbs))
        return real_fit(self, n_epoch, lr, cbs=cbs, **kwargs)

    monkeypatch.setattr(Learner, "fit_flat_cos", spy)
    path = tmp_path / "herlev"
    shutil.copytree(formatted / "herlev", path)
    result = train(path, onnx=False, save_loc="modern", epochs=2, batch_size=8, image_size=32,
                               pretrained=False,
                           workers=0, recipe="modern")
    learn = result["learner"]
    assert isinstance(learn.loss_func, LabelSmoothingCrossEntropyFlat) and learn.loss_func.eps == 0.1
    assert learn.wd == data.RECIPES["modern"]["wd"]
    (epochs, lr, cbs), = fits
    assert epochs == 2 and lr == data.RECIPES["modern"]["lr"]
    alpha = data.RECIPES["modern"]["mixup"]
    assert [float(cb.distrib.concentration1) for cb in cbs if isinstance(cb, MixUp)] == [pytest.approx(alpha)]
    assert len(pd.read_csv(path / "models" / "modern_log.csv")) == 2
    original = train(path, onnx=False, save_loc="plain", epochs=1, batch_size=8, image_size=32,
                                 pretrained=False,
                             workers=0)["learner"]
    assert isinstance(original.loss_func, CrossEntropyLossFlat) and len(fits) == 1  # one-cycle, no MixUp


def test_accuracy_benchmark_summary_is_the_mean_of_its_runs(formatted, tmp_path):
    path = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    args = ["--path-folder", path, "--recipes", "original", "--balances", "sampler", "--monitors",
            "balanced_accuracy", "--seeds", 0, 1, "--epochs", 1, "--batch-size", 8, "--image-size", 32, "--workers", 0,
            "--out", tmp_path / "acc"]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), *map(str, args)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = pd.read_csv(tmp_path / "acc" / "runs.csv")
    summary = pd.read_csv(tmp_path / "acc" / "summary.csv", index_col="setup")
    setup = "original balance=sampler monitor=balanced_accuracy"
    assert runs.groupby("setup").size().to_dict() == {setup: 2}
    assert "balance sampler" in result.stdout and "kept epoch: best balanced_accuracy" in result.stdout
    for setup, group in runs.groupby("setup"):
        for score in ("accuracy", "accuracy_tta", "balanced_accuracy", "macro_f1", "macro_f1_tta"):
            assert summary.loc[setup, f"{score}_mean"] == pytest.approx(group[score].mean())
            assert summary.loc[setup, f"{score}_std"] == pytest.approx(group[score].std(ddof=1), nan_ok=True)
    assert (tmp_path / "acc" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert f"{100 * summary.loc[setup, 'accuracy_mean']:.1f} ±" in result.stdout
