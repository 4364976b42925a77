"""Extended DA: the original's 14 imgaug augmentation groups, written beside every image or into a mirrored copy.

imgaug is imported here only (`imgaug_augmenters`, with its NumPy 2 shim), and only when images are augmented,
so that the augmentation script answers --help and refuses bad options in well under a second.
"""
import hashlib
import math
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from papsmear.files import (
    IMAGE_EXTENSIONS,
    RUN_RECORD,
    UserError,
    atomic_output,
    available_cpus,
    check_not_negative,
    copy_atomically,
    is_augmentation,
    is_inside,
    is_partial,
    is_sample_image,
    progress_bar,
    recorded_runs,
    remove_partials,
    same_file_content,
    sample_images,
    source_stem,
    user_path,
)

QUANTISATION_SIZE = 128  # imgaug's default: KMeansColorQuantization clusters the colours of a copy this long


def imgaug_augmenters():
    """imgaug's augmenters module. imgaug 0.4.0 reads np.sctypes at import time, and NumPy 2 removed it. Every
    import of imgaug in this project goes through here, so this is the one place that puts the table back
    (nothing else of NumPy is touched: imgaug's np.bool is NumPy 2's own bool type)."""
    if not hasattr(np, "sctypes"):
        np.sctypes = {"int": [np.int8, np.int16, np.int32, np.int64],
                      "uint": [np.uint8, np.uint16, np.uint32, np.uint64],
                      "float": [np.float16, np.float32, np.float64, np.longdouble],
                      "complex": [np.complex64, np.complex128, np.clongdouble],
                      "others": [bool, object, bytes, str, np.void]}
    import imgaug.augmenters

    return imgaug.augmenters


def augmentation_groups():
    "The 14 augmentation groups of the original, in its order; each makes one image from one image."
    iaa = imgaug_augmenters()
    colour = iaa.SomeOf(2, [iaa.CLAHE(tile_grid_size_px=((3, 21), [0, 2, 3, 4, 5, 6, 7])),
                            iaa.CLAHE(clip_limit=(1, 10)),
                            iaa.CLAHE(tile_grid_size_px=(3, 21)),
                            iaa.GammaContrast((0.5, 2.0)),
                            iaa.AllChannelsCLAHE(),
                            iaa.AllChannelsCLAHE(clip_limit=(1, 10), per_channel=True)], random_order=True)
    stain = iaa.OneOf([iaa.ChannelShuffle(),
                       iaa.Grayscale(),
                       iaa.MultiplyHueAndSaturation((0.5, 1.5), per_channel=True),
                       iaa.AddToHueAndSaturation((-50, 50), per_channel=True),
                       iaa.KMeansColorQuantization(n_colors=(4, 16))])
    return [
        iaa.SomeOf(2, [iaa.Affine(rotate=(-90, 90)),
                       iaa.Affine(scale={"x": (0.5, 0.9), "y": (0.5, 0.9)}),
                       iaa.Affine(translate_percent={"x": (-0.15, 0.15), "y": (-0.15, 0.15)}),
                       iaa.Affine(shear=(-2, 2)),
                       iaa.Fliplr(),
                       iaa.Flipud()], random_order=True),
        colour,
        colour.deepcopy(),
        iaa.OneOf([iaa.EdgeDetect(alpha=(0, 0.7)), iaa.DirectedEdgeDetect(alpha=(0, 0.7), direction=(0, 1))]),
        iaa.Sharpen(alpha=(0, 1), lightness=(0.75, 1.5)),
        iaa.OneOf([iaa.Canny(), iaa.Canny(alpha=(0.5, 1), sobel_kernel_size=[3, 7])]),
        # Images are RGB here, so channel 0 is red (the original read BGR, and its "red" was blue).
        iaa.WithChannels(0, iaa.Add((10, 100))),
        iaa.WithChannels(1, iaa.Add((10, 100))),
        iaa.WithChannels(2, iaa.Add((10, 100))),
        iaa.OneOf([iaa.GaussianBlur(sigma=(0, 1.22)),
                   iaa.AdditiveGaussianNoise(scale=0.111 * 255, per_channel=True),
                   iaa.AdditiveLaplaceNoise(scale=(0, 0.111 * 255))]),
        stain,
        stain.deepcopy(),
        iaa.OneOf([iaa.HistogramEqualization(), iaa.Flipud(), iaa.Fliplr()]),
        iaa.OneOf([iaa.LinearContrast((0.75, 1.5)),
                   iaa.Multiply((0.35, 1.65)),
                   iaa.Multiply((0.5, 1.5), per_channel=0.75)]),
    ]


