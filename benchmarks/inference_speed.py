"""Prediction speed: the original's loop (one `learn.predict` call per image) against batched prediction, at
batch 16 and 64, with the same exported model on the same images, loaded as Inference_FastAI.py loads it
(channels-last): fastai's loader with one worker per core (each worker decodes a whole batch) and
Inference_FastAI.py's loader (each image decoded as its own task). Also the network alone on random tensors,
contiguous and channels-last, to show what the memory layout is worth on this machine. Then the same
model exported to ONNX and run by ONNX Runtime (CPU) beside PyTorch at each batch size (batch 1 included),
end to end (decode, cut, predict) and the network alone on the same uint8 images.

Every path runs once untimed (warm-up), then `repeats` times; the median is reported with the min–max.
Run by hand (a GPU run: --n-images 192):
    .venv/bin/python benchmarks/inference_speed.py --n-images 40
"""
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import torch
from fastcore.script import call_parse

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "demo")]
from fastai.torch_core import default_device  # noqa: E402

import synthetic_papsmear as demo  # noqa: E402
from papsmear import data, export, learner, predict  # noqa: E402
from papsmear.files import available_cpus  # noqa: E402
from papsmear.onnx_model import OnnxClassifier, image_batch  # noqa: E402
from timing import repeated, spread  # noqa: E402


def predict_one_by_one(learn, files):
    "The original's way: one `predict` call per image."
    return [learn.predict(f)[0] for f in files]


def predict_batch_per_worker(learn, files, batch_size):
    "Class indices from fastai's own test loader, each of its workers (one per core) decoding whole batches."
    dl = learn.dls.test_dl(files, bs=batch_size, num_workers=available_cpus())
    return learn.get_preds(dl=dl)[0].argmax(1).tolist()


def decode_all(dl):
    "Number of images a loader yields when only decoded and batched (no network)."
    return sum(len(images) for images, *_ in dl)


def network_alone(model, batch, memory_format):
    "The model's outputs for one batch of random tensors in `memory_format` (no data loading)."
    with torch.inference_mode():
        return model(batch.to(memory_format=memory_format))


def measure(learn, files, batch_sizes, image_size, repeats):
    """Rows (path, batch, (median, min, max) seconds, predicted classes) of the loop and both batched loaders at
    each batch size; (batch, timing a batch per worker, timing an image per task) of decoding alone; and
    (batch, memory format, timing) of the network alone on as many random images as `files`."""
    classes = list(map(str, learn.dls.vocab))
    *loop_timing, looped = repeated(predict_one_by_one, learn, files, repeats=repeats)
    rows, decoding, network = [("per-image predict loop", "-", loop_timing, looped)], [], []
    for batch_size in batch_sizes:
        plain = learn.dls.test_dl(files, bs=batch_size, num_workers=available_cpus())
        decoding.append((batch_size, repeated(decode_all, plain, repeats=repeats)[:3],
                         repeated(decode_all, predict.prediction_dl(learn, files, batch_size), repeats=repeats)[:3]))
        *timing, predicted = repeated(predict_batch_per_worker, learn, files, batch_size, repeats=repeats)
        rows.append(("fastai loader, a batch per worker", batch_size, timing, [classes[i] for i in predicted]))
        *timing, probabilities = repeated(predict.predict_files, learn, files, batch_size, repeats=repeats)
        rows.append(("Inference_FastAI (image per task)", batch_size, timing,
                     [classes[i] for i in probabilities.argmax(1)]))
    model = learn.model.eval()
    for batch_size in batch_sizes:
        batch = torch.randn(batch_size, 3, image_size, image_size, device=default_device())
        for name, memory_format in (("contiguous", torch.contiguous_format), ("channels-last", torch.channels_last)):
            model.to(memory_format=memory_format)
            seconds = repeated(network_alone, model, batch, memory_format, repeats=repeats)[:3]
            network.append((batch_size, name, [s * len(files) / batch_size for s in seconds]))
    model.to(memory_format=torch.channels_last)  # as predict.load_classifier leaves it
    return rows, decoding, network


def torch_on_uint8(learn, images):
    "PyTorch's probabilities of a uint8 batch [n, s, s, 3], normalised as fastai does (the network alone)."
    network = export.ImageInputModel(learn.model).eval()
    with torch.inference_mode():
        return network(torch.from_numpy(images)).numpy()


def run_chunks(predict_batch, chunks):
    "`predict_batch` on every chunk of images, in order."
    return [predict_batch(chunk) for chunk in chunks]


