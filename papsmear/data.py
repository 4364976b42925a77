"""Data: training recipes, transforms, and the data loaders of training and of prediction.

Training data is held in memory when it fits, else read from the cache or the files; every script builds its
loaders here, the same way.
"""
import sys
from pathlib import Path

import fastai.callback.progress
import torch
from fastai.data.core import DataLoaders, Datasets
from fastai.torch_core import default_device, set_seed
from fastai.vision.all import (
    ImageDataLoaders,
    IntToFloatTensor,
    Normalize,
    PILImage,
    Resize,
    ToTensor,
    aug_transforms,
    imagenet_stats,
)
from fastprogress.fastprogress import ConsoleMasterBar, ConsoleProgressBar, MasterBar, ProgressBar
from PIL import Image

from papsmear.balance import balanced_loader, check_balance, class_counts
from papsmear.files import (
    IMAGE_ERRORS,
    UserError,
    available_cpus,
    check_not_negative,
    check_positive,
    class_names,
    unreadable_images,
    user_path,
)
from papsmear.launch import is_main_process, join_launcher, rank0_first_or_fail
from papsmear.leaks import check_leaks
from papsmear.presize import build_cache, describe_stores, presized_loader, presized_placement, split_images

IMAGE_SIZE = 224  # training image side in pixels, unless a script says otherwise


class LogProgressBar(ConsoleProgressBar):
    """fastprogress's console bar for output that is not a terminal (a file, a CI log): one line at every tenth
    of the batches instead of carriage-return redraws."""
    def __init__(self, gen, total=None, display=True, leave=True, parent=None, master=None, txt_len=60):
        self.printed = -1  # the last tenth of the work printed
        self.prefix = ""
        ProgressBar.__init__(self, gen, total, display, leave, parent, master)

    def on_update(self, val, text):
        "Print a line when the work has reached a new tenth, and at its end."
        tenth = 10 if not self.total else val * 10 // self.total
        if self.display and tenth > self.printed:
            self.printed = tenth
            print(f"{self.prefix} {text}".strip(), flush=True)

    def on_iter_end(self):
        "End without the console bar's clearing redraw."
        ProgressBar.on_iter_end(self)


class LogMasterBar(ConsoleMasterBar):
    "fastprogress's console master bar (the epochs of a fit) over `LogProgressBar`s."
    def __init__(self, gen, total=None, hide_graph=False, order=None, clean_on_interrupt=False, total_time=False):
        MasterBar.__init__(self, gen, LogProgressBar, total)
        self.total_time = total_time


# fastai's training and prediction bars print lines when the output is not a terminal.
if not sys.stdout.isatty():
    fastai.callback.progress.progress_bar = LogProgressBar
    fastai.callback.progress.master_bar = LogMasterBar


# Training recipes. `original`: the original's hyper-parameters and fastai's default augmentation.
# `modern`: fastai's practice for training on little data from scratch, each ingredient a fastai transform,
# loss or callback; chosen by benchmarks/accuracy.py on real Herlev cells (README, "Training recipes").
RECIPES = {
    "original": dict(epochs=50, batch_size=10, lr=1e-3, max_zoom=1.1, flip_vert=False, max_rotate=10.0,
                     label_smoothing=0.0, mixup=0.0, schedule="one_cycle", wd=None),
    "modern": dict(epochs=100, batch_size=32, lr=3e-3, max_zoom=1.6, flip_vert=True, max_rotate=180.0,
                   label_smoothing=0.1, mixup=0.4, schedule="flat_cos", wd=0.05),
}

# The settings each ingredient of `modern` changes; "modern-<ingredient>" keeps the original's instead.
INGREDIENTS = {"zoom": ["max_zoom"], "rotation": ["flip_vert", "max_rotate"], "smoothing": ["label_smoothing"],
               "mixup": ["mixup"], "schedule": ["schedule"], "wd": ["wd"],
               "long": ["epochs", "batch_size", "lr"]}


