"""Presizing: every image decoded and resized once, so that the work left for each batch is cheap.

- The decoded-image cache: each train/val image resized once (shorter side `cache_size`) and stored as PNG
  under path_folder/cache/<cache_size>px, built by all cores.
- The in-memory path: the cache at `image_size` held as one uint8 buffer (on the GPU when it fits the memory
  budget, else in pinned RAM); each batch is cut out of it by indexing (random crop for training, centre crop
  for validation, fastai `Resize`'s rule), and fastai's batch transforms (augmentation, normalisation) run on
  the device, as on the file path.
- Per-image parallel decoding for prediction: every core decodes its own images, whatever the batch size.
"""
import fcntl
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from fastai.data.core import TfmdDL
from fastai.torch_core import TensorCategory, TensorImage
from fastai.vision.augment import Resize
from PIL import Image

from papsmear.files import (
    IMAGE_ERRORS,
    UserError,
    atomic_output,
    available_cpus,
    file_stamp,
    progress_bar,
    remove_partials,
    sample_images,
)

GB = 2 ** 30
AUTO_SHARE = 0.25  # share of the GPU's (or, on CPU, the free RAM's) memory the images may take by default
PINNED_SHARE = 0.5  # share of the free RAM that pinned host memory may take when the GPU budget is too small
RESAMPLING = Image.Resampling.BILINEAR  # how presized images are resized
# What a cache entry depends on besides its source; a cache made under other values is rebuilt. Bump the
# version whenever the way an entry is made changes.
CACHE_FORMAT = dict(version=2, resampling=RESAMPLING.name.lower(), format="png")


def presized_shape(width, height, side):
    "(width, height) of an image of `width` x `height` resized so that its shorter side is `side`."
    scale = side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_short_side(image, size):
    "Resize a PIL image so that its shorter side is `size`, keeping the aspect ratio."
    return image.resize(presized_shape(*image.size, size), RESAMPLING)


def split_images(path_folder, splits=("train", "val")):
    "Sample images of the split folders of a formatted dataset, in a stable order."
    return [f for split in splits if (path_folder / split).is_dir() for f in sample_images(path_folder / split)]


def image_error(source, error):
    "The user error for an image file that PIL cannot read."
    return UserError(f"cannot read image {source} ({type(error).__name__}: {error}) — remove or replace it, then "
                     "run again")


def cache_image(source, target, cache_size):
    """Decode `source`, resize it (shorter side `cache_size`) and write it as PNG to `target`, atomically.
    The same source always gives the same bytes, whichever thread does it."""
    try:
        with Image.open(source) as image:
            small = resize_short_side(image.convert("RGB"), cache_size)
    except Exception as e:  # PIL raises many kinds for a broken file
        raise image_error(source, e) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target) as tmp:
        small.save(tmp, format="PNG", compress_level=1)


