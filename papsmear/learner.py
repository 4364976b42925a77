"""The ResNet50 learner: building it, weight files, training with a recipe, saving, exporting and plotting."""
import os
import shutil
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.error import URLError

import pandas as pd
import torch
from fastai.callback.all import CSVLogger, MixUp, SaveModelCallback
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import AccumMetric, accuracy, skm_to_fastai
from fastai.torch_core import distrib_barrier
from fastai.vision.all import create_body, model_meta, vision_learner
from sklearn.metrics import balanced_accuracy_score, f1_score, fbeta_score
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

from papsmear.balance import (
    check_balance,
    check_monitor,
    class_counts,
    class_weights,
    imbalance_note,
)
from papsmear.checkpoint import (
    LastEpochCheckpoint,
    check_same_settings,
    checkpoint_path,
    done_path,
    load_checkpoint,
    read_checkpoint,
    write_done,
)
from papsmear.data import (
    broken_images_error,
    check_batch_size,
    current_speed_settings,
    pap_dls,
    recipe_settings,
)
from papsmear.export import CHECK_IMAGES, export_onnx, quantize_export
from papsmear.figures import plt, save_figure
from papsmear.files import (
    IMAGE_ERRORS,
    UserError,
    atomic_output,
    check_file_name,
    check_not_negative,
    check_positive,
    user_path,
)
from papsmear.launch import describe_batches, is_main_process
from papsmear.leaks import training_digests
from papsmear.record import ModelRecord, record_beside
from papsmear.screening import (
    abnormal_classes,
    abnormal_mask,
    abnormal_probability,
    check_target_sensitivity,
    choose_operating_point,
)

# balanced_accuracy_score warns when a validation set lacks a class the model predicts; the score it returns
# (mean recall over the classes present) is the one wanted, so the warning would only repeat every epoch.
warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")

DOWNLOAD_TIMEOUT = 60  # seconds without an answer before the ImageNet download counts as offline


def pap_metrics():
    """Accuracy, balanced accuracy (mean per-class recall), macro F1, weighted F-beta with beta=2 (what the
    original's fastai-v1 `FBeta(average='weighted')` computed) and weighted F1. All of them gather every
    process's predictions before computing, so that on several processes they score the whole validation
    set, as on one."""
    return [AccumMetric(accuracy, flatten=False, name="accuracy"),
            # scikit-learn's own functions: an export pickles the metrics, and so names no module of this project.
            skm_to_fastai(balanced_accuracy_score, name="balanced_accuracy"),
            skm_to_fastai(f1_score, average="macro", name="macro_f1"),
            skm_to_fastai(fbeta_score, beta=2, average="weighted", name="f2_weighted"),
            skm_to_fastai(f1_score, average="weighted", name="f1_weighted")]


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


def pap_learner(dls, pretrained=False, pretrained_weights=None, n_out=None, path=None, recipe="original",
                balance="none"):
    """A fastai ResNet50 learner for `dls` with the project's metrics, on the best device, with the recipe's
    loss (label smoothing or not) and weight decay; with `balance` "inverse" or "sqrt" the loss weighs each
    class by `papsmear.balance.class_weights` of the training split's counts.

    `pretrained` downloads (or reuses) the ImageNet weights; `pretrained_weights` loads a local file
    instead. On CUDA the learner trains in mixed precision and channels-last.
    """
    settings = recipe_settings(recipe)
    check_balance(balance)
    if pretrained and not pretrained_weights:
        ensure_imagenet_weights()
    weight = None
    if balance in ("inverse", "sqrt"):
        # On the loss's device: the weights multiply the network's outputs there.
        weight = torch.tensor(class_weights(class_counts(dls), balance), dtype=torch.float32, device=dls.device)
    loss = (LabelSmoothingCrossEntropyFlat(eps=settings["label_smoothing"], weight=weight)
            if settings["label_smoothing"] else CrossEntropyLossFlat(weight=weight))
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


def model_record(learn, settings, trained_on=None, operating_point=None):
    """The record written beside the weights (`papsmear.record.ModelRecord`): the classes in output order, the
    image size, the recipe, the run's settings, the abnormal classes (named in the settings, or the known
    grouping of the class set), the operating point and the SHA-256 of the training images."""
    classes = list(map(str, learn.dls.vocab))
    return ModelRecord(classes=classes, image_size=settings.image_size, recipe=settings.recipe,
                       abnormal_classes=abnormal_classes(classes, settings.abnormal_classes, settings.normal_classes),
                       operating_point=operating_point, training=settings.as_json(), trained_on=trained_on)