def recipe_settings(recipe="original"):
    """The settings of a recipe: `original`, `modern`, or `modern-<ingredient>` (modern without one
    ingredient, for ablations: zoom, rotation, smoothing, mixup, schedule, wd, long)."""
    base, dash, without = recipe.partition("-")
    if base not in RECIPES or ((dash or without) and (base != "modern" or without not in INGREDIENTS)):
        raise UserError(f"recipe {recipe!r} is unknown — use original, modern, or modern-<ingredient> with an "
                        f"ingredient from {', '.join(INGREDIENTS)}")
    settings = dict(RECIPES[base])
    for key in INGREDIENTS.get(without, []):
        settings[key] = RECIPES["original"][key]
    return settings


def speed_settings(device_type, bf16_supported=False, workers=None):
    """How to run on a device type. CUDA: mixed precision (bf16 where supported, else fp16), channels-last,
    one loader worker per core, pinned memory. CPU: float32, and by default no loader workers, since the
    model's own threads already use every core (on 2 cores workers made training slower, with or without
    the cache: benchmarks/train_throughput.py). Workers, when there are any, persist across epochs."""
    cuda = device_type == "cuda"
    workers = (available_cpus() if cuda else 0) if workers is None else workers
    return dict(amp=("bf16" if bf16_supported else "fp16") if cuda else None, channels_last=cuda,
                workers=workers, pin_memory=cuda, persistent_workers=workers > 0)


def current_speed_settings(workers=None):
    "`speed_settings` for the device fastai trains on here."
    device = default_device()
    return speed_settings(device.type, device.type == "cuda" and torch.cuda.is_bf16_supported(), workers)


def check_formatted(path_folder, n_classes=None):
    """Refuse a dataset folder without train/ and val/ class folders holding images, with a validation class
    that has no training image, or with another number of classes (counting folders that hold images)."""
    path_folder = Path(path_folder)
    for split in ("train", "val"):
        if not (path_folder / split).is_dir() or not class_names(path_folder / split):
            raise UserError(f"{path_folder} has no {split}/<class> folders with images — set it to a folder made by "
                            "implementation_DatasetDivision.py")
    found = class_names(path_folder / "train")
    untrained = sorted(set(class_names(path_folder / "val")) - set(found))
    if untrained:
        raise UserError(f"{path_folder / 'val'} has class(es) {', '.join(untrained)} with no image in "
                        f"{path_folder / 'train'} — a class must have training images to be learnt")
    if n_classes is not None and len(found) != n_classes:
        raise UserError(f"{path_folder} has {len(found)} classes with images ({', '.join(found)}) but "
                        f"{n_classes} were expected")
    return found


def pap_transforms(image_size, recipe="original"):
    """Item and batch transforms shared by training and prediction: resize, augment (training only: the
    recipe's zoom, flips and rotation), normalise. Validation and prediction are the same for every recipe."""
    settings = recipe_settings(recipe)
    augment = aug_transforms(max_zoom=settings["max_zoom"], flip_vert=settings["flip_vert"],
                             max_rotate=settings["max_rotate"])
    return [Resize(image_size)], [*augment, Normalize.from_stats(*imagenet_stats)]


def check_batch_size(**batch_sizes):
    "Refuse a batch of one image: BatchNorm cannot normalise a single image in training."
    for name, value in batch_sizes.items():
        if value == 1:
            raise UserError(f"{name} is 1; training needs at least 2 images per batch (BatchNorm normalises over "
                            f"the batch) — set --{name.replace('_', '-')} 2 or more")


def broken_images_error(files):
    """The user error naming the images of `files` that cannot be decoded, raised when decoding failed while
    reading them; re-raises the error at hand when every image can be decoded (it was not theirs)."""
    broken = unreadable_images(files)
    if not broken:
        raise  # noqa: PLE0704  called from an except block: the error being handled is not an image's
    file, reason = next(iter(broken.items()))
    return UserError(f"{len(broken)} image(s) cannot be read, e.g. {file} ({reason}) — remove or replace them, "
                     "then run again")