def build_cache(path_folder, cache_size, splits=("train", "val"), progress=True, workers=None, files=None):
    """Decode and resize every image of `splits` (or the images `files` under path_folder) once, shorter side
    `cache_size`, into path_folder/cache/<cache_size>px with `workers` threads (default: one per core), and
    return that folder.

    An image is redone when its source changes (size, modification or change time: `papfiles.file_stamp`) or
    its cache file is damaged (missing, or not the size it was written with), and every image when the cache
    was made in another format (`CACHE_FORMAT`) or its manifest cannot be read; damage is reported in one
    line. Cache files whose source is gone are removed. The source dataset is only read. Two runs at once take
    turns on a lock file.
    """
    path_folder = Path(path_folder)
    root = path_folder / "cache" / f"{cache_size}px"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest_path = root / "manifest.json"
        manifest, problem = read_manifest(manifest_path)
        if problem:
            print(f"cache {root}: {problem}; every image is presized again")
        files = split_images(path_folder, splits) if files is None else files
        sources = {Path(p).relative_to(path_folder).as_posix(): Path(p) for p in files}
        gone = set(manifest) - set(sources)
        for rel in gone:
            (root / f"{rel}.png").unlink(missing_ok=True)
            del manifest[rel]
        stamps = {rel: file_stamp(p) for rel, p in sources.items()}
        todo = [rel for rel in sources if manifest.get(rel, [])[:3] != stamps[rel]]
        damaged = [rel for rel in sources if manifest.get(rel, [])[:3] == stamps[rel]
                   and not entry_intact(root / f"{rel}.png", manifest[rel])]
        if damaged:
            print(f"cache {root}: {len(damaged)} damaged file(s) presized again from their source, e.g. "
                  f"{damaged[0]}.png")
        todo += damaged
        remove_partials(root)
        # PIL releases the GIL while it decodes, resizes and compresses, so threads use every core.
        with ThreadPoolExecutor(workers or available_cpus()) as pool:
            jobs = pool.map(lambda rel: cache_image(sources[rel], root / f"{rel}.png", cache_size), todo)
            for _ in progress_bar(jobs, total=len(todo), desc=f"cache {cache_size}px", unit="img",
                          disable=not progress or not todo):
                pass
        for rel in todo:
            manifest[rel] = [*stamps[rel], (root / f"{rel}.png").stat().st_size]
        if todo or gone or not manifest_path.exists():  # an unchanged cache is only read (several processes)
            with atomic_output(manifest_path) as tmp:
                tmp.write_text(json.dumps(dict(CACHE_FORMAT, images=manifest), indent=0, sort_keys=True))
    return root


def read_manifest(manifest_path):
    """({relative source path: [its `file_stamp`, the cache file's size] when its entry was made}, problem) of
    a cache. The entries are empty (every image is redone) when there is no manifest, or one written in
    another `CACHE_FORMAT`; `problem` says why when the manifest exists but cannot be read."""
    if not Path(manifest_path).exists():
        return {}, None
    try:
        manifest = json.loads(Path(manifest_path).read_text())
        images = manifest["images"] if all(manifest.get(k) == v for k, v in CACHE_FORMAT.items()) else {}
        if not all(isinstance(entry, list) and len(entry) == 4 for entry in images.values()):
            raise ValueError("an entry is not [size, modified, changed, cache size]")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return {}, f"its manifest {Path(manifest_path).name} cannot be read ({type(e).__name__}: {e})"
    return images, None


def entry_intact(png, entry):
    "True when a cache file exists with the size recorded in its manifest `entry` (a truncated one has another)."
    try:
        return png.stat().st_size == entry[3]
    except OSError:
        return False


def free_ram():
    "Bytes of RAM the system can still give (MemAvailable)."
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def memory_placement(nbytes, memory_budget=None, device_type="cpu", gpu_memory=None, ram=None):
    """Where presized images of `nbytes` are held: "cuda" (on the GPU), "pinned" (pinned RAM, copied to the GPU
    batch by batch), "cpu", or None (too big: read files every epoch).

    `memory_budget` is in GB: the most the images may take on the training device (None: a quarter of the
    GPU's memory, or of the free RAM on CPU). On a GPU, images over the budget go to pinned RAM when they fit
    half of the free RAM."""
    ram = free_ram() if ram is None else ram
    if device_type == "cuda":
        gpu_memory = (torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
                      if gpu_memory is None else gpu_memory)
        budget = AUTO_SHARE * gpu_memory if memory_budget is None else memory_budget * GB
        return "cuda" if nbytes <= budget else "pinned" if nbytes <= PINNED_SHARE * ram else None
    budget = AUTO_SHARE * ram if memory_budget is None else memory_budget * GB
    return "cpu" if nbytes <= budget else None


