"""A strongly imbalanced real cell set made from the Herlev cells, for measuring the imbalance options where they
matter: the normal classes are kept whole, each abnormal class is subsampled (seeded) to about a tenth of a
normal class, as screening data is mostly normal. The set is written as a raw class-folder dataset and divided
by implementation_DatasetDivision.py's rule into a folder of its own; then measure it with accuracy.py:

    python benchmarks/imbalanced_herlev.py --herlev ../shared/data/herlev --out ../herlev_imbalanced
    python benchmarks/accuracy.py --path-folder ../herlev_imbalanced/formatted --recipes original \\
        --balances none inverse sqrt sampler --monitors accuracy balanced_accuracy --seeds 0 1 2 \\
        --epochs 30 --image-size 64 --target-sensitivity 0.95
"""
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastcore.script import call_parse  # noqa: E402

from papsmear import division  # noqa: E402
from papsmear.files import UserError, class_names, sample_images, user_errors, user_path  # noqa: E402
from papsmear.screening import known_abnormal  # noqa: E402


def subsample(classes, abnormal, ratio, seed):
    """{class: images kept}: every image of a normal class, and of each abnormal class a seeded draw of the mean
    normal class's size divided by `ratio` (at least 5, so that a division still gives it a test image)."""
    normal = [c for c in classes if c not in abnormal]
    keep = max(5, round(sum(len(classes[c]) for c in normal) / len(normal) / ratio))
    rng = random.Random(seed)
    return {name: (sorted(rng.sample(files, min(keep, len(files)))) if name in abnormal else files)
            for name, files in classes.items()}


@call_parse
def main(herlev: Path = Path("../shared/data/herlev"),  # Herlev cells in class folders (7 classes)
         out: Path = Path("../herlev_imbalanced"),      # receives raw/ (the subsample) and formatted/ (divided)
         ratio: float = 10.0,                           # a normal class is this many times an abnormal one
         seed: int = 0):                                # seed of the subsample (and of nothing else)
    "Make the imbalanced Herlev set: normal classes whole, abnormal classes subsampled to 1/ratio, then divided."
    with user_errors():
        herlev, out = user_path(herlev), user_path(out)
        names = class_names(herlev) if herlev.is_dir() else []
        abnormal = known_abnormal(names)
        if not abnormal:
            raise UserError(f"{herlev} does not hold Herlev's 7 class folders — set --herlev to them")
        if (out / "raw").exists():
            raise UserError(f"{out / 'raw'} exists — choose another --out (nothing is replaced)")
        kept = subsample({name: sample_images(herlev / name) for name in names}, abnormal, ratio, seed)
        for name, files in kept.items():
            (out / "raw" / name).mkdir(parents=True)
            for file in files:
                shutil.copy2(file, out / "raw" / name / file.name)
        table, _, _ = division.divide_dataset(out / "raw", out / "formatted", progress=False)
        print(table.to_string())
        counts = {name: len(files) for name, files in kept.items()}
        print(f"normal classes whole, abnormal ({', '.join(abnormal)}) subsampled to {min(counts.values())} each: "
              f"largest class {max(counts.values())} / smallest {min(counts.values())} = "
              f"{max(counts.values()) / min(counts.values()):.1f}×; {sum(counts[c] for c in abnormal)} abnormal "
              f"against {sum(v for c, v in counts.items() if c not in abnormal)} normal cells")
        print(f"Next: python benchmarks/accuracy.py --path-folder {out / 'formatted'} --recipes original --balances "
              "none inverse sqrt sampler --monitors accuracy balanced_accuracy --seeds 0 1 2 --epochs 30 "
              "--image-size 64 --target-sensitivity 0.95")
