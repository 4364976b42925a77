"""Shared helpers of the ResNet50 scripts: data loaders, learner building, head swap, weight loading across
heads, one Triple Transfer Learning stage, and training on several processes (fastai's `distrib_ctx`,
launched by `accelerate launch`). File rules and user errors come from papfiles.py below it.

R50.py, R50Herlev.py and Inference_FastAI.py build their data and models only through this module.
The final TTL stage's defaults (its `save_loc` among them) are set here, once.
"""
import json
import os
import shutil
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.error import URLError

import matplotlib
matplotlib.use("Agg")  # scripts run on headless machines; every figure goes to a PNG file
import matplotlib.pyplot as plt
import pandas as pd
import torch
# fastai 2.8 still calls torch.jit.script at import, which this torch announces as deprecated on every run.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
from fastai.callback.all import CSVLogger, MixUp, SaveModelCallback
from fastai.distributed import DistributedDL, rank0_first
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import AccumMetric, accuracy, skm_to_fastai
from fastai.torch_core import default_device, distrib_barrier, init_default, num_distrib, rank_distrib, set_seed
from fastcore.basics import patch
from fastai.vision.all import (DataLoaders, Datasets, ImageDataLoaders, IntToFloatTensor, Normalize, PILImage,
                               Resize, ToTensor, aug_transforms, create_body, imagenet_stats, model_meta,
                               vision_learner)
from sklearn.metrics import f1_score, fbeta_score
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

from papfiles import (IMAGE_ERRORS, SPLITS, UserError, atomic_output, available_cpus,  # noqa: F401
                      check_file_name, check_not_negative, check_positive, class_names, is_sample_image,
                      remove_partials, sample_images, unreadable_images, user_errors, user_path)
from presized import (build_cache, describe_stores, parallel_decode, presized_loader,  # noqa: F401
                      presized_placement, split_images)
from leakcheck import check_leaks

# --- the final TTL stage's defaults (R50Herlev.py overrides them from its top or the command line) ------
save_loc = "resnet50_ttl_sipakmed"   # final model: sipakmed_path/models/<save_loc>.pth and .pkl
epochs = 50                          # one-cycle epochs of the SIPaKMeD stage
batch_size = 10
lr = 1e-3                            # maximum one-cycle learning rate
image_size = 224                     # training image side in pixels
# ---------------------------------------------------------------------------------------------------

DOWNLOAD_TIMEOUT = 60  # seconds without an answer before the ImageNet download counts as offline

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


def pap_dls(path_folder, image_size=image_size, batch_size=batch_size, seed=42, workers=None, cache_size=None,
            recipe="original", memory_budget=None):
    """DataLoaders over path_folder/train and path_folder/val (class sub-folders), built the same way for
    every script. The images are presized once and held in memory when they fit `memory_budget` (GB; None:
    automatic, 0: never; see `presized.memory_placement`); otherwise each epoch decodes the image files, or
    with `cache_size` the decoded-image cache. Refuses a batch larger than the training set, which would
    train no step at all, and a dataset whose splits share images (`leakcheck.check_leaks`); the leak
    check's line is kept as `dls.leak_check`."""
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
    placement = presized_placement(files, image_size, memory_budget, default_device().type)
    # Under a launcher, rank 0 builds a cache while the others wait, then they only read it.
    if placement:
        presized_root = rank0_first_or_fail(build_cache, path_folder, image_size, files=files)
        dls = DataLoaders(*(presized_loader(dl, presized_root, path_folder, placement) for dl in dls.loaders),
                          path=dls.path, device=dls.device)
    elif cache_size:
        dls = folder_dls(rank0_first_or_fail(build_cache, path_folder, cache_size, files=files))
    if is_main_process():
        print(f"data: {len(dls.train_ds)} train / {len(dls.valid_ds)} val images, "
              + (f"presized to {image_size} px and held in memory ({describe_stores(dls.loaders)})"
                 if placement else f"decoded from {'the cache' if cache_size else 'their files'} every epoch"))
    dls.leak_check = leak_check
    return dls


