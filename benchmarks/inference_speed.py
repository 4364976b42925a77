"""Prediction speed: the original's loop (one `learn.predict` call per image) against batched prediction, at
batch 16 and 64, with the same exported model on the same images, loaded as Inference_FastAI.py loads it
(channels-last): fastai's loader with one worker per core (each worker decodes a whole batch) and
Inference_FastAI.py's loader (each image decoded as its own task). Also the network alone on random tensors,
contiguous and channels-last, to show what the memory layout is worth on this machine. Then the same
model exported to ONNX and run by ONNX Runtime (CPU), float and INT8 (`export_onnx.py --int8`), beside PyTorch at
each batch size (batch 1 included), end to end (decode, cut, predict) and the network alone on the same uint8
images. The model is trained here for a few epochs on the synthetic cells, so that its answers differ from image
to image and "same class" compares something.

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
from papsmear import export, learner, predict  # noqa: E402
from papsmear.files import available_cpus  # noqa: E402
from papsmear.onnx_model import OnnxClassifier, image_batch  # noqa: E402
from papsmear.record import TrainingSettings  # noqa: E402
from timing import repeated, spread  # noqa: E402


def predict_one_by_one(learn, files, classes):
    "The original's way: one `predict` call per image; the classes its probabilities name."
    return [classes[int(learn.predict(f)[2].argmax())] for f in files]


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


def measure(learn, classes, files, batch_sizes, image_size, repeats):
    """Rows (path, batch, (median, min, max) seconds, predicted classes) of the loop and both batched loaders at
    each batch size; (batch, timing a batch per worker, timing an image per task) of decoding alone; and
    (batch, memory format, timing) of the network alone on as many random images as `files`."""
    *loop_timing, looped = repeated(predict_one_by_one, learn, files, classes, repeats=repeats)
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


def measure_onnx(learn, runtimes, files, batch_sizes, repeats):
    """Rows (what, batch, {name: timing}, {name: images predicted as PyTorch does}) of PyTorch and each ONNX Runtime
    model (`runtimes`: name → OnnxClassifier), end to end and the network alone on the images already cut."""
    rows = []
    images = image_batch(files, next(iter(runtimes.values())).image_size)
    for batch_size in batch_sizes:
        *timing, expected = repeated(predict.predict_files, learn, files, batch_size, repeats=repeats)
        timings, agree = {"PyTorch": timing}, {"PyTorch": len(files)}
        for name, model in runtimes.items():
            *timings[name], probabilities = repeated(model.predict, files, batch_size, repeats=repeats)
            agree[name] = int((probabilities.argmax(1) == expected.argmax(1)).sum())
        rows.append(("end to end", batch_size, timings, agree))
        chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        timings = {"PyTorch": repeated(run_chunks, lambda c: torch_on_uint8(learn, c), chunks, repeats=repeats)[:3]}
        for name, model in runtimes.items():
            timings[name] = repeated(run_chunks, model.probabilities, chunks, repeats=repeats)[:3]
        rows.append(("network alone", batch_size, timings, None))
    return sorted(rows, key=lambda row: row[0])


def print_onnx(rows, n_files):
    "PyTorch, float ONNX Runtime and INT8 ONNX Runtime side by side: images per second and their ratios."
    names = list(rows[0][2])
    print(f"\nPyTorch and ONNX Runtime (CPU), the same {n_files} images and batches; images/s from the median of the "
          "runs (seconds: median, min–max):")
    print("what          | batch | " + " | ".join(f"{n} img/s (s)" for n in names) + " | ORT float / PyTorch | "
          "INT8 / ORT float | INT8 / PyTorch | same class as PyTorch")
    for label, batch_size, timings, agree in rows:
        rates = {n: n_files / timings[n][0] for n in names}
        print(f"{label:13} | {batch_size:5} | " + " | ".join(f"{rates[n]:7.2f} ({spread(*timings[n])})" for n in names)
              + f" | {rates['ONNX float'] / rates['PyTorch']:19.2f} | {rates['ONNX INT8'] / rates['ONNX float']:16.2f}"
              f" | {rates['ONNX INT8'] / rates['PyTorch']:14.2f} | "
              + ("-" if agree is None else ", ".join(f"{n} {agree[n]}/{n_files}" for n in names[1:])))


def trained_model(folder, image_size, epochs=8):
    """A ResNet50 trained for a few epochs on the formatted demo folder (speed does not depend on the weights, but
    a check of the answers needs answers that vary); returns its .pth (with .json and .pkl beside it). Batches of 4
    give its BatchNorm layers enough steps to settle their statistics on 30 images."""
    result = learner.train_r50(TrainingSettings(folder, save_loc="speed", epochs=epochs, batch_size=4, lr=0.002,
                                                image_size=image_size, pretrained=False, onnx=False, workers=0))
    return result["weights"]


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
        # Per class: 6 images to train, 2 to validate (the leak check refuses shared images), the rest to predict.
        demo.generate_sipakmed(folder / "raw", n_images=8 - (-n_images // 5), width=width, height=height)
        for cls in sorted(folder.glob("raw/im_*/im_*")):
            for i, path in enumerate(sorted(cls.glob("*.bmp"))):
                target = folder / ("train" if i < 6 else "val" if i < 8 else "test")
                (target / cls.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / cls.name / path.name)
        files = sorted((folder / "test").rglob("*.bmp"))[:n_images]
        weights = trained_model(folder, image_size)
        learn, record = predict.load_classifier(weights, files)
        with learn.no_bar():
            rows, decoding, network = measure(learn, record.classes, files, batch_sizes, image_size, repeats)
            onnx_path, _, _ = export.export_onnx(learn, folder / "model.onnx", record, check_files=files)
            # Every INT8 model is timed: its agreement with float is printed and counted below, not required.
            int8 = export.quantize_export(onnx_path, folder / "model.int8.onnx", record, check_files=files,
                                          calibration_files=sorted((folder / "train").rglob("*.bmp")),
                                          min_agreement=0)
            print(int8["line"])
            runtimes = {"ONNX float": OnnxClassifier(onnx_path, threads=available_cpus()),
                        "ONNX INT8": OnnxClassifier(int8["path"], threads=available_cpus())}
            onnx_rows = measure_onnx(learn, runtimes, files, onnx_batch_sizes, repeats)
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
    print(f"the model's answers: {len(set(looped))} different classes over the {len(files)} images")
    print_onnx(onnx_rows, len(files))
