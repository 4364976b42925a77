"""Prediction speed: the original's loop (one `learn.predict` call per image) against batched prediction, at
batch 16 and 64, with the same exported model on the same images: fastai's loader with one worker per core
(each worker decodes a whole batch) and Inference_FastAI.py's loader (each image decoded as its own task).
Run by hand (a GPU run: --n-images 192):
    .venv/bin/python benchmarks/inference_speed.py --n-images 40
"""
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

from fastcore.script import call_parse

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "demo")]
import TTLR50  # noqa: E402,I001
import Inference_FastAI as inference  # noqa: E402
import synthetic_papsmear as demo  # noqa: E402
from timing import timed  # noqa: E402
from fastai.learner import load_learner  # noqa: E402


def predict_one_by_one(learn, files):
    "The original's way: one `predict` call per image."
    return [learn.predict(f)[0] for f in files]


def predict_batch_per_worker(learn, files, batch_size):
    "Class indices from fastai's own test loader, each of its workers (one per core) decoding whole batches."
    dl = learn.dls.test_dl(files, bs=batch_size, num_workers=TTLR50.available_cpus())
    return learn.get_preds(dl=dl)[0].argmax(1).tolist()


def decode_all(dl):
    "Number of images a loader yields when only decoded and batched (no network)."
    return sum(len(images) for images, *_ in dl)


def measure(learn, files, batch_sizes):
    """Rows (path, batch, seconds, predicted classes) of the loop and both batched loaders at each batch size,
    and (batch, seconds) of each loader decoding the images alone."""
    classes = list(map(str, learn.dls.vocab))
    loop_seconds, looped = timed(predict_one_by_one, learn, files)
    rows, decoding = [("per-image predict loop", "-", loop_seconds, looped)], []
    for batch_size in batch_sizes:
        plain = learn.dls.test_dl(files, bs=batch_size, num_workers=TTLR50.available_cpus())
        decoding.append((batch_size, timed(decode_all, plain)[0],
                         timed(decode_all, TTLR50.prediction_dl(learn, files, batch_size))[0]))
        seconds, predicted = timed(predict_batch_per_worker, learn, files, batch_size)
        rows.append(("fastai loader, a batch per worker", batch_size, seconds, [classes[i] for i in predicted]))
        seconds, probabilities = timed(inference.predict_files, learn, files, batch_size)
        rows.append(("Inference_FastAI (image per task)", batch_size, seconds,
                     [classes[i] for i in probabilities.argmax(1)]))
    return rows, decoding


def export_untrained_model(folder, image_size):
    "A ResNet50 learner exported from a formatted demo folder (speed does not depend on the weights)."
    learn = TTLR50.pap_learner(TTLR50.pap_dls(folder, image_size, workers=0, memory_budget=0), path=folder)
    learn.export(folder / "model.pkl")
    return folder / "model.pkl"


@call_parse
def main(n_images: int = 40,     # test images (spread over the 5 classes)
         width: int = 2048,      # image width (real SIPaKMeD cluster images: 2048)
         height: int = 1536,     # image height (real: 1536)
         image_size: int = 224,  # model input side, as in training
         batch_sizes: Annotated[list, {"nargs": "+", "type": int}] = [16, 64]):  # batches of the batched paths
    """Print seconds and images/s of the per-image loop and of both batched loaders at each batch size, and
    how long each loader takes to decode the images alone."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        demo.generate_sipakmed(folder / "raw", n_images=-(-n_images // 5), width=width, height=height)
        for split in ("train", "val", "test"):
            for path in sorted(folder.glob("raw/im_*/im_*/*.bmp"))[:n_images]:
                target = folder / split / path.parent.name / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
        learn = load_learner(export_untrained_model(folder, image_size), cpu=TTLR50.default_device().type != "cuda")
        files = sorted((folder / "test").rglob("*.bmp"))
        with learn.no_bar():
            rows, decoding = measure(learn, files, batch_sizes)
    print(f"{len(files)} images of {width}x{height} at {image_size}px, {TTLR50.available_cpus()} cores, "
          f"device {TTLR50.default_device()}")
    print(f"{'path':34} | batch | seconds | images/s | × loop | same class as the loop")
    loop_seconds, looped = rows[0][2], rows[0][3]
    for name, batch_size, seconds, predicted in rows:
        agree = sum(a == b for a, b in zip(looped, predicted))
        print(f"{name:34} | {batch_size!s:>5} | {seconds:7.2f} | {len(files) / seconds:8.2f} | "
              f"{loop_seconds / seconds:6.1f} | {agree}/{len(files)}")
    print("decoding alone (no network), seconds: " + "; ".join(
        f"batch {bs}: a batch per worker {per_worker:.2f}, image per task {per_image:.2f}"
        for bs, per_worker, per_image in decoding))
