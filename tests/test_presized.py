"""The in-memory path (presized images held in memory, batches cut by indexing), its memory budget, the
parallel cache build, and per-image parallel decoding for prediction."""
import shutil

import numpy as np
import pytest
import torch
from fastai.data.core import TfmdDL
from fastai.learner import load_learner
from PIL import Image

from conftest import IMAGE_SIZE, tree_digest
from papsmear import data, learner, predict, presize
from papsmear import files as papfiles

GB = 2 ** 30


@pytest.fixture
def dataset(formatted, tmp_path):
    return shutil.copytree(formatted / "sipakmed", tmp_path / "sipakmed")


def both_paths(path, image_size=32, batch_size=20):
    "(in-memory, file) DataLoaders of the same dataset with the same settings."
    return (data.pap_dls(path, image_size, batch_size, workers=0),
            data.pap_dls(path, image_size, batch_size, workers=0, memory_budget=0))


def test_memory_and_file_paths_give_the_same_validation_batches(dataset):
    memory, files = both_paths(dataset)
    assert isinstance(memory.train, presize.PresizedDL) and isinstance(memory.valid, presize.PresizedDL)
    assert type(files.train) is TfmdDL and type(files.valid) is TfmdDL
    assert list(memory.valid.items) == list(files.valid.items) and list(memory.vocab) == list(files.vocab)
    for dl_memory, dl_files in zip(memory.loaders, files.loaders, strict=True):
        assert len(dl_memory) == len(dl_files) and dl_memory.bs == dl_files.bs
    (x_memory, y_memory), (x_files, y_files) = memory.valid.one_batch(), files.valid.one_batch()
    assert type(x_memory) is type(x_files) and x_memory.dtype == x_files.dtype == torch.float32
    assert x_memory.shape == x_files.shape == (20, 3, 32, 32) and torch.equal(y_memory, y_files)
    assert type(y_memory) is type(y_files)
    # Resize-then-crop against crop-then-resize: the same images up to resampling (normalised units).
    assert (x_memory - x_files).abs().mean() < 0.06
    assert x_memory.mean(dim=(0, 2, 3)) == pytest.approx(x_files.mean(dim=(0, 2, 3)), abs=0.02)
    assert x_memory.std(dim=(0, 2, 3)) == pytest.approx(x_files.std(dim=(0, 2, 3)), abs=0.02)


def cached_pixels(dataset, item, side):
    "The cache's presized copy of `item`, as numpy HxWx3."
    with Image.open(dataset / "cache" / f"{side}px" / f"{item.relative_to(dataset).as_posix()}.png") as image:
        return np.asarray(image.convert("RGB"))


def test_batches_are_windows_of_the_presized_images_centred_for_validation(dataset):
    memory, _ = both_paths(dataset, image_size=40)
    store = memory.valid.store
    crops = presize.crop_batch(store, presize.store_index(store, range(len(memory.valid_ds))), 40,
                                 random_position=False)
    for i, item in enumerate(memory.valid.items):
        image = cached_pixels(dataset, item, 40)
        h, w = image.shape[:2]
        top, left = int(0.5 * (h - 40)), int(0.5 * (w - 40))  # fastai Resize's validation rule
        assert np.array_equal(crops[i].permute(1, 2, 0).numpy(), image[top:top + 40, left:left + 40])
    torch.manual_seed(0)
    store = memory.train.store
    crops = presize.crop_batch(store, presize.store_index(store, range(len(memory.train_ds))), 40,
                                random_position=True)
    offsets = []
    for i, item in enumerate(memory.train.items):
        image = cached_pixels(dataset, item, 40)
        windows = [x for x in range(image.shape[1] - 40 + 1)
                   if np.array_equal(crops[i].permute(1, 2, 0).numpy(), image[:40, x:x + 40])]
        assert windows, f"training crop {i} is no window of its image"
        offsets.append(windows[0])
    assert len(set(offsets)) > 5  # positions vary along the longer side (160x120 → 53x40: 14 positions)


def test_same_weights_give_the_same_validation_predictions_on_both_paths(trained):
    path, result = trained
    predictions = []
    for dls in both_paths(path, image_size=IMAGE_SIZE, batch_size=16):
        learn = learner.pap_learner(dls, path=path)
        learner.load_weights(learn, result["weights"])
        with learn.no_bar():
            predictions.append(learn.get_preds(dl=dls.valid)[0])
    memory, files = predictions
    assert memory.shape == files.shape
    assert (memory.argmax(1) == files.argmax(1)).float().mean() >= 0.9
    assert (memory - files).abs().mean() < 0.05