def plot_training(log_csv, png):
    "Training curves from fastai's CSV log: losses, and the metrics, per epoch."
    log = pd.read_csv(log_csv)
    fig, (losses, metrics) = plt.subplots(1, 2, figsize=(11, 4))
    log.plot(x="epoch", y=["train_loss", "valid_loss"], ax=losses, marker="o", title="loss")
    log.plot(x="epoch", y=[m for m in log.columns if m not in ("epoch", "train_loss", "valid_loss", "time")],
             ax=metrics, marker="o", title="validation metrics", ylim=(0, 1.02))
    return save_figure(fig, png)


def evaluate(learn):
    "Loss and metrics on the validation set and on the training set (not shuffled, no sample dropped)."
    names = ["loss", *[m.name for m in learn.metrics]]
    rows = {"validation": learn.validate(dl=learn.dls.valid),
            "training": learn.validate(dl=learn.dls.train.new(shuffle=False, drop_last=False))}
    return pd.DataFrame({k: dict(zip(names, map(float, v), strict=True)) for k, v in rows.items()}).T


def export_atomically(learn, export_path):
    "Export the learner through a temporary name, so a kill never leaves a truncated .pkl."
    with atomic_output(export_path) as tmp:
        learn.export(tmp)
    return export_path


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


def best_epoch_keeper(learn, save_loc, start_weights=None, monitor="accuracy"):
    """fastai's `SaveModelCallback` keeping the best epoch by the validation score `monitor` aside, in
    models/.<save_loc>.running.pth, so that the run's earlier weights stay until it ends. A run that starts
    from its own weights (`start_weights` is models/<save_loc>.pth) keeps them unless an epoch beats their
    score."""
    check_monitor(monitor)
    models = Path(learn.path) / learn.model_dir
    keeper = SaveModelCallback(monitor=monitor, fname=f".{save_loc}.running", reset_on_fit=False)
    own = models / f"{save_loc}.pth"
    if start_weights is not None and own.exists() and Path(user_path(start_weights)).samefile(own):
        scores = learn.validate()  # [loss, *metrics]
        keeper.best = float(scores[1 + [m.name for m in learn.metrics].index(monitor)])
        if is_main_process():
            shutil.copy2(own, models / f".{save_loc}.running.pth")
            print(f"starting from {own} (validation {monitor} {keeper.best:.4f}): it stays unless an epoch beats it")
    return keeper


def resume_point(learn, models, save_loc, settings):
    """The last-epoch checkpoint of the interrupted run `save_loc`, loaded into `learn`: refused when there
    is none, when its settings differ, or when the interrupted run's best epoch is missing."""
    path = checkpoint_path(models, save_loc)
    checkpoint = read_checkpoint(path)
    check_same_settings(checkpoint["settings"], settings, path)
    best = models / f".{save_loc}.running.pth"
    if not best.is_file():
        raise UserError(f"the interrupted run's best epoch {best} is missing, so resuming could not keep it — run "
                        "again without --resume")
    load_checkpoint(learn, checkpoint, path)
    if is_main_process():
        print(f"resuming {save_loc} after epoch {checkpoint['epoch'] + 1} of {settings['epochs']} from {path} "
              f"(best validation {settings['monitor']} so far {checkpoint['best']:.4f})")
    return checkpoint


def validation_operating_point(learn, record, target_sensitivity):
    """The operating point on the validation split reaching `target_sensitivity` (`papsmear.screening`), from the
    kept model's predictions of the validation image files; None without a target."""
    if target_sensitivity is None:
        return None
    if record.abnormal_classes is None:
        raise UserError(f"target_sensitivity needs abnormal classes, and the classes {record.classes} have no known "
                        "grouping — name them with --abnormal-classes (or --normal-classes)")
    # Predicted from the files, as evaluation and deployment predict them (not from the presized images).
    files = list(learn.dls.valid_ds.items)
    with learn.no_bar():
        probabilities = learn.get_preds(dl=learn.dls.test_dl(files, bs=64, num_workers=0))[0]
    truth = [record.classes.index(Path(f).parent.name) for f in files]
    truth_abnormal = abnormal_mask(record.classes, record.abnormal_classes)[truth]
    scores = abnormal_probability(probabilities.float().numpy(), record.classes, record.abnormal_classes)
    return choose_operating_point(truth_abnormal, scores, target_sensitivity,
                                  chosen_on=f"the validation split of {learn.path}")


