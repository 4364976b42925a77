"""Training throughput against the compute ceiling, in one run, on synthetic 2048x1536 cluster images, at
each batch size: (a) bare ResNet50 training steps on random tensors (same batch size, image size, precision),
(b) R50's end-to-end training reading the image files, (c) reading the decoded-image cache, (d) from the
presized images held in memory; the ratios, and how long 50 epochs of an Extended DA SIPaKMeD would take.

Small settings on CPU (80 images, 32 px, batches 16 and 10), the real ones on a GPU (576 images, as many as
SIPaKMeD's training split; 224 px; batches 64 and 10). Run by hand:
    .venv/bin/python benchmarks/train_throughput.py
"""
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch
from fastcore.script import call_parse

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "demo")]
import TTLR50  # noqa: E402,I001
import presized  # noqa: E402
import synthetic_papsmear as demo  # noqa: E402
from timing import timed  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from fastai.torch_core import find_bs  # noqa: E402


class TrainTimer(Callback):
    "Seconds and images of each epoch's training phase (validation excluded)."
    def before_fit(self):
        self.epochs = []

    def before_train(self):
        self.start, self.images = time.perf_counter(), 0

    def after_batch(self):
        if self.training:
            self.images += find_bs(self.yb)

    def after_train(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.epochs.append(self.images / (time.perf_counter() - self.start))


def make_dataset(folder, n_images, width, height):
    "A formatted folder: n_images cluster images in train/, one per class in val/."
    demo.generate_sipakmed(folder / "raw", n_images=-(-n_images // 5), width=width, height=height)
    for i, path in enumerate(sorted(folder.glob("raw/im_*/im_*/*.bmp"))[:n_images]):
        target = folder / "train" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        if not (folder / "val" / path.parent.name).exists():
            shutil.copytree(target.parent, folder / "val" / path.parent.name)
    shutil.rmtree(folder / "raw")
    return folder


def compute_ceiling(model, settings, image_size, batch_size, steps):
    "Images/s of bare training steps (forward, backward, Adam) on random tensors on the training device."
    device = TTLR50.default_device()
    model = model.to(device).train()
    memory = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).to(memory_format=memory)
    y = torch.randint(0, 5, (batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings["amp"])
    scaler = torch.amp.GradScaler(enabled=settings["amp"] == "fp16")

    def step():
        optimiser.zero_grad()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def end_to_end(folder, image_size, batch_size, epochs, workers, cache_size=None, memory_budget=0):
    "Median images/s of R50's training phase over the epochs after the first (learner built by TTLR50)."
    dls = TTLR50.pap_dls(folder, image_size, batch_size, workers=workers, cache_size=cache_size,
                         memory_budget=memory_budget)
    learn = TTLR50.pap_learner(dls, path=folder)
    timer = TrainTimer()
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, 1e-3, cbs=timer)
    return statistics.median(timer.epochs[1:] or timer.epochs)


EXTENDED_DA_IMAGES = 576 * 15  # SIPaKMeD's training split of cluster images and their 14 augmentations each


def report_table(rows):
    "Images/s per path and batch size, each path's share of the ceiling, and 50 Extended DA epochs in minutes."
    lines = ["batch | (a) ceiling | (b) files | (c) cache | (d) memory | b/a  | c/a  | d/a  | d/c  | "
             "50 epochs of 8640 images: a / b / c / d (min) | peak GPU GB"]
    for r in rows:
        minutes = " / ".join(f"{50 * EXTENDED_DA_IMAGES / r[k] / 60:.1f}" for k in "abcd")
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        lines.append(f"{r['batch_size']:5d} | {r['a']:11.1f} | {r['b']:9.1f} | {r['c']:9.1f} | {r['d']:10.1f} | "
                     f"{r['b'] / r['a']:.2f} | {r['c'] / r['a']:.2f} | {r['d'] / r['a']:.2f} | "
                     f"{r['d'] / r['c']:.2f} | {minutes} | {peak}")
    return "\n".join(lines)


@call_parse
def main(n_images: int = None,     # training images, 2048x1536 like the real clusters (default: 576 GPU, 80 CPU)
         width: int = 2048, height: int = 1536,
         image_size: int = None,   # default: 224 on a GPU, 32 on CPU
         batch_sizes: Annotated[list, {"nargs": "+", "type": int}] = None,  # default: 64 10 on a GPU, 16 10 on CPU
         epochs: int = 4,          # epochs per end-to-end run; the median of all but the first is reported
         steps: int = None,        # bare training steps for the ceiling (default: 30 GPU, 5 CPU)
         workers: int = None):     # data loader workers of (b) and (c) (default: TTLR50's choice for the device)
    "Print, per batch size, the ceiling (a), the file (b), cache (c) and in-memory (d) paths, and the ratios."
    gpu = TTLR50.default_device().type == "cuda"
    n_images = n_images or (576 if gpu else 80)
    image_size = image_size or (224 if gpu else 32)
    batch_sizes = batch_sizes or ([64, 10] if gpu else [16, 10])
    settings = TTLR50.current_speed_settings(workers)
    cache_size = round(image_size * 1.15)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        seconds, folder = timed(make_dataset, Path(tmp), n_images, width, height)
        print(f"generated {n_images} images of {width}x{height} in {seconds:.0f} s", flush=True)
        cache_build, _ = timed(TTLR50.build_cache, folder, cache_size, progress=False)
        presize_build, _ = timed(TTLR50.build_cache, folder, image_size, progress=False)
        model = TTLR50.pap_learner(TTLR50.pap_dls(folder, image_size, batch_sizes[0], workers=0,
                                                  memory_budget=0)).model
        for batch_size in batch_sizes:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            rows.append(dict(batch_size=batch_size,
                             a=compute_ceiling(model, settings, image_size, batch_size, steps or (30 if gpu else 5)),
                             b=end_to_end(folder, image_size, batch_size, epochs, workers),
                             c=end_to_end(folder, image_size, batch_size, epochs, workers, cache_size),
                             d=end_to_end(folder, image_size, batch_size, epochs, workers, memory_budget=None),
                             peak_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if gpu else None))
        held = presized.presized_bytes(presized.split_images(folder), image_size) / 2 ** 30
    print(f"\ndevice {TTLR50.default_device()}, {TTLR50.available_cpus()} cores, {image_size}px, "
          f"precision {settings['amp'] or 'fp32'}, channels_last {settings['channels_last']}, "
          f"{settings['workers']} loader workers for (b) and (c)")
    print(f"cache ({cache_size}px) built in {cache_build:.1f} s; presized images ({image_size}px) built in "
          f"{presize_build:.1f} s with {TTLR50.available_cpus()} threads, {held * 1024:.1f} MB held in memory")
    print(report_table(rows))