def test_a_model_trained_in_memory_exports_an_ordinary_file_learner(trained):
    path, result = trained
    assert isinstance(result["learner"].dls.train, presize.PresizedDL)  # the fixture trained in memory
    assert b"presized" not in result["export"].read_bytes()  # the export holds no reference to this module
    learn = load_learner(result["export"])
    assert type(learn.dls.train) is TfmdDL and type(learn.dls.valid) is TfmdDL
    dl = result["learner"].dls.test_dl(sorted((path / "test").rglob("*.*"))[:4])
    assert type(dl) is TfmdDL and dl.one_batch()[0].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("nbytes, budget, device, gpu, ram, expected", [
    (1 * GB, None, "cpu", None, 8 * GB, "cpu"),           # a quarter of the free RAM by default
    (3 * GB, None, "cpu", None, 8 * GB, None),
    (3 * GB, 4, "cpu", None, 8 * GB, "cpu"),               # a budget given in GB
    (5 * GB, 4, "cpu", None, 64 * GB, None),
    (10 * GB, None, "cuda", 80 * GB, 64 * GB, "cuda"),     # a quarter of the GPU by default
    (30 * GB, None, "cuda", 80 * GB, 64 * GB, "pinned"),   # over the GPU budget: pinned RAM
    (2 * GB, 1, "cuda", 80 * GB, 64 * GB, "pinned"),
    (40 * GB, None, "cuda", 80 * GB, 64 * GB, None),       # over half the free RAM too: files
])
def test_memory_placement_follows_the_budget(nbytes, budget, device, gpu, ram, expected):
    assert presize.memory_placement(nbytes, budget, device, gpu_memory=gpu, ram=ram) == expected


def test_over_the_budget_or_turned_off_training_reads_the_files(dataset, capsys):
    files = presize.split_images(dataset)
    need = presize.presized_bytes(files, 32)
    assert need == sum(3 * w * h for w, h in (presize.presized_shape(*Image.open(f).size, 32) for f in files))
    assert presize.presized_placement(files, 32, need / GB, "cpu") == "cpu"
    for budget in (0.99 * need / GB, 0):
        assert presize.presized_placement(files, 32, budget, "cpu") is None
        dls = data.pap_dls(dataset, 32, 20, workers=0, memory_budget=budget)
        assert type(dls.train) is TfmdDL and "decoded from their files every epoch" in capsys.readouterr().out
    assert not list((dataset / "cache").glob("*px"))  # nothing presized when nothing is held
    dls = data.pap_dls(dataset, 32, 20, workers=0, memory_budget=need / GB)
    held = sum(dl.store["pixels"].numel() for dl in dls.loaders)
    assert held == need and "held in memory (0.000 GB in RAM)" in capsys.readouterr().out
    with pytest.raises(papfiles.UserError, match="memory_budget"):
        data.pap_dls(dataset, 32, 20, workers=0, memory_budget=-1)


def test_the_cache_is_the_same_built_by_one_thread_or_many(dataset):
    one = presize.build_cache(dataset, 36, progress=False, workers=1)
    built_by_one = tree_digest(one)
    shutil.rmtree(dataset / "cache")
    many = presize.build_cache(dataset, 36, progress=False, workers=4)
    assert tree_digest(many) == built_by_one and len(built_by_one) == 82  # 80 images, manifest, lock


def test_batched_prediction_is_independent_of_the_batch_size(trained):
    path, result = trained
    learn, _ = predict.load_classifier(result["export"], [])
    files = sorted((path / "test").rglob("*.*"))
    by_batch = {bs: predict.predict_files(learn, files, bs) for bs in (16, 64)}
    assert np.array_equal(by_batch[16].argmax(1), by_batch[64].argmax(1))
    assert np.allclose(by_batch[16], by_batch[64], atol=1e-5)
    dl = predict.prediction_dl(learn, files, 16)
    assert isinstance(dl, presize.ParallelDecodeDL) and dl.decoders == papfiles.available_cpus()
    with learn.no_bar():
        serial = learn.get_preds(dl=learn.dls.test_dl(files, bs=16, num_workers=0))[0].numpy()
    assert np.allclose(by_batch[16], serial, atol=1e-5)  # the same item pipeline, only decoded in parallel