def training_images_digests(learn, start_weights=None):
    """SHA-256 of every image the model has trained on: this run's training split (an Extended DA output counts
    as its source) and, when it starts from weights with a record, the images those were trained on."""
    digests = set(training_digests(Path(learn.path)))
    earlier = record_beside(start_weights) if start_weights is not None and Path(start_weights).is_file() else None
    if earlier is not None and earlier.trained_on:
        digests |= set(earlier.trained_on)
    return sorted(digests)


def train_and_save(learn, settings, start_weights=None):
    """Train the whole network with the recipe's schedule (`settings`, a `papsmear.record.TrainingSettings` whose
    epochs, batch size and lr are set), keep the epoch with the best validation `monitor` (a score of
    `papsmear.balance.MONITORS`; `balance` is how the learner and data make up for imbalance), save its weights
    (.pth + the model record .json), export the learner (.pkl), and write the CSV log and curves. The best
    weights and the log are written aside while training (`best_epoch_keeper`) and take the place of a previous
    run's only once it ends, so a killed run leaves the previous outputs as they were.

    After every epoch the run writes models/<save_loc>.last.pth (`papsmear.checkpoint`); `resume` continues
    from it. It is removed at the end unless `keep_last`, and models/<save_loc>.done.json records the end.
    With `onnx`, the kept model is also exported to models/<save_loc>.onnx and checked against fastai
    (`papsmear.export`); with `int8` also to <save_loc>.int8.onnx. With `target_sensitivity` the operating
    point is chosen on the validation split and stored in the record.

    Returns a dict of the files written, the final validation/training scores and the leak check's line."""
    save_loc, monitor = settings.save_loc, settings.monitor
    models = Path(learn.path) / learn.model_dir
    export_path = user_path(settings.export_path or models / f"{save_loc}.pkl")
    models.mkdir(parents=True, exist_ok=True)
    export_path.parent.mkdir(parents=True, exist_ok=True)
    weights, log = models / f"{save_loc}.pth", models / f"{save_loc}_log.csv"
    running_log = models / f".{save_loc}_log.running.csv"
    curves = models / f"{save_loc}_curves.png"
    record = model_record(learn, settings)  # checks the abnormal classes named before any training
    learn.unfreeze()
    identity = settings.identity(learn.dls.vocab)
    resume_from = resume_point(learn, models, save_loc, identity) if settings.resume else None
    if not settings.resume and is_main_process():
        done_path(models, save_loc).unlink(missing_ok=True)  # a new run: an earlier end no longer counts
    keeper = best_epoch_keeper(learn, save_loc, start_weights=None if settings.resume else start_weights,
                               monitor=monitor)
    note = imbalance_note(class_counts(learn.dls), list(map(str, learn.dls.vocab)), balance=settings.balance,
                          monitor=monitor)
    if is_main_process():
        print(f"training {save_loc}: recipe {settings.recipe}, {settings.epochs} epochs, "
              f"{describe_batches(learn.dls.bs, settings.lr)}, kept epoch: best {monitor}, balance {settings.balance}")
        if note:
            print(note)
    last = checkpoint_path(models, save_loc)
    # fastai saves the best epoch's weights from rank 0 only; the log, the checkpoint, the exports and the
    # pictures too.
    cbs = [keeper, LastEpochCheckpoint(last, settings=identity, keeper=keeper, resume_from=resume_from)]
    fit_recipe(learn, epochs=settings.epochs, lr=settings.lr,
               cbs=cbs + ([CSVLogger(fname=running_log)] if is_main_process() else []), recipe=settings.recipe)
    # SaveModelCallback wrote the best epoch's weights (no optimiser: loadable with weights_only) and every
    # process has loaded them back; writing them again could race with a process still reading.
    onnx_path = int8_path = None
    if is_main_process():
        record.operating_point = validation_operating_point(learn, record, settings.target_sensitivity)
        record.trained_on = training_images_digests(learn, start_weights)
        os.replace(models / f".{save_loc}.running.pth", weights)
        os.replace(running_log, log)
        record.write(weights.with_suffix(".json"))
        export_atomically(learn, export_path)
        if settings.onnx or settings.int8:
            onnx_path, int8_path = export_models(learn, weights, record, int8=settings.int8)
        plot_training(log, curves)
        write_done(models, save_loc, identity)
        if not settings.keep_last:
            last.unlink(missing_ok=True)
    distrib_barrier()  # the other processes go on (to a next TTL stage, say) once the files are complete
    return dict(weights=weights, classes=weights.with_suffix(".json"), export=export_path, log=log,
                curves=curves, scores=evaluate(learn), learner=learn, leak_check=learn.dls.leak_check,
                checkpoint=last if settings.keep_last else None, onnx=onnx_path, int8=int8_path, record=record)


