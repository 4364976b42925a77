"""Nuclei in a smear field: where they are, their outlines and areas, found with scikit-image.

1. Scale: the field is resized so that a typical nucleus is `WORKING_DIAMETER` pixels across (the scale of the
   annotated fields the candidate scores were fitted on), whatever the microscope's.
2. Darkness: 1 - luminance / background, the background being the bright glass (the field's 95th percentile of
   luminance), so grayscale and RGB fields, pale and dark ones, are measured alike.
3. Candidates: the maxima of the scale-normalised Laplacian of Gaussian at the nucleus scale (a blob detector).
4. Each candidate's nucleus: the pixels within 1.5 radii darker than halfway between its core and the cytoplasm
   around it; touching nuclei are split by a watershed between their candidates.
5. Scores: a logistic regression over features of each candidate (its contrast to the cytoplasm around it,
   whether that is cytoplasm or bare glass, its size, solidity and blob responses at three scales), fitted on
   real annotated fields (benchmarks/detection.py --fit writes `nucleus_model.json`). Candidates scoring at least
   the model's threshold are nuclei; the rest (cell borders, folds, inflammatory cells on the glass, debris) are
   not.

Large fields are cut into overlapping tiles; a nucleus whose centre lies in a tile's own part (its overlap
shared with the next tile cut in half) is counted by that tile only. Nothing here imports torch.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from papsmear.files import UserError

WORKING_DIAMETER = 18.0  # nucleus diameter (pixels) detection works at: the ISBI 2014 fields' median nucleus
MODEL_FILE = Path(__file__).resolve().parent / "nucleus_model.json"
TILE_SIDE = 1536  # working-resolution tile side; larger fields are cut into tiles of this size
BACKGROUND_PERCENTILE = 95  # the glass: the brightest few percent of a field
FEATURES = ("blob", "blob_small", "blob_large", "core", "cytoplasm", "cytoplasm_bright", "cytoplasm_dark",
            "cytoplasm_glass", "area", "solidity", "eccentricity", "texture", "lobes", "darkest")
DIAMETER_RANGE = (3.0, 1000.0)  # a typical nucleus outside this many pixels is a wrong scale, not a field


@dataclass
class Nuclei:
    """The nuclei found in one field: per nucleus (rows of `table`) its centre, area and box in the field's own
    pixels, and its score; `labels` is the working-resolution label image (0 background, k nucleus k) and
    `scale` the factor from working to field pixels."""
    table: object   # pandas DataFrame: x, y, area, left, top, right, bottom, score
    labels: np.ndarray
    scale: float


def check_diameter(nucleus_diameter, field_size=None, options="--nucleus-diameter (pixels) or --pixel-size-um "
                   "(micrometres per pixel)"):
    """Refuse a typical nucleus diameter that cannot be right: 0, negative, absurdly large, or larger than the field;
    the message names the `options` that set it."""
    low, high = DIAMETER_RANGE
    if not low <= nucleus_diameter <= high or (field_size and nucleus_diameter > min(field_size) / 2):
        raise UserError(f"a typical nucleus of {nucleus_diameter:g} pixels cannot be right for these fields (it must "
                        f"lie between {low:g} and {high:g} pixels, and fit the field twice) — set {options} to the "
                        "images' scale")
    return float(nucleus_diameter)


def load_model(path=MODEL_FILE):
    "The candidate scores' logistic regression: feature means and scales, coefficients, intercept, threshold."
    model = json.loads(Path(path).read_text())
    if tuple(model["features"]) != FEATURES:
        raise UserError(f"{path} scores other features than this version measures — fit it again with "
                        "benchmarks/detection.py --fit")
    return model


def darkness(pixels, background=None):
    "(1 - luminance / background, background): 0 on the glass, towards 1 on the darkest stain."
    luminance = pixels.astype(np.float32) if pixels.ndim == 2 else (
        pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    background = background or max(float(np.percentile(luminance[::4, ::4], BACKGROUND_PERCENTILE)), 1.0)
    return np.clip(1 - luminance / background, -0.2, 1), background


def working_image(image, nucleus_diameter):
    "(the field as a uint8 array resized to the working scale, the factor from working to field pixels)."
    scale = nucleus_diameter / WORKING_DIAMETER
    if abs(scale - 1) > 0.02:
        size = (max(1, round(image.width / scale)), max(1, round(image.height / scale)))
        image = image.resize(size, Image.BILINEAR)
    return np.asarray(image), scale


def blob_responses(dark):
    "Scale-normalised Laplacian-of-Gaussian responses at the nucleus scale, half of it and twice it."
    sigma = WORKING_DIAMETER / 2 / math.sqrt(2)
    return [-(s ** 2) * ndi.gaussian_laplace(dark, s) for s in (sigma, sigma / 2, sigma * 2)]


def candidate_peaks(blob, blob_small, spacing):
    "(nucleus-scale maxima, small-scale maxima) of the blob responses, as (row, column) arrays."
    from skimage.feature import peak_local_max

    return (peak_local_max(blob, min_distance=spacing, threshold_abs=0.03, exclude_border=False),
            peak_local_max(blob_small, min_distance=2, threshold_abs=0.03, exclude_border=False))


def window_masks(radius):
    "Boolean masks over a (2R+1)² window: the core, the cytoplasm annulus, the nucleus neighbourhood, the lobe disk."
    reach = int(4 * radius)
    rows, cols = np.mgrid[-reach:reach + 1, -reach:reach + 1]
    distance = np.hypot(rows, cols)
    return reach, dict(core=distance <= 0.5 * radius, ring=(distance >= 2 * radius) & (distance <= 3.5 * radius),
                       near=distance <= 1.5 * radius, lobe=distance <= radius)


def candidate_features(dark, peaks, small_peaks, responses):
    """(features [n, len(FEATURES)], blob mask of each candidate in its window) of nucleus candidates: what tells a
    nucleus in its cell from a border, a fold, an inflammatory cell on the glass or debris."""
    from skimage.measure import regionprops

    radius = WORKING_DIAMETER / 2
    reach, masks = window_masks(radius)
    light = np.pad(1 - dark, reach, mode="reflect")
    lobes = np.zeros(dark.shape, bool)
    lobes[tuple(small_peaks.T)] = True
    lobes = np.pad(lobes, reach)
    rows, blobs = [], []
    for y, x in peaks:
        window = light[y:y + 2 * reach + 1, x:x + 2 * reach + 1]
        core, ring = window[masks["core"]].mean(), window[masks["ring"]]
        cytoplasm = float(np.median(ring))
        blob = (window < (core + cytoplasm) / 2) & masks["near"]
        parts, _ = ndi.label(blob)
        blob = parts == parts[reach, reach] if parts[reach, reach] else np.zeros_like(blob)
        shape = regionprops(blob.astype(np.uint8))
        area, solidity, eccentricity = ((shape[0].area, shape[0].solidity, shape[0].eccentricity) if shape
                                        else (0.0, 0.0, 1.0))
        rows.append([*(r[y, x] for r in responses), core, cytoplasm, np.percentile(ring, 90), np.percentile(ring, 10),
                     float((ring > 0.93).mean()), area / (math.pi * radius ** 2), solidity, eccentricity,
                     float(window[masks["near"]].std()),
                     float(lobes[y:y + 2 * reach + 1, x:x + 2 * reach + 1][masks["lobe"]].sum()),
                     float(np.percentile(window[masks["near"]], 5))])
        blobs.append(blob)
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(FEATURES)), blobs


def scores(features, model):
    "The model's probability that each candidate is a nucleus."
    z = (features - np.array(model["mean"])) / np.array(model["scale"])
    return 1 / (1 + np.exp(-(z @ np.array(model["coefficients"]) + model["intercept"])))


def nucleus_labels(dark, peaks, blobs, shape):
    """A label image of the accepted candidates' nuclei: each candidate's blob, pixels claimed by two split by a
    watershed on the darkness from their candidates."""
    from skimage.segmentation import watershed

    reach = blobs[0].shape[0] // 2 if blobs else 0
    union = np.zeros((shape[0] + 2 * reach, shape[1] + 2 * reach), bool)
    markers = np.zeros(union.shape, np.int32)
    for k, ((y, x), blob) in enumerate(zip(peaks, blobs, strict=True), start=1):
        union[y:y + 2 * reach + 1, x:x + 2 * reach + 1] |= blob
        markers[y + reach, x + reach] = k
    elevation = np.pad(-dark, reach, mode="edge")
    labels = watershed(elevation, markers, mask=union | (markers > 0))
    return labels[reach:reach + shape[0], reach:reach + shape[1]]


def measure_candidates(dark):
    "(peaks, features, blobs) of the nucleus candidates of a working-resolution image of darkness."
    responses = blob_responses(dark)
    peaks, small = candidate_peaks(responses[0], responses[1], spacing=int(WORKING_DIAMETER / 2))
    features, blobs = candidate_features(dark, peaks, small, responses)
    return peaks, features, blobs


def field_candidates(image, nucleus_diameter):
    """(centres in the field's pixels [n, 2] as (x, y), features [n, len(FEATURES)]) of every nucleus candidate of a
    field, before scoring: what the nucleus model is fitted on (benchmarks/detection.py --fit)."""
    pixels, scale = working_image(image, check_diameter(nucleus_diameter, image.size))
    peaks, features, _ = measure_candidates(darkness(pixels)[0])
    return (peaks[:, ::-1] + 0.5) * scale - 0.5, features


def detect_tile(dark, model):
    "(peaks, scores, labels) of one working-resolution tile of darkness."
    peaks, features, blobs = measure_candidates(dark)
    if len(peaks) == 0:
        return peaks, np.zeros(0), np.zeros(dark.shape, np.int32)
    probability = scores(features, model)
    kept = probability >= model["threshold"]
    peaks, blobs = peaks[kept], [b for b, k in zip(blobs, kept, strict=True) if k]
    labels = nucleus_labels(dark, peaks, blobs, dark.shape) if len(peaks) else np.zeros(dark.shape, np.int32)
    return peaks, probability[kept], labels


def tiles(shape, side=TILE_SIDE, overlap=None):
    """(window, own part) slices of overlapping tiles covering a working image: each window reaches `overlap`
    beyond its own part, and the own parts tile the image without overlap."""
    overlap = overlap or int(8 * WORKING_DIAMETER)
    cuts = [list(range(0, size, side)) for size in shape]
    for top in cuts[0]:
        for left in cuts[1]:
            own = (slice(top, min(top + side, shape[0])), slice(left, min(left + side, shape[1])))
            window = tuple(slice(max(s.start - overlap, 0), min(s.stop + overlap, size))
                           for s, size in zip(own, shape, strict=True))
            yield window, own


def find_nuclei(image, nucleus_diameter, model=None, tile_side=TILE_SIDE):
    """The nuclei of a field (a PIL image, grayscale or colour) whose typical nucleus is `nucleus_diameter` pixels
    across: a `Nuclei` with each one's centre, area, box and score in the field's pixels, and the label image.
    Fields larger than `tile_side` working pixels are measured tile by tile."""
    import pandas as pd
    from skimage.measure import regionprops

    model = model or load_model()
    check_diameter(nucleus_diameter, image.size)
    pixels, scale = working_image(image, nucleus_diameter)
    dark, _ = darkness(pixels)
    labels = np.zeros(dark.shape, np.int32)
    found = []
    for window, own in tiles(dark.shape, tile_side):
        peaks, probability, tile_labels = detect_tile(dark[window], model)
        offset = np.array([window[0].start, window[1].start])
        for k, (peak, p) in enumerate(zip(peaks + offset, probability, strict=True), start=1):
            if own[0].start <= peak[0] < own[0].stop and own[1].start <= peak[1] < own[1].stop:
                found.append(p)
                region = tile_labels == k
                labels[window][region & (labels[window] == 0)] = len(found)
    rows = []
    for region in regionprops(labels):
        top, left, bottom, right = region.bbox
        y, x = region.centroid
        rows.append(dict(x=(x + 0.5) * scale - 0.5, y=(y + 0.5) * scale - 0.5, area=region.area * scale ** 2,
                         left=left * scale, top=top * scale, right=right * scale, bottom=bottom * scale,
                         score=found[region.label - 1], label=region.label))
    table = pd.DataFrame(rows, columns=["x", "y", "area", "left", "top", "right", "bottom", "score", "label"])
    return Nuclei(table=table, labels=labels, scale=scale)