def group_seed(seed, relative_path, group_index):
    "The seed of one (image, group): stable across runs, machines and worker counts."
    digest = hashlib.sha256(f"{seed}/{relative_path}/{group_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def keep_a_row(groups, shape):
    """Let colour quantisation, which shrinks an image to `max_size` pixels on its longer side before it
    clusters the colours, keep at least one pixel on the shorter side of a very elongated image (2000x10)."""
    needed = math.ceil(max(shape[:2]) / min(shape[:2]))
    iaa = imgaug_augmenters()
    for group in groups:
        for quantisation in group.find_augmenters(lambda aug, parents: isinstance(aug, iaa.KMeansColorQuantization)):
            quantisation.max_size = max(QUANTISATION_SIZE, needed)


def augment_image(image, groups, seed, relative_path):
    "Yield (group number from 1, augmented image) for an RGB uint8 array, one output per group."
    keep_a_row(groups, image.shape)
    for index, group in enumerate(groups, start=1):
        group.seed_(group_seed(seed, relative_path, index))
        yield index, group.augment_image(image)  # lighter than group(image=...), which wraps a whole batch


def output_path(source, index, suffix=None):
    "Where group `index`'s output of `source` goes: <stem>_augNN<suffix>, by default the source's extension."
    return source.with_name(f"{source.stem}_aug{index:02d}{suffix or source.suffix}")


def save_atomically(array, path):
    "Write through a temporary name, so an interrupted run never leaves a half-written image."
    with atomic_output(path) as tmp:
        # quality only matters to JPEG; the lossless formats ignore it
        Image.fromarray(array).save(tmp, format=Image.registered_extensions()[path.suffix.lower()], quality=95)


def load_rgb(path):
    """Read an image as a 3-channel uint8 RGB array (grayscale and RGBA are converted). A 16-bit or float
    image is refused: PIL's conversion to 8 bits would clip it to white."""
    with Image.open(path) as image:
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            raise ValueError(f"a {'float' if image.mode == 'F' else '16-bit'} image (PIL mode {image.mode}) — "
                             "convert it to 8 bits per channel first")
        return np.asarray(image.convert("RGB"))


def image_roots(target_directory, splits):
    "The folders to augment: the chosen splits of a formatted root, or the class folders' parent itself."
    target = Path(target_directory)
    return [target / s for s in splits] if any((target / s).is_dir() for s in ("train", "val", "test")) else [target]


def list_images(target_directory, splits):
    "The source images to augment (in linked class folders too): never augmentation outputs, masks or non-images."
    return sorted(p for root in image_roots(target_directory, splits) if root.is_dir()
                  for p in sample_images(root) if p.is_file() and not is_augmentation(p))


def check_collisions(images, suffix):
    "Refuse two sources that would write the same outputs (a.bmp and a.png with one output_format)."
    if suffix is None:
        return
    owners = {}
    for image in images:
        other = owners.setdefault(output_path(image, 1, suffix), image)
        if other != image:
            raise UserError(f"{other.name} and {image.name} in {image.parent} would both write "
                            f"{output_path(image, 1, suffix).stem[:-2]}NN{suffix} — rename one of them, or leave "
                            "output_format unset so that each output keeps its source's format")


_groups = None


def _init_worker():
    global _groups
    _groups = augmentation_groups()


def augment_file(job):
    "Worker: write the missing outputs of one image. Returns (outputs written, error message or None)."
    path, relative_path, n_augmentations, seed, suffix = job
    try:
        image = load_rgb(path)
        # All groups first: one that cannot handle the image (a side that shrinks to 0 pixels in a very
        # elongated image) skips the whole image rather than leaving it half augmented.
        outputs = list(augment_image(image, _groups[:n_augmentations], seed=seed, relative_path=relative_path))
    except Exception as e:  # PIL and imgaug raise many kinds for a broken file; the run goes on without it
        return 0, f"{relative_path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    written = 0
    for index, augmented in outputs:
        target = output_path(path, index, suffix)
        if not target.exists():
            save_atomically(augmented, target)
            written += 1
    return written, None


def target_folder(target_directory):
    "The user's target_directory as an absolute path; refused when it is not a folder."
    target = user_path(target_directory)
    if not target.is_dir():
        raise UserError(f"target_directory {target} is not a folder — set it to a formatted dataset or class folders")
    return target


DERIVED = ("models", "cache")  # top-level folders of a dataset that hold results made from it, not samples


def dataset_files(folder):
    """The files of a dataset folder that its copy mirrors: all but the models/ and cache/ folders, the folder's
    run record and the temporary files of the runs it names."""
    runs = recorded_runs(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != RUN_RECORD and not is_partial(p, runs)
                  and p.relative_to(folder).parts[0] not in DERIVED)


def stale_images(source, copy):
    """Images of `copy` that do not mirror `source`: absent from it or holding other bytes, and Extended DA
    outputs of such images or of images `source` does not have. A copy of another division holds them."""
    originals = {(p.relative_to(source).parent, p.stem) for p in dataset_files(source) if is_sample_image(p)}
    images = [p for p in dataset_files(copy) if is_sample_image(p)]
    stale = [p for p in images if not is_augmentation(p)
             and not same_file_content(p, source / p.relative_to(copy))]
    mirrored = originals.difference((p.relative_to(copy).parent, p.stem) for p in stale)
    return stale + [p for p in images if is_augmentation(p)
                    and (p.relative_to(copy).parent, source_stem(p)) not in mirrored]


def copy_dataset(source, destination, force=False, progress=True):
    """Make `destination` mirror the dataset `source` (which is only read): copy what is missing, and the
    non-image files (split.csv) that differ. Images of the copy that do not mirror the source (`stale_images`)
    are refused, or removed with `force`. Each copy is atomic, so a killed copy is redone by the next run.

    Returns (destination, images removed)."""
    source, destination = target_folder(source), user_path(destination)
    if is_inside(destination, source) or is_inside(source, destination):
        raise UserError(f"output_directory {destination} and target_directory {source} lie one inside the other "
                        "— choose an output_directory outside the dataset")
    stale = stale_images(source, destination) if destination.is_dir() else []
    if stale and not force:
        examples = ", ".join(str(p.relative_to(destination)) for p in stale[:3])
        raise UserError(f"output_directory {destination} holds {len(stale)} image(s) that are not in "
                        f"target_directory {source} (e.g. {examples}): a copy of another division, whose images "
                        "may now be test images — pass --force to remove them from the copy, or choose an empty "
                        "output_directory")
    for image in stale:
        image.unlink()
    remove_partials(destination)
    for path in progress_bar(dataset_files(source), desc="copy", unit="file", disable=not progress):
        target = destination / path.relative_to(source)
        if not target.exists() or not (is_sample_image(path) or same_file_content(path, target)):
            copy_atomically(path, target)
    return destination, stale


def extend_dataset(target_directory, n_augmentations=14, seed=42, workers=None, splits=("train",),
                   output_format=None, progress=True):
    """Augment every source image under `target_directory` with the first `n_augmentations` groups.

    Returns a summary dict: found, augmented (images with new outputs), written, skipped (unreadable
    images, listed in `errors`) and seconds.
    """
    if not 1 <= n_augmentations <= 14:
        raise UserError(f"n_augmentations is {n_augmentations}; it must be between 1 and 14")
    check_not_negative(workers=workers)
    suffix = f".{output_format.lstrip('.').lower()}" if output_format else None
    if suffix and suffix not in IMAGE_EXTENSIONS:
        raise UserError(f"output_format {output_format} is not one of {', '.join(e[1:] for e in IMAGE_EXTENSIONS)}")
    target = target_folder(target_directory)
    images = list_images(target, splits)
    if not images:
        raise UserError(f"no images found under {target} (splits {list(splits)}) — is target_directory right?")
    check_collisions(images, suffix)
    remove_partials(target)  # a killed run's half-written outputs, of any group
    done = [p for p in images if all(output_path(p, i, suffix).exists() for i in range(1, n_augmentations + 1))]
    todo = sorted(set(images) - set(done))
    jobs = [(p, p.relative_to(target).as_posix(), n_augmentations, seed, suffix) for p in todo]
    start, written, augmented, errors = time.perf_counter(), 0, 0, []
    with Pool(max(1, min(workers or available_cpus(), len(jobs) or 1)), initializer=_init_worker) as pool:
        results = pool.imap_unordered(augment_file, jobs, chunksize=1)
        for count, error in progress_bar(results, total=len(jobs), desc="augment", unit="img", disable=not progress):
            written += count
            augmented += count > 0
            if error:
                errors.append(error)
    return dict(found=len(images), already_done=len(done), augmented=augmented, written=written,
                skipped=len(errors), errors=errors, seconds=round(time.perf_counter() - start, 2))