def image_sizes(files):
    "(width, height) of each image of `files`, read from the headers alone by all cores."
    def size(file):
        try:
            with Image.open(file) as image:
                return image.size
        except Exception as e:  # PIL raises many kinds for a broken file
            raise image_error(file, e) from None
    with ThreadPoolExecutor(available_cpus()) as pool:
        return list(pool.map(size, files))


def presized_bytes(files, side):
    "Bytes that `files` take as uint8 RGB once presized (shorter side `side`); only their headers are read."
    return sum(3 * width * height for width, height in (presized_shape(*size, side) for size in image_sizes(files)))


def presized_placement(files, image_size, memory_budget=None, device_type="cpu"):
    """Where the images `files`, presized to `image_size`, are held (`memory_placement`), or None: with
    `memory_budget` 0, or when they do not fit."""
    if memory_budget == 0:
        return None
    return memory_placement(presized_bytes(files, image_size), memory_budget, device_type)


def load_store(files, labels, placement):
    """Images `files` (RGB, any sizes) with their integer `labels`, held as one flat uint8 buffer of pixels and
    per-image start, height and width, on `placement` ("cuda", "pinned" or "cpu"). Decoded by all cores."""
    widths, heights = zip(*image_sizes(files), strict=True)
    counts = [w * h for w, h in zip(widths, heights, strict=True)]
    starts = [0, *np.cumsum(counts)[:-1].tolist()]
    pixels = np.empty((sum(counts), 3), dtype=np.uint8)

    def decode(i):
        try:
            with Image.open(files[i]) as image:
                pixels[starts[i]:starts[i] + counts[i]] = np.asarray(image.convert("RGB")).reshape(-1, 3)
        except IMAGE_ERRORS as e:  # damaged after its size was checked: the next run makes it anew
            raise UserError(f"presized image {files[i]} is damaged ({type(e).__name__}: {e}) — delete it and run "
                            "again: it is made anew from its source") from None
    with ThreadPoolExecutor(available_cpus()) as pool:
        list(pool.map(decode, range(len(files))))
    device = "cuda" if placement == "cuda" else "cpu"
    store = dict(pixels=torch.from_numpy(pixels), **{name: torch.tensor(values, dtype=torch.int64) for name, values
                 in dict(starts=starts, heights=heights, widths=widths, labels=labels).items()})
    store = {k: v.to(device) for k, v in store.items()}
    if placement == "pinned":
        store["pixels"] = store["pixels"].pin_memory()
    return store


def store_index(store, idxs):
    "Indices `idxs` as a tensor on the store's device."
    return torch.as_tensor(list(idxs), dtype=torch.int64).to(store["pixels"].device)


def crop_batch(store, i, size, random_position):
    """uint8 images [B, 3, size, size] of the store's images `i` (a `store_index`), cut by indexing: a `size`
    square taken along the longer side at a random position (training) or in the centre (validation), as
    fastai's `Resize` crops an image whose shorter side is already `size`."""
    device = store["pixels"].device
    heights, widths = store["heights"][i], store["widths"][i]
    # Like Resize.before_call: one uniform draw per axis and image in training, 0.5 otherwise.
    position = torch.rand(len(i), 2) if random_position else torch.full((len(i), 2), 0.5)
    position = position.to(device)
    top = ((heights - size) * position[:, 1]).long()
    left = ((widths - size) * position[:, 0]).long()
    steps = torch.arange(size, device=device)
    rows = (top[:, None] + steps)[:, :, None]
    cols = (left[:, None] + steps)[:, None, :]
    pixel = store["starts"][i][:, None, None] + rows * widths[:, None, None] + cols
    # Contiguous like fastai's collated batches (a GPU learner makes its own channels-last copy).
    return store["pixels"][pixel].permute(0, 3, 1, 2).contiguous()


def resize_side(dl):
    "The side of the square fastai's `Resize` item transform makes in `dl` (None when there is none)."
    sizes = [tfm.size for tfm in dl.after_item.fs if isinstance(tfm, Resize)]
    return sizes[0][0] if sizes else None