def inference_dls(files, image_size=image_size, batch_size=64):
    "DataLoaders that only read and transform `files` (no labels), as `pap_dls` does for validation."
    item_tfms, batch_tfms = pap_transforms(image_size)
    datasets = Datasets(files, [[PILImage.create]], splits=[[0], list(range(len(files)))])
    return datasets.dataloaders(bs=batch_size, num_workers=0, after_item=[*item_tfms, ToTensor()],
                                after_batch=[IntToFloatTensor(), *batch_tfms])


def prediction_dl(learn, files, batch_size=64):
    """A loader of `files` for `learn`'s predictions, transformed as its validation images, each image decoded
    by its own worker task (`presized.ParallelDecodeDL`), so every core works whatever the batch size."""
    return parallel_decode(learn.dls.test_dl(files, bs=batch_size, num_workers=0))


def pap_metrics():
    """Accuracy, weighted F-beta with beta=2 (what the original's fastai-v1 `FBeta(average='weighted')`
    computed) and weighted F1. All three gather every process's predictions before computing, so that on
    several processes they score the whole validation set, as on one."""
    return [AccumMetric(accuracy, flatten=False, name="accuracy"),
            skm_to_fastai(fbeta_score, beta=2, average="weighted", name="f2_weighted"),
            skm_to_fastai(f1_score, average="weighted", name="f1_weighted")]


def rank0_first_or_fail(func, *args, **kwargs):
    """fastai's `rank0_first` (process 0 runs `func` while the others wait, then they run it, reading what it
    wrote) where a `UserError` of process 0 stops every process: process 0 raises it after the wait, and the
    others meet it again, since they check the same files. Without a launcher: `func` once."""
    def caught():
        try:
            return func(*args, **kwargs), None
        except UserError as e:
            return None, e
    result, error = rank0_first(caught)
    if error:
        raise error
    return result


def is_main_process():
    "True in the one process that writes files and prints: rank 0 under a launcher, the only one otherwise."
    return rank_distrib() == 0


def join_launcher():
    """Under a launcher (`accelerate launch`, several processes), put this process on its own GPU before
    any data or model is made; nothing to do in a single process or on CPU."""
    if num_distrib() > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


@patch
def _broadcast(self: DistributedDL, t, rank):
    "Broadcast the batch order from `rank` on the process group's own device (fastai's always uses CUDA)."
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor(t, dtype=torch.long, device=device)
    torch.distributed.broadcast(t, rank)
    return t.cpu().tolist()


def describe_batches(batch_size, lr):
    """How a run splits its batches, for the log: under a launcher each of N processes takes `batch_size`
    images per step (fastai's distributed data loader), so the effective batch is N × batch_size; lr is used
    as given (scale it yourself if you want to keep lr per image)."""
    processes = max(num_distrib(), 1)
    if processes == 1:
        return f"batch size {batch_size}, lr {lr:g}"
    return (f"{processes} processes × batch {batch_size} = effective batch {processes * batch_size}, "
            f"lr {lr:g} as given")


def imagenet_weights():
    "The torchvision ImageNet weights fastai asks for with resnet50, and the file they live in once downloaded."
    weights = ResNet50_Weights.verify(model_meta[resnet50]["weights"])
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


@contextmanager
def socket_timeout(seconds):
    "Give every network connection opened in the block a time limit, so that a silent network cannot hang it."
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def ensure_imagenet_weights():
    "Download the ImageNet weights now (before any training), or say clearly how to do without the network."
    weights, file = imagenet_weights()
    if file.exists():
        return file
    try:
        with socket_timeout(DOWNLOAD_TIMEOUT):
            weights.get_state_dict(progress=True)
    except (URLError, OSError, RuntimeError) as e:
        raise UserError(f"cannot download the ImageNet ResNet50 weights ({e}). Either put {file.name} into "
                        f"{file.parent}, or set pretrained_weights to a local torchvision ResNet50 state-dict "
                        "file, or set pretrained = False (--no-pretrained) to start from random weights") from None
    return file


def load_body_weights(learn, pretrained_weights):
    "Load a torchvision ResNet50 state-dict file strictly into the learner's body."
    try:
        reference = resnet50()
        reference.load_state_dict(torch.load(user_path(pretrained_weights), map_location="cpu", weights_only=True))
    except Exception as e:  # torch.load raises many kinds for a file that is not a checkpoint
        raise UserError(f"pretrained_weights {pretrained_weights} is not a torchvision ResNet50 state dict "
                        f"({type(e).__name__}: {first_line(e)})") from None
    body = create_body(reference, pretrained=True, cut=model_meta[resnet50]["cut"])
    learn.model[0].load_state_dict(body.state_dict())


