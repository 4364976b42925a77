"""The decoded-image cache and the device-dependent speed settings of TTLR50."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, tree_digest
from papsmear import data, learner, presize


@pytest.fixture
def dataset(formatted, tmp_path):
    return shutil.copytree(formatted / "sipakmed", tmp_path / "sipakmed")


def cache_files(root):
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*.png")}


def sources(dataset):
    return {k: v for k, v in tree_digest(dataset).items() if k.split("/")[0] in ("train", "val", "test")}


def test_cache_is_built_once_resized_and_reused(dataset):
    before = sources(dataset)
    root = presize.build_cache(dataset, 40, progress=False)
    assert root == dataset / "cache" / "40px"
    built = cache_files(root)
    assert sorted(built) == sorted(f"{k}.png" for k in before if not k.startswith("test/"))
    with Image.open(root / "train" / "Parabasal" / next(iter(os.listdir(root / "train" / "Parabasal")))) as image:
        assert min(image.size) == 40 and image.size == (53, 40)  # 160x120 keeps its 4:3 shape
    assert presize.build_cache(dataset, 40, progress=False) == root
    assert cache_files(root) == built
    assert sources(dataset) == before  # the source images are only read


def test_a_changed_source_is_redone_and_a_removed_one_dropped(dataset):
    root = presize.build_cache(dataset, 40, progress=False)
    built = cache_files(root)
    changed, removed = sorted((dataset / "train" / "Parabasal").iterdir())[:2]
    Image.new("RGB", (160, 120), (255, 0, 0)).save(changed)
    removed.unlink()
    presize.build_cache(dataset, 40, progress=False)
    now = cache_files(root)
    key = f"train/Parabasal/{changed.name}.png"
    assert now[key] != built[key]
    assert np.asarray(Image.open(root / key))[20, 20].tolist() == [255, 0, 0]
    assert f"train/Parabasal/{removed.name}.png" not in now
    assert {k: v for k, v in now.items() if k != key} == {
        k: v for k, v in built.items() if k not in (key, f"train/Parabasal/{removed.name}.png")}
    manifest = json.loads((root / "manifest.json").read_text())["images"]
    assert len(manifest) == len(now) and f"train/Parabasal/{removed.name}" not in manifest


def test_two_runs_building_at_once_leave_one_complete_cache(dataset):
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from papsmear import presize; "
            f"presize.build_cache({str(dataset)!r}, 36)")
    runs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [run.wait() for run in runs] == [0, 0]
    root = dataset / "cache" / "36px"
    assert len(cache_files(root)) == 80 == len(json.loads((root / "manifest.json").read_text())["images"])
    assert not list(root.rglob("*.partial"))
    for path in root.rglob("*.png"):
        with Image.open(path) as image:
            image.load()


def test_cache_and_plain_path_give_the_same_validation_batch(dataset):
    batches = {}
    for cache_size in (None, 37):
        dls = data.pap_dls(dataset, image_size=32, batch_size=20, workers=0, cache_size=cache_size,
                             memory_budget=0)
        images, labels = dls.valid.one_batch()
        names = [f"{p.parent.name}/{p.name.removesuffix('.png')}" for p in dls.valid.items]
        batches[cache_size] = {n: (x, y) for n, x, y in zip(names, images, labels, strict=True)}
    assert batches[None].keys() == batches[37].keys() and len(batches[None]) == 20
    for name, (plain, label) in batches[None].items():
        cached, cached_label = batches[37][name]
        assert label == cached_label
        # Two bilinear resizes instead of one: equal up to rounding (normalised units, 1/255 ≈ 0.017).
        assert (plain - cached).abs().mean() < 0.06


@pytest.mark.parametrize("device, bf16, workers, expected", [
    ("cpu", False, None, dict(amp=None, channels_last=False, workers=0, pin_memory=False, persistent_workers=False)),
    ("cpu", False, 2, dict(amp=None, channels_last=False, workers=2, pin_memory=False, persistent_workers=True)),
    ("cuda", True, 8, dict(amp="bf16", channels_last=True, workers=8, pin_memory=True, persistent_workers=True)),
    ("cuda", False, 8, dict(amp="fp16", channels_last=True, workers=8, pin_memory=True, persistent_workers=True)),
    ("cuda", True, 0, dict(amp="bf16", channels_last=True, workers=0, pin_memory=True, persistent_workers=False)),
    ("cuda", True, None, dict(amp="bf16", channels_last=True, workers=len(os.sched_getaffinity(0)), pin_memory=True,
                              persistent_workers=True)),
])
def test_mixed_precision_and_channels_last_only_on_cuda(device, bf16, workers, expected):
    assert data.speed_settings(device, bf16, workers) == expected


def test_this_machine_trains_in_float32_without_amp_callbacks(formatted):
    dls = data.pap_dls(formatted / "sipakmed", image_size=32, workers=0)
    learn = learner.pap_learner(dls)
    if torch.cuda.is_available():
        assert hasattr(learn, "mixed_precision") and hasattr(learn, "channels_last")
    else:
        assert not hasattr(learn, "mixed_precision") and not hasattr(learn, "channels_last")
        assert data.current_speed_settings()["workers"] == 0