def pap_dls(path_folder, image_size=IMAGE_SIZE, batch_size=10, seed=42, workers=None, cache_size=None,
            recipe="original", memory_budget=None, balance="none"):
    """DataLoaders over path_folder/train and path_folder/val (class sub-folders), built the same way for
    every script. The images are presized once and held in memory when they fit `memory_budget` (GB; None:
    automatic, 0: never; see `presize.memory_placement`); otherwise each epoch decodes the image files, or
    with `cache_size` the decoded-image cache. Refuses a batch larger than the training set, which would
    train no step at all, and a dataset whose splits share images (`papsmear.leaks.check_leaks`); the leak
    check's line is kept as `dls.leak_check`. With `balance` "sampler" the training loader draws each class
    equally often (`papsmear.balance.balanced_loader`)."""
    check_balance(balance)
    check_positive(image_size=image_size, batch_size=batch_size, cache_size=cache_size)
    check_batch_size(batch_size=batch_size)
    check_not_negative(workers=workers, memory_budget=memory_budget)
    path_folder = user_path(path_folder)
    check_formatted(path_folder)
    join_launcher()
    # Under a launcher, rank 0 hashes and remembers the files while the others wait, then they only read.
    leak_check = rank0_first_or_fail(check_leaks, path_folder, progress=is_main_process())
    if is_main_process():
        print(leak_check)
    settings = current_speed_settings(workers)
    item_tfms, batch_tfms = pap_transforms(image_size, recipe)

    def folder_dls(source):
        set_seed(seed, reproducible=True)
        return ImageDataLoaders.from_folder(source, train="train", valid="val", item_tfms=item_tfms,
                                            batch_tfms=batch_tfms, bs=batch_size, num_workers=settings["workers"],
                                            pin_memory=settings["pin_memory"],
                                            persistent_workers=settings["persistent_workers"])
    try:  # fastai opens the first training image while it builds the loaders
        dls = folder_dls(path_folder)
    except IMAGE_ERRORS:
        raise broken_images_error(split_images(path_folder)) from None
    if batch_size > len(dls.train_ds):
        raise UserError(f"batch_size {batch_size} is larger than the training set of {path_folder} "
                        f"({len(dls.train_ds)} images), so no training step would run — lower --batch-size")
    files = [*dls.train_ds.items, *dls.valid_ds.items]
    placement = presized_placement(files, image_size, memory_budget=memory_budget, device_type=default_device().type)
    # Under a launcher, rank 0 builds a cache while the others wait, then they only read it.
    if placement:
        presized_root = rank0_first_or_fail(build_cache, path_folder, image_size, files=files)
        dls = DataLoaders(*(presized_loader(dl, presized_root, path_folder=path_folder, placement=placement)
                            for dl in dls.loaders),
                          path=dls.path, device=dls.device)
    elif cache_size:
        dls = folder_dls(rank0_first_or_fail(build_cache, path_folder, cache_size, files=files))
    if balance == "sampler":
        dls = DataLoaders(balanced_loader(dls.train, class_counts(dls)), *dls.loaders[1:], path=dls.path,
                          device=dls.device)
    if is_main_process():
        print(f"data: {len(dls.train_ds)} train / {len(dls.valid_ds)} val images, "
              + (f"presized to {image_size} px and held in memory ({describe_stores(dls.loaders)})"
                 if placement else f"decoded from {'the cache' if cache_size else 'their files'} every epoch")
              + ("; each class drawn equally often" if balance == "sampler" else ""))
    dls.leak_check = leak_check
    return dls


def inference_dls(files, image_size=IMAGE_SIZE, batch_size=64):
    """DataLoaders that only read and transform `files` (no labels), as `pap_dls` does for validation. Without
    files (a model loaded before its images are known) a blank image in memory stands in: the loaders' only use
    then is to build the learner, whose predictions come from `test_dl`."""
    files = list(files) or [Image.new("RGB", (image_size, image_size), (255, 255, 255))]
    item_tfms, batch_tfms = pap_transforms(image_size)
    datasets = Datasets(files, [[PILImage.create]], splits=[[0], list(range(len(files)))])
    return datasets.dataloaders(bs=batch_size, num_workers=0, after_item=[*item_tfms, ToTensor()],
                                after_batch=[IntToFloatTensor(), *batch_tfms])