def pap_learner(dls, pretrained=False, pretrained_weights=None, n_out=None, path=None, recipe="original"):
    """A fastai ResNet50 learner for `dls` with the project's metrics, on the best device, with the recipe's
    loss (label smoothing or not) and weight decay.

    `pretrained` downloads (or reuses) the ImageNet weights; `pretrained_weights` loads a local file
    instead. On CUDA the learner trains in mixed precision and channels-last.
    """
    settings = recipe_settings(recipe)
    if pretrained and not pretrained_weights:
        ensure_imagenet_weights()
    loss = (LabelSmoothingCrossEntropyFlat(eps=settings["label_smoothing"]) if settings["label_smoothing"]
            else CrossEntropyLossFlat())
    # An absolute path: fastai joins it with file names (the CSV log's among them) that may already hold it.
    learn = vision_learner(dls, resnet50, pretrained=pretrained and not pretrained_weights, n_out=n_out,
                           loss_func=loss, metrics=pap_metrics(), wd=settings["wd"],
                           path=None if path is None else user_path(path))
    if pretrained_weights:
        load_body_weights(learn, pretrained_weights)
    settings = current_speed_settings()
    if settings["amp"]:
        learn.to_channelslast(amp_mode=settings["amp"])
    return learn


def head_linear(model):
    "(index, layer) of the last Linear layer of a fastai model's head."
    head = model[1]
    index = max(i for i, layer in enumerate(head) if isinstance(layer, nn.Linear))
    return index, head[index]


def swap_head(learn, n_out):
    """Replace the last Linear of the head by a new one with `n_out` outputs (same inputs, bias setting
    and device), and drop the optimiser so that the next fit creates one that trains the new layer."""
    index, old = head_linear(learn.model)
    new = nn.Linear(old.in_features, n_out, bias=old.bias is not None).to(old.weight.device)
    init_default(new, nn.init.kaiming_normal_)  # fastai's head init: Kaiming-normal weights, zero bias
    learn.model[1][index] = new
    learn.opt = None  # fastai's fit only makes a new optimiser when there is none
    return learn


def first_line(error):
    "The first line of an exception's message (torch's can run over many lines)."
    return (str(error).splitlines() or [""])[0]


