"""Extended DA: write 14 imgaug augmentations beside every image (<stem>_aug01.<ext> … _aug14.<ext>).

Each output depends only on (seed, the image's relative path, the group), so reruns and any number of
workers give the same files; a rerun only writes what is missing.
"""
import warnings
from pathlib import Path
from typing import Annotated

from fastcore.script import call_parse

from papsmear import augment
from papsmear.files import available_cpus, one_line_usage_errors, user_errors

# --- edit these -----------------------------------------------------------------------------------
target_directory = Path("data/sipakmed_formatted")  # class folders, or a formatted root (train/val/test)
output_directory = None      # None: write beside the originals; a path: copy the dataset there, augment the copy
n_augmentations = 14         # how many of the 14 groups to apply, in order
seed = 42                    # same seed, same augmented images
workers = available_cpus()   # processes that augment in parallel (default: all available cores)
splits = ["train"]           # formatted root: the splits to augment (val/test would leak into evaluation)
output_format = None         # None: each source's own format; "jpg" (as the original) saves disk on BMP sources
force = False                # output_directory: remove the copy's images that are not in target_directory
# ---------------------------------------------------------------------------------------------------

one_line_usage_errors()


@call_parse
def main(target_directory: Path = target_directory,  # class folders, or a formatted root (train/val/test)
         output_directory: Path = output_directory,  # copy the dataset here and augment the copy (default: in place)
         n_augmentations: int = n_augmentations,     # how many of the 14 groups to apply, in order
         seed: int = seed,                           # same seed, same augmented images
         workers: int = workers,                     # processes that augment in parallel (0: one per core)
         splits: Annotated[list, {"nargs": "+", "type": str}] = splits,  # formatted root: splits to augment
         output_format: str = output_format,         # e.g. jpg (default: each source's own format)
         force: bool = force):                       # remove the copy's images that are not in target_directory
    "Write the Extended DA dataset: 14 imgaug augmentations beside every training image."
    with user_errors():
        if set(splits) - {"train"}:
            warnings.warn(f"augmenting {sorted(set(splits) - {'train'})}: augmented copies of evaluation "
                          "images make validation/test scores optimistic", stacklevel=1)
        if output_directory is not None:
            target_directory, removed = augment.copy_dataset(target_directory, output_directory, force=force)
            if removed:
                print(f"removed {len(removed)} image(s) of another division from {target_directory}")
        summary = augment.extend_dataset(target_directory, n_augmentations=n_augmentations, seed=seed, workers=workers,
                                         splits=splits, output_format=output_format)
        for error in summary["errors"]:
            print(f"skipped image {error}")
        print(f"images found {summary['found']}, augmented {summary['augmented']}, already done "
              f"{summary['already_done']}, skipped {summary['skipped']}: {summary['written']} new outputs "
              f"in {summary['seconds']} s")
        print(f"Next: train R50.py on {target_directory} (the Extended DA dataset)")
        if summary["skipped"]:
            raise SystemExit(1)
