"""Training throughput against the compute ceiling, in one run, on synthetic 2048x1536 cluster images:
(a) bare ResNet50 training steps on random tensors (same batch size, image size, precision),
(b) R50's end-to-end training without the decoded-image cache, (c) with it; and the ratios.

Small settings on CPU (32 px, batch 16), the real ones on a GPU (224 px, batch 64). Run by hand:
    .venv/bin/python benchmarks/train_throughput.py
"""
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from fastcore.script import call_parse

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "demo")]
import TTLR50  # noqa: E402,I001
import synthetic_papsmear as demo  # noqa: E402
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


def end_to_end(folder, image_size, batch_size, epochs, workers, cache_size=None):
    "Images/s of R50's training phase in the last of `epochs` epochs (learner built by TTLR50)."
    dls = TTLR50.pap_dls(folder, image_size, batch_size, workers=workers, cache_size=cache_size)
    learn = TTLR50.pap_learner(dls, path=folder)
    timer = TrainTimer()
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, 1e-3, cbs=timer)
    return timer.epochs[-1]


@call_parse
def main(n_images: int = 80,       # training images (2048x1536 like the real clusters)
         width: int = 2048, height: int = 1536,
         image_size: int = None,   # default: 224 on a GPU, 32 on CPU
         batch_size: int = None,   # default: 64 on a GPU, 16 on CPU
         epochs: int = 2,          # epochs per end-to-end run; the last one is reported
         steps: int = None,        # bare training steps for the ceiling (default: 30 GPU, 5 CPU)
         workers: int = None):     # data loader workers (default: TTLR50's choice for the device)
    "Print the compute ceiling (a), end-to-end without (b) and with (c) the cache, and the ratios."
    gpu = TTLR50.default_device().type == "cuda"
    image_size = image_size or (224 if gpu else 32)
    batch_size = batch_size or (64 if gpu else 16)
    settings = TTLR50.current_speed_settings(workers)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = make_dataset(Path(tmp), n_images, width, height)
        print(f"generated {n_images} images of {width}x{height} in {time.perf_counter() - start:.0f} s", flush=True)
        dls = TTLR50.pap_dls(folder, image_size, batch_size, workers=0)
        ceiling = compute_ceiling(TTLR50.pap_learner(dls).model, settings, image_size, batch_size, steps or (30 if gpu else 5))
        plain = end_to_end(folder, image_size, batch_size, epochs, workers)
        start = time.perf_counter()
        cache_size = round(image_size * 1.15)
        TTLR50.build_cache(folder, cache_size, progress=False)
        build = time.perf_counter() - start
        cached = end_to_end(folder, image_size, batch_size, epochs, workers, cache_size)
    print(f"device {TTLR50.default_device()}, {TTLR50.available_cpus()} cores, {image_size}px, batch {batch_size}, "
          f"precision {settings['amp'] or 'fp32'}, channels_last {settings['channels_last']}, "
          f"{settings['workers']} loader workers")
    print(f"(a) compute ceiling (bare steps on tensors): {ceiling:8.1f} images/s")
    print(f"(b) end-to-end, no cache                  : {plain:8.1f} images/s")
    print(f"(c) end-to-end, cache {cache_size}px             : {cached:8.1f} images/s "
          f"(cache built once in {build:.1f} s)")
    print(f"b/a = {plain / ceiling:.2f}   c/a = {cached / ceiling:.2f}   c/b = {cached / plain:.2f}")
