"""Training throughput against the compute ceiling, in one run, on synthetic 2048x1536 cluster images, at
each batch size:
(a) the ceiling: fastai's fit (its optimiser, the recipe's batch transforms on the device) on one batch held
    in memory, so that no data work is left;
(b) R50's end-to-end training reading the image files; (c) reading the decoded-image cache; (d) from the
    presized images held in memory (refused when they do not fit);
the ratios, and how long 50 epochs of an Extended DA SIPaKMeD would take on each path, validation and the
time to presize or cache the images included. A bare PyTorch step (random tensors, torch's Adam, no
augmentation, no fastai) is printed beside (a) for reference.

Each path trains `epochs` epochs; the first is a warm-up, the median of the others is reported with their
min–max. Small settings on CPU (80 images, 32 px, batches 16 and 10), the real ones on a GPU (576 images, as
many as SIPaKMeD's training split; 224 px; batches 64 and 10). Run by hand:
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
from fastai.callback.core import Callback  # noqa: E402
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.torch_core import default_device, find_bs  # noqa: E402

import synthetic_papsmear as demo  # noqa: E402
from papsmear import data, learner, presize  # noqa: E402
from papsmear.files import available_cpus  # noqa: E402
from timing import repeated, timed  # noqa: E402


class TrainTimer(Callback):
    "Images/s of each epoch's training phase and of its validation phase."
    def before_fit(self):
        self.train_rates, self.valid_rates = [], []

    def before_epoch(self):
        self.images = {True: 0, False: 0}

    def before_train(self):
        self.start = time.perf_counter()

    def before_validate(self):
        self.start = time.perf_counter()

    def after_batch(self):
        self.images[self.training] += find_bs(self.yb)

    def after_train(self):
        self.train_rates.append(self.images[True] / self.elapsed())

    def after_validate(self):
        self.valid_rates.append(self.images[False] / self.elapsed())

    def elapsed(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - self.start


class HeldBatchDL(presize.PresizedDL):
    "Every batch is the first one, cut once from the presized images: fastai's fit with no data work left."
    def create_batches(self, samps):
        "The first batch, as many times as there are batches."
        held = next(super().create_batches(samps))
        for _ in self.chunkify(samps):
            yield held


def make_dataset(folder, n_images, width, height):
    "A formatted folder: n_images cluster images in train/, and one other image per class in val/."
    per_class = -(-n_images // 5)
    demo.generate_sipakmed(folder / "raw", n_images=per_class + 1, width=width, height=height)
    for cls in sorted(folder.glob("raw/im_*/im_*")):
        for i, path in enumerate(sorted(cls.glob("*.bmp"))):
            target = folder / ("val" if i == per_class else "train") / cls.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    for extra in sorted((folder / "train").rglob("*.bmp"))[n_images:]:
        extra.unlink()
    shutil.rmtree(folder / "raw")
    return folder


def bare_step(model, settings, image_size, batch_size, steps):
    """Images/s of bare PyTorch training steps (forward, backward, torch's Adam) on random tensors, no fastai
    and no augmentation: the median of 3 timings of `steps` steps, after a warm-up."""
    device = default_device()
    model = model.to(device).train()
    memory = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).to(memory_format=memory)
    y = torch.randint(0, 5, (batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings["amp"])
    scaler = torch.amp.GradScaler(enabled=settings["amp"] == "fp16")

    def run():
        for _ in range(steps):
            optimiser.zero_grad()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
    median, low, high, _ = repeated(run)
    return [steps * batch_size / t for t in (median, high, low)]


def throughput(dls, folder, epochs):
    """([median, min, max] training images/s, median validation images/s) of R50's learner (built by TTLR50)
    fitting `dls` for `epochs` epochs, the first left out as a warm-up."""
    learn = learner.pap_learner(dls, path=folder)
    timer = TrainTimer()
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, 1e-3, cbs=timer)
    train = timer.train_rates[1:] or timer.train_rates
    valid = timer.valid_rates[1:] or timer.valid_rates
    return [statistics.median(train), min(train), max(train)], statistics.median(valid)


def in_memory_dls(folder, image_size, batch_size, workers):
    "Path (d)'s data loaders; refused when the presized images do not fit in memory (it would read files)."
    dls = data.pap_dls(folder, image_size, batch_size, workers=workers, memory_budget=None)
    if not isinstance(dls.train, presize.PresizedDL):
        raise SystemExit("(d) would read the files: the presized images do not fit the memory budget here")
    print(f"(d) at batch {batch_size}: presized images held in {presize.describe_stores(dls.loaders)}", flush=True)
    return dls


def ceiling_dls(folder, image_size, batch_size, workers):
    "Path (a)'s data loaders: (d)'s, whose training batches are all one batch cut once."
    dls = in_memory_dls(folder, image_size, batch_size, workers)
    return DataLoaders(dls.train.new(cls=HeldBatchDL), dls.valid, path=dls.path, device=dls.device)


EXTENDED_DA_IMAGES = 576 * 15  # SIPaKMeD's training split of cluster images and their 14 augmentations each
SIPAKMED_VAL_IMAGES = 194      # its validation split (not augmented)


def projection_minutes(row, path, prepare_per_image):
    """Minutes for 50 epochs of an Extended DA SIPaKMeD on `path` at the row's rates: presizing (or caching)
    every image once, then training and validating 50 times."""
    train_rate, valid_rate = row[path][0][0], row[path][1]
    images = EXTENDED_DA_IMAGES + SIPAKMED_VAL_IMAGES
    seconds = prepare_per_image * images + 50 * (EXTENDED_DA_IMAGES / train_rate + SIPAKMED_VAL_IMAGES / valid_rate)
    return seconds / 60


def report_table(rows, prepare):
    """Images/s per path and batch size (median, min–max), each path's share of the ceiling, and 50 Extended DA
    epochs in minutes with validation and preparation (`prepare`: seconds per image for each path)."""
    lines = ["batch | bare step | (a) ceiling | (b) files | (c) cache | (d) memory | b/a  | c/a  | d/a  | d/c  | "
             "50 epochs of 8640 images + validation + preparation: a / b / c / d (min) | peak GPU GB"]
    for r in rows:
        cells = " | ".join(f"{r[k][0][0]:.1f} ({r[k][0][1]:.0f}–{r[k][0][2]:.0f})" for k in "abcd")
        minutes = " / ".join(f"{projection_minutes(r, k, prepare[k]):.1f}" for k in "abcd")
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        ratio = {k: r[k][0][0] for k in "abcd"}
        lines.append(f"{r['batch_size']:5d} | {r['bare'][0]:9.1f} | {cells} | {ratio['b'] / ratio['a']:.2f} | "
                     f"{ratio['c'] / ratio['a']:.2f} | {ratio['d'] / ratio['a']:.2f} | {ratio['d'] / ratio['c']:.2f} | "
                     f"{minutes} | {peak}")
    return "\n".join(lines)


@call_parse
def main(n_images: int = None,     # training images, 2048x1536 like the real clusters (default: 576 GPU, 80 CPU)
         width: int = 2048, height: int = 1536,
         image_size: int = None,   # default: 224 on a GPU, 32 on CPU
         batch_sizes: Annotated[list, {"nargs": "+", "type": int}] = None,  # default: 64 10 on a GPU, 16 10 on CPU
         epochs: int = 4,          # epochs per path: the first is a warm-up, the median of the others is reported
         steps: int = None,        # bare training steps per timing (default: 30 GPU, 5 CPU)
         workers: int = None):     # data loader workers of (b) and (c) (default: TTLR50's choice for the device)
    "Print, per batch size, the ceiling (a), the file (b), cache (c) and in-memory (d) paths, and the ratios."
    gpu = default_device().type == "cuda"
    n_images = n_images or (576 if gpu else 80)
    image_size = image_size or (224 if gpu else 32)
    batch_sizes = batch_sizes or ([64, 10] if gpu else [16, 10])
    settings = data.current_speed_settings(workers)
    cache_size = round(image_size * 1.15)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        seconds, folder = timed(make_dataset, Path(tmp), n_images, width, height)
        print(f"generated {n_images} images of {width}x{height} in {seconds:.0f} s", flush=True)
        held = presize.split_images(folder)
        cache_build, _ = timed(presize.build_cache, folder, cache_size, progress=False)
        presize_build, _ = timed(presize.build_cache, folder, image_size, progress=False)
        load, _ = timed(presize.load_store, [folder / "cache" / f"{image_size}px" / f"{f.relative_to(folder)}.png"
                                              for f in held], [0] * len(held), "cpu")
        prepare = dict(a=0.0, b=0.0, c=cache_build / len(held), d=(presize_build + load) / len(held))
        model = learner.pap_learner(data.pap_dls(folder, image_size, batch_sizes[0], workers=0,
                                                  memory_budget=0)).model
        for batch_size in batch_sizes:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            rows.append(dict(
                batch_size=batch_size,
                bare=bare_step(model, settings, image_size, batch_size, steps or (30 if gpu else 5)),
                a=throughput(ceiling_dls(folder, image_size, batch_size, workers), folder, epochs),
                b=throughput(data.pap_dls(folder, image_size, batch_size, workers=workers, memory_budget=0),
                             folder, epochs),
                c=throughput(data.pap_dls(folder, image_size, batch_size, workers=workers, cache_size=cache_size,
                                            memory_budget=0), folder, epochs),
                d=throughput(in_memory_dls(folder, image_size, batch_size, workers), folder, epochs),
                peak_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if gpu else None))
        nbytes = presize.presized_bytes(held, image_size) / 2 ** 30
    print(f"\ndevice {default_device()}, {available_cpus()} cores, {image_size}px, "
          f"precision {settings['amp'] or 'fp32'}, channels_last {settings['channels_last']}, "
          f"{settings['workers']} loader workers for (b) and (c); training images/s, median of epochs 2–{epochs} "
          "(min–max)")
    print(f"cache ({cache_size}px) built in {cache_build:.1f} s; presized images ({image_size}px) built in "
          f"{presize_build:.1f} s and loaded in {load:.1f} s with {available_cpus()} threads, "
          f"{nbytes * 1024:.1f} MB held in memory")
    print(report_table(rows, prepare))
