"""Extended DA speed: the original algorithm (each group applied to 14 copies, one kept) against
implementation_DataAugmentation_Extension.py with 1 worker and with all workers, on the same images.

Also reports the peak memory of one worker on images of the given size. Run by hand:
    .venv/bin/python benchmarks/augmentation_speed.py --n-images 10 --width 2048 --height 1536
"""
import resource
import shutil
import sys
import tempfile
from multiprocessing import Pool
from pathlib import Path

from fastcore.script import call_parse

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "demo")]
import synthetic_papsmear as demo  # noqa: E402
from papsmear import augment as extension  # noqa: E402
from timing import timed  # noqa: E402


def augment_like_the_original(folder, seed=42):
    "The original's loop: every group augments a batch of 14 copies of the image and one result is kept."
    groups = extension.augmentation_groups()
    for path in extension.list_images(folder, ["train"]):
        image = extension.load_rgb(path)
        for index, group in enumerate(groups, start=1):
            group.seed_(extension.group_seed(seed, path.name, index))
            kept = group.augment_images([image] * len(groups))[index - 1]
            extension.save_atomically(kept, extension.output_path(path, index))


def worker_memory(path):
    "(RSS at start, peak RSS) in MB of a worker process that augments one image 14 times."
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extension._init_worker()
    extension.augment_file((path, path.name, 14, 42, None))
    return start / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@call_parse
def main(n_images: int = 10,    # source images (each gets 14 augmentations)
         width: int = 2048,     # image width (real SIPaKMeD cluster images: 2048)
         height: int = 1536,    # image height (real: 1536)
         workers: int = None):  # the "all workers" run (default: all available cores)
    "Print images/s of the original algorithm, of this script with 1 worker and all workers, and the ratios."
    workers = workers or extension.available_cpus()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        demo.generate_sipakmed(source / "raw", n_images=-(-n_images // 5), width=width, height=height)
        (source / "train").mkdir()
        for path in sorted(source.glob("raw/im_*/im_*/*.bmp"))[:n_images]:
            shutil.copy(path, source / "train" / f"{path.parent.name}_{path.name}")
        shutil.rmtree(source / "raw")
        runs = {}
        for name in ("original", "1 worker", f"{workers} workers"):
            folder = shutil.copytree(source, Path(tmp) / name.replace(" ", "_"))
            if name == "original":
                runs[name] = timed(augment_like_the_original, folder)[0]
            else:
                runs[name] = timed(extension.extend_dataset, folder, workers=int(name.split()[0]), progress=False)[0]
            shutil.rmtree(folder)
        one = shutil.copytree(source, Path(tmp) / "memory")
        with Pool(1) as pool:
            start_mb, peak_mb = pool.apply(worker_memory, (sorted(one.rglob("*.bmp"))[0],))
    print(f"{n_images} images of {width}x{height}, 14 augmentations each, {extension.available_cpus()} cores")
    print(f"{'run':<12} {'seconds':>8} {'images/s':>9} {'vs original':>12}")
    for name, seconds in runs.items():
        print(f"{name:<12} {seconds:8.2f} {n_images / seconds:9.3f} {runs['original'] / seconds:11.1f}x")
    print(f"{workers} workers vs 1 worker: {runs['1 worker'] / runs[f'{workers} workers']:.2f}x")
    print(f"one worker augmenting one {width}x{height} image: peak {peak_mb:.0f} MB resident, "
          f"{peak_mb - start_mb:.0f} MB more than at its start (the rest is the shared interpreter and libraries)")