class PresizedDL(TfmdDL):
    """A fastai data loader whose batches are cut out of presized images held in memory (`store`) instead of
    decoded from files. The dataset, transforms, shuffling, `new`, metrics and export work as for the file
    data loader it was made from; a data loader for other items (`test_dl`, export) reads their files."""
    def __init__(self, dataset=None, store=None, **kwargs):
        self.store = store
        super().__init__(dataset, **kwargs)

    def create_batches(self, samps):
        "Batches of (images, labels) by indexing the store; the crop rule follows the dataset's split."
        size = resize_side(self)
        training = not getattr(self.dataset, "split_idx", None)  # Resize's rule: random unless split_idx is 1
        for idxs in self.chunkify(samps):
            i = store_index(self.store, idxs)
            yield (TensorImage(crop_batch(self.store, i, size, random_position=training)),
                   TensorCategory(self.store["labels"][i]))

    def new(self, dataset=None, cls=None, **kwargs):
        "The same kind of loader over the same store, or an ordinary file loader for other items."
        if dataset is not None and dataset is not self.dataset:
            return super().new(dataset, cls or TfmdDL, **{"num_workers": 0, **kwargs})
        return super().new(dataset, cls, store=self.store, **kwargs)


def presized_loader(dl, cache_root, path_folder, placement):
    """`dl` (a fastai file data loader of images under `path_folder` with a `Resize` item transform) made a
    `PresizedDL` over the cache's copies of its images, held on `placement`."""
    files = [cache_root / f"{Path(item).relative_to(path_folder).as_posix()}.png" for item in dl.dataset.items]
    labels = [int(dl.dataset.tls[1][i]) for i in range(len(dl.dataset))]
    store = load_store(files, labels, placement)
    return dl.new(cls=PresizedDL, store=store, num_workers=0, pin_memory=False)


def describe_stores(dls):
    "How much memory the presized images of `PresizedDL` loaders take together, and where."
    pixels = [dl.store["pixels"] for dl in dls]
    where = "pinned RAM" if pixels[0].is_pinned() else "GPU" if pixels[0].is_cuda else "RAM"
    return f"{sum(p.numel() for p in pixels) / GB:.3f} GB in {where}"


class ParallelDecodeDL(TfmdDL):
    """A fastai data loader that decodes and transforms every image as its own task on `decoders` worker
    processes, then batches them in order: all cores stay busy whatever the batch size (a standard loader
    gives each worker a whole batch, so a large batch leaves most cores idle)."""
    def __init__(self, dataset=None, decoders=None, **kwargs):
        self.decoders = decoders or available_cpus()
        super().__init__(dataset, **kwargs)

    def create_batches(self, samps):
        "Items decoded one by one in the workers (in order), collated into batches here."
        samps = list(samps)
        items = torch.utils.data.DataLoader(DecodedItems(self, samps), batch_size=None, collate_fn=as_decoded,
                                            num_workers=self.decoders,
                                            prefetch_factor=max(2, math.ceil(2 * (self.bs or 1) / self.decoders)))
        yield from map(self.do_batch, self.chunkify(items))


class DecodedItems(torch.utils.data.Dataset):
    "The items `samps` of a fastai data loader, each decoded and transformed by the loader's item pipeline."
    def __init__(self, dl, samps):
        self.dl, self.samps = dl, samps

    def __len__(self):
        return len(self.samps)

    def __getitem__(self, i):
        return self.dl.do_item(self.samps[i])


def as_decoded(item):
    "An item as its worker made it (torch's default would turn tuples into lists)."
    return item


def parallel_decode(dl, decoders=None):
    "A `ParallelDecodeDL` over the same items and transforms as the fastai data loader `dl`."
    decoders = min(decoders or available_cpus(), max(1, len(dl.dataset)))
    return dl.new(cls=ParallelDecodeDL, decoders=decoders, num_workers=0)