def measure_onnx(learn, onnx_model, files, batch_sizes, repeats):
    """Rows (batch, PyTorch timing, ONNX Runtime timing, images predicted alike) end to end, and the same for
    the network alone on the images already cut to the model's input."""
    end_to_end, alone = [], []
    images = image_batch(files, onnx_model.image_size)
    for batch_size in batch_sizes:
        *torch_timing, torch_probabilities = repeated(predict.predict_files, learn, files, batch_size, repeats=repeats)
        *onnx_timing, onnx_probabilities = repeated(onnx_model.predict, files, batch_size, repeats=repeats)
        agree = int((torch_probabilities.argmax(1) == onnx_probabilities.argmax(1)).sum())
        end_to_end.append((batch_size, torch_timing, onnx_timing, agree))
        chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        torch_alone = repeated(run_chunks, lambda c: torch_on_uint8(learn, c), chunks, repeats=repeats)[:3]
        onnx_alone = repeated(run_chunks, onnx_model.probabilities, chunks, repeats=repeats)[:3]
        alone.append((batch_size, torch_alone, onnx_alone, len(files)))
    return end_to_end, alone


def print_onnx(end_to_end, alone, n_files):
    "The ONNX Runtime rows beside PyTorch's, as images per second and their ratio."
    print(f"\nONNX Runtime (CPU) against PyTorch (CPU), the same {n_files} images and batches; median (min–max):")
    print("what            | batch | PyTorch seconds    | ONNX Runtime seconds | PyTorch img/s | ORT img/s | "
          "ORT / PyTorch | same class")
    for label, rows in (("end to end", end_to_end), ("network alone", alone)):
        for batch_size, torch_timing, onnx_timing, extra in rows:
            same = f"{extra}/{n_files}" if label == "end to end" else "-"
            print(f"{label:15} | {batch_size:5} | {spread(*torch_timing):18} | {spread(*onnx_timing):20} | "
                  f"{n_files / torch_timing[0]:13.2f} | {n_files / onnx_timing[0]:9.2f} | "
                  f"{torch_timing[0] / onnx_timing[0]:13.2f} | {same}")


def export_untrained_model(folder, image_size):
    "A ResNet50 learner exported from a formatted demo folder (speed does not depend on the weights)."
    dls = data.pap_dls(folder, image_size, batch_size=5, workers=0, memory_budget=0)
    learn = learner.pap_learner(dls, path=folder)
    learn.export(folder / "model.pkl")
    return folder / "model.pkl"


@call_parse
def main(n_images: int = 40,     # test images (spread over the 5 classes)
         width: int = 2048,      # image width (real SIPaKMeD cluster images: 2048)
         height: int = 1536,     # image height (real: 1536)
         image_size: int = 224,  # model input side, as in training
         batch_sizes: Annotated[list, {"nargs": "+", "type": int}] = (16, 64),  # batches of the batched paths
         onnx_batch_sizes: Annotated[list, {"nargs": "+", "type": int}] = (1, 16, 64),  # batches, ONNX vs PyTorch
         repeats: int = 3):      # timed runs of each path after its warm-up; the median is reported
    """Print seconds and images/s of the per-image loop and of both batched loaders at each batch size, how
    long each loader takes to decode the images alone, and the network alone in both memory layouts."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # Per class: one image to train, one to validate (the model is exported untrained; the leak check
        # refuses shared images), the rest to predict.
        demo.generate_sipakmed(folder / "raw", n_images=2 - (-n_images // 5), width=width, height=height)
        for cls in sorted(folder.glob("raw/im_*/im_*")):
            for i, path in enumerate(sorted(cls.glob("*.bmp"))):
                target = folder / ("train", "val")[i] if i < 2 else folder / "test"
                (target / cls.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / cls.name / path.name)
        files = sorted((folder / "test").rglob("*.bmp"))[:n_images]
        learn, _ = predict.load_classifier(export_untrained_model(folder, image_size), files)
        with learn.no_bar():
            rows, decoding, network = measure(learn, files, batch_sizes, image_size, repeats)
            onnx_path, _, _ = export.export_onnx(learn, folder / "model.onnx", learn.dls.vocab, image_size=image_size,
                                                 recipe="original", check_files=files)
            end_to_end, alone = measure_onnx(learn, OnnxClassifier(onnx_path, threads=available_cpus()), files,
                                             onnx_batch_sizes, repeats)
    print(f"{len(files)} images of {width}x{height} at {image_size}px, {available_cpus()} cores, "
          f"device {default_device()}; median of {repeats} runs after a warm-up (min–max)")
    print(f"{'path':34} | batch | seconds            | images/s | × loop | same class as the loop")
    loop_seconds, looped = rows[0][2][0], rows[0][3]
    for name, batch_size, timing, predicted in rows:
        agree = sum(a == b for a, b in zip(looped, predicted, strict=True))
        print(f"{name:34} | {batch_size!s:>5} | {spread(*timing):18} | {len(files) / timing[0]:8.2f} | "
              f"{loop_seconds / timing[0]:6.1f} | {agree}/{len(files)}")
    print("decoding alone (no network), seconds: " + "; ".join(
        f"batch {bs}: a batch per worker {spread(*per_worker)}, image per task {spread(*per_image)}"
        for bs, per_worker, per_image in decoding))
    print(f"the network alone on {len(files)} random images, seconds: " + "; ".join(
        f"batch {bs} {name} {spread(*timing)}" for bs, name, timing in network))
    print_onnx(end_to_end, alone, len(files))