def export_models(learn, weights, record, int8=False):
    """Export the kept model to <weights>.onnx, checked against fastai, and with `int8` also to
    <weights>.int8.onnx, checked against the float export; prints what each check found. Returns both paths
    (None for the one not written: an INT8 export that fails its check is said so in one line, and training
    ends as usual)."""
    onnx_path, difference, seconds = export_onnx(learn, weights.with_suffix(".onnx"), record,
                                                 check_files=learn.dls.valid_ds.items)
    print(f"ONNX export {onnx_path}: ONNX Runtime agrees with fastai within {difference:.1e} on "
          f"{min(CHECK_IMAGES, len(learn.dls.valid_ds))} validation images ({seconds:.0f} s)")
    if not int8:
        return onnx_path, None
    try:
        quantized = quantize_export(onnx_path, weights.with_suffix(".int8.onnx"), record,
                                    calibration_files=learn.dls.train_ds.items, check_files=learn.dls.valid_ds.items)
    except UserError as e:  # the trained model and its float exports stand; the script's exit code says it
        print(f"INT8 export not written: {e}")
        return onnx_path, None
    print(quantized["line"])
    return onnx_path, quantized["path"]


def check_training_options(save_loc, **numbers):
    """Refuse, before any work, a `save_loc` that is not a plain name, numbers that are not > 0 (workers and
    memory_budget: >= 0) and batches of one image."""
    check_file_name(save_loc)
    check_not_negative(workers=numbers.pop("workers", None), memory_budget=numbers.pop("memory_budget", None))
    check_positive(**numbers)
    check_batch_size(**{name: value for name, value in numbers.items() if name.endswith("batch_size")})


def find_lr(learn, png):
    "Run fastai's learning-rate finder, save its plot, and return the suggested rate (lr is left as set)."
    suggestion = learn.lr_find(show_plot=True)
    save_figure(plt.gcf(), png)
    plt.close("all")
    return suggestion.valley


def train_r50(settings):
    """Build, optionally start from weights (or `resume` the interrupted run `save_loc`), train with the recipe
    (epochs, batch_size and lr left None take the recipe's), save and export, all as `settings` (a
    `papsmear.record.TrainingSettings`) says; returns `train_and_save`'s summary."""
    settings = settings.with_recipe(recipe_settings(settings.recipe))
    check_training_options(settings.save_loc, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                           image_size=settings.image_size, workers=settings.workers, cache_size=settings.cache_size,
                           memory_budget=settings.memory_budget)
    check_monitor(settings.monitor)
    check_target_sensitivity(settings.target_sensitivity)
    if settings.resume and settings.lr_find:
        raise UserError("lr_find would change the weights and random state a resumed run continues from — "
                        "drop --lr-find to resume")
    dls = pap_dls(settings.path_folder, settings.image_size, settings.batch_size, seed=settings.seed,
                  workers=settings.workers, cache_size=settings.cache_size, recipe=settings.recipe,
                  memory_budget=settings.memory_budget, balance=settings.balance)
    # A resumed run takes its weights from its checkpoint: nothing to download or load first.
    starts_from_file = settings.model_path is not None and not settings.resume
    learn = pap_learner(dls, pretrained=settings.pretrained and not starts_from_file and not settings.resume,
                        pretrained_weights=None if settings.resume else settings.pretrained_weights,
                        path=settings.path_folder, recipe=settings.recipe, balance=settings.balance)
    if starts_from_file:
        load_weights(learn, settings.model_path)
    if settings.lr_find:
        png = Path(settings.path_folder) / "models" / f"{settings.save_loc}_lr_find.png"
        print(f"lr_find suggests lr = {find_lr(learn, png):.2e} (plot: {png}); training with lr = {settings.lr:g}")
    return train_and_save(learn, settings, start_weights=settings.model_path)