def read_weights(path):
    """The model state of a saved `.pth` (fastai `learn.save` format, with or without optimiser state),
    loaded with weights_only: nothing is unpickled. A `.pkl` export or any other file is refused."""
    if Path(path).suffix == ".pkl":
        raise UserError(f"{path} is a fastai export (.pkl); give the weights file (.pth) saved beside it")
    try:
        state = torch.load(user_path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds for a file that is not a checkpoint
        raise UserError(f"cannot read weights {path} ({type(e).__name__}: {first_line(e)}) — give a .pth saved "
                        "by R50.py or R50Herlev.py") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a model checkpoint — give a .pth saved by R50.py or R50Herlev.py")
    return state


def head_classes(state, path):
    "Number of outputs of the head in a model state read from `path`."
    heads = [k for k, v in state.items() if k.startswith("1.") and k.endswith(".weight") and v.ndim == 2]
    if not heads:
        raise UserError(f"{path} holds no fastai ResNet50 head — was it saved by R50.py or R50Herlev.py?")
    return state[max(heads, key=lambda k: int(k.split(".")[1]))].shape[0]


def load_weights(learn, path):
    "Load a `.pth` whose head has as many classes as the learner; otherwise a clear error."
    state = read_weights(path)
    n_saved, n_data = head_classes(state, path), learn.dls.c
    if n_saved != n_data:
        raise UserError(f"{path} has a {n_saved}-class head but the data has {n_data} classes — to start from "
                        "weights trained on other classes use TTLR50.load_weights_across_heads (as R50Herlev.py does)")
    learn.model.load_state_dict(state)
    return learn


def load_weights_across_heads(learn, path, n_out=None):
    """Load a `.pth` saved with any number of classes: set the head to the checkpoint's size, load strictly,
    then swap the head to `n_out` outputs (default: the learner's data classes)."""
    state = read_weights(path)
    n_saved, n_out = head_classes(state, path), n_out or learn.dls.c
    if n_saved != head_linear(learn.model)[1].out_features:
        swap_head(learn, n_saved)
    learn.model.load_state_dict(state)
    if n_saved != n_out:
        swap_head(learn, n_out)
    return learn


def write_class_list(learn, weights, image_size):
    """Write <weights>.json beside a `.pth`: the class names in output order and the image size, so that the
    weights can be used without the export."""
    info = dict(classes=list(map(str, learn.dls.vocab)), image_size=image_size, arch="resnet50")
    with atomic_output(Path(weights).with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(info, indent=2))


def save_figure(fig, png):
    "Write a figure to `png` (through a temporary name, so a kill never leaves half a picture) and close it."
    fig.tight_layout()
    with atomic_output(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return png


def plot_training(log_csv, png):
    "Training curves from fastai's CSV log: losses, and the metrics, per epoch."
    log = pd.read_csv(log_csv)
    fig, (losses, metrics) = plt.subplots(1, 2, figsize=(11, 4))
    log.plot(x="epoch", y=["train_loss", "valid_loss"], ax=losses, marker="o", title="loss")
    log.plot(x="epoch", y=["accuracy", "f2_weighted", "f1_weighted"], ax=metrics, marker="o",
             title="validation metrics", ylim=(0, 1.02))
    return save_figure(fig, png)


def evaluate(learn):
    "Loss and metrics on the validation set and on the training set (not shuffled, no sample dropped)."
    names = ["loss", *[m.name for m in learn.metrics]]
    rows = {"validation": learn.validate(dl=learn.dls.valid),
            "training": learn.validate(dl=learn.dls.train.new(shuffle=False, drop_last=False))}
    return pd.DataFrame({k: dict(zip(names, map(float, v))) for k, v in rows.items()}).T


def export_atomically(learn, export_path):
    "Export the learner through a temporary name, so a kill never leaves a truncated .pkl."
    with atomic_output(export_path) as tmp:
        learn.export(tmp)
    return export_path


def broken_images_error(files):
    """The user error naming the images of `files` that cannot be decoded, raised when decoding failed while
    reading them; re-raises the error at hand when every image can be decoded (it was not theirs)."""
    broken = unreadable_images(files)
    if not broken:
        raise  # noqa: PLE0704  called from an except block: the error being handled is not an image's
    file, reason = next(iter(broken.items()))
    return UserError(f"{len(broken)} image(s) cannot be read, e.g. {file} ({reason}) — remove or replace them, "
                     "then run again")


def fit_recipe(learn, epochs, lr, cbs, recipe="original"):
    """Fit with the recipe's schedule (one-cycle or flat-then-cosine) and MixUp; when an image cannot be
    decoded mid-training, a `UserError` naming the broken files."""
    settings = recipe_settings(recipe)
    fit = learn.fit_flat_cos if settings["schedule"] == "flat_cos" else learn.fit_one_cycle
    cbs = [*cbs, MixUp(settings["mixup"])] if settings["mixup"] else cbs
    try:
        # fastai's DDP under a launcher (each process trains on its share of every epoch); a plain fit
        # otherwise. SyncBatchNorm needs GPUs.
        with learn.distrib_ctx(sync_bn=torch.cuda.is_available()):
            fit(epochs, lr, cbs=cbs)
    except IMAGE_ERRORS:
        raise broken_images_error([*learn.dls.train_ds.items, *learn.dls.valid_ds.items]) from None


def best_epoch_keeper(learn, save_loc, start_weights=None):
    """fastai's `SaveModelCallback` keeping the best epoch by validation accuracy aside, in
    models/.<save_loc>.running.pth, so that the run's earlier weights stay until it ends. A run that starts
    from its own weights (`start_weights` is models/<save_loc>.pth) keeps them unless an epoch beats their
    validation accuracy."""
    models = Path(learn.path) / learn.model_dir
    keeper = SaveModelCallback(monitor="accuracy", fname=f".{save_loc}.running", reset_on_fit=False)
    own = models / f"{save_loc}.pth"
    if start_weights is not None and own.exists() and Path(user_path(start_weights)).samefile(own):
        keeper.best = float(learn.validate()[1])  # [loss, accuracy, ...]
        if is_main_process():
            shutil.copy2(own, models / f".{save_loc}.running.pth")
            print(f"starting from {own} (validation accuracy {keeper.best:.4f}): it stays unless an epoch beats it")
    return keeper


def train_and_save(learn, epochs, lr, save_loc, export_path=None, image_size=image_size, recipe="original",
                   start_weights=None):
    """Train the whole network with the recipe's schedule, keep the epoch with the best validation accuracy,
    save its weights (.pth + class list .json), export the learner (.pkl), and write the CSV log and curves.
    The best weights and the log are written aside while training (`best_epoch_keeper`) and take the place
    of a previous run's only once it ends, so a killed run leaves the previous outputs as they were.

    Returns a dict of the files written, the final validation/training scores and the leak check's line."""
    models = Path(learn.path) / learn.model_dir
    export_path = user_path(export_path or models / f"{save_loc}.pkl")
    models.mkdir(parents=True, exist_ok=True)
    export_path.parent.mkdir(parents=True, exist_ok=True)
    weights, log = models / f"{save_loc}.pth", models / f"{save_loc}_log.csv"
    running_log = models / f".{save_loc}_log.running.csv"
    curves = models / f"{save_loc}_curves.png"
    learn.unfreeze()
    keeper = best_epoch_keeper(learn, save_loc, start_weights)
    if is_main_process():
        print(f"training {save_loc}: recipe {recipe}, {epochs} epochs, {describe_batches(learn.dls.bs, lr)}")
    # fastai saves the best epoch's weights from rank 0 only; the log, the exports and the pictures too.
    cbs = [keeper] + ([CSVLogger(fname=running_log)] if is_main_process() else [])
    fit_recipe(learn, epochs, lr, cbs, recipe)
    # SaveModelCallback wrote the best epoch's weights (no optimiser: loadable with weights_only) and every
    # process has loaded them back; writing them again could race with a process still reading.
    if is_main_process():
        os.replace(models / f".{save_loc}.running.pth", weights)
        os.replace(running_log, log)
        write_class_list(learn, weights, image_size)
        export_atomically(learn, export_path)
        plot_training(log, curves)
    distrib_barrier()  # the other processes go on (to a next TTL stage, say) once the files are complete
    return dict(weights=weights, classes=weights.with_suffix(".json"), export=export_path, log=log,
                curves=curves, scores=evaluate(learn), learner=learn, leak_check=learn.dls.leak_check)


def check_batch_size(**batch_sizes):
    "Refuse a batch of one image: BatchNorm cannot normalise a single image in training."
    for name, value in batch_sizes.items():
        if value == 1:
            raise UserError(f"{name} is 1; training needs at least 2 images per batch (BatchNorm normalises over "
                            f"the batch) — set --{name.replace('_', '-')} 2 or more")


def check_training_options(save_loc, **numbers):
    """Refuse, before any work, a `save_loc` that is not a plain name, numbers that are not > 0 (workers and
    memory_budget: >= 0) and batches of one image."""
    check_file_name(save_loc)
    check_not_negative(workers=numbers.pop("workers", None), memory_budget=numbers.pop("memory_budget", None))
    check_positive(**numbers)
    check_batch_size(**{name: value for name, value in numbers.items() if name.endswith("batch_size")})


def ttl_stage(data_path, start_weights, save_loc=save_loc, epochs=epochs, batch_size=batch_size, lr=lr,
              image_size=image_size, seed=42, workers=None, cache_size=None, recipe="original", memory_budget=None):
    """One Triple Transfer Learning stage: start from `start_weights` (saved with any number of classes),
    make the head fit the classes of `data_path`, train with `recipe`, then save and export under `save_loc`."""
    dls = pap_dls(data_path, image_size, batch_size, seed=seed, workers=workers, cache_size=cache_size,
                  recipe=recipe, memory_budget=memory_budget)
    learn = pap_learner(dls, pretrained=False, path=data_path, recipe=recipe)
    load_weights_across_heads(learn, start_weights)
    return train_and_save(learn, epochs, lr, save_loc, image_size=image_size, recipe=recipe,
                          start_weights=start_weights)
