"""Nucleus detection measured against annotations: precision, recall and F1 (detected and annotated centres matched
one to one by the Hungarian method, within half the median annotated nucleus diameter), and the Dice of the
matched nuclei; per field and overall. With --fit, it fits the candidate scores' logistic regression on the
fields instead (papsmear/nucleus_model.json), together with --synthetic fields drawn by the demo generator (whose
koilocytes show the perinuclear halo that real fields of normal cells lack), and reports each field's figures
with the model fitted on the other fields (leave one field out), so every figure is measured on a field the
model did not see.

Annotations, matched to a field by its stem:
- a mask image per field in --masks (EDF000.png ↔ EDF000_GT.png or EDF000.png): binary (nuclei white, filled or
  as closed outlines) or labelled (one value per nucleus);
- SIPaKMeD-style boundaries NNN_nucKK.dat beside NNN.bmp (the demo's synthetic fields have them too).

    python benchmarks/detection.py --fields ../shared/data/isbi2014_fields --masks ../shared/data/isbi2014_fields \\
        --nucleus-diameter 18
    python benchmarks/detection.py --fields demo_output/fields --nucleus-diameter 24
    python benchmarks/detection.py --fields ../shared/data/isbi2014_fields --masks ../shared/data/isbi2014_fields \
        --nucleus-diameter 18 --fit --synthetic 6
"""
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from fastcore.script import call_parse  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "demo"))
import synthetic_papsmear as demo  # noqa: E402
from papsmear import nuclei  # noqa: E402
from papsmear.files import UserError, atomic_output, sample_images, user_errors, user_path  # noqa: E402

DAT = re.compile(r"^(?P<stem>.+)_nuc\d+\.dat$")


def mask_for(field, masks):
    "The annotation mask of a field in the folder `masks`: <stem>_GT.<ext> or <stem>.<ext>; None when there is none."
    for candidate in sorted(masks.iterdir()):
        if candidate.stem in (f"{field.stem}_GT", f"{field.stem}_gt") or (
                candidate.stem == field.stem and candidate.resolve() != field.resolve()):
            return candidate
    return None


def labels_from_mask(path):
    """A label image of the annotated nuclei of a mask: closed outlines are filled (their insides told apart even
    where outlines touch), filled white regions split into connected parts, a labelled mask kept by value."""
    values = np.asarray(Image.open(path))
    values = values if values.ndim == 2 else values[..., 0]
    drawn = values > 0
    filled = ndi.binary_fill_holes(drawn)
    if filled.sum() > 1.3 * drawn.sum():  # outlines: the insides are the nuclei, each outline is given back to them
        from skimage.segmentation import expand_labels

        insides, _ = ndi.label(filled & ~drawn)
        return expand_labels(insides, 1) * filled
    if len(np.unique(values)) > 2:  # one value per nucleus
        return np.unique(values, return_inverse=True)[1].reshape(values.shape) * drawn
    return ndi.label(drawn)[0]


def labels_from_dat(field, size):
    "A label image of the nuclei whose boundaries NNN_nucKK.dat lie beside field NNN (one 'x,y' point per line)."
    labels = Image.new("I", size, 0)
    draw = ImageDraw.Draw(labels)
    dats = sorted(p for p in field.parent.glob(f"{field.stem}_nuc*.dat") if DAT.match(p.name))
    for k, dat in enumerate(dats, start=1):
        points = [tuple(map(float, line.split(",")[:2])) for line in dat.read_text().split() if "," in line]
        if len(points) >= 3:
            draw.polygon(points, fill=k)
    return np.asarray(labels)


def annotations(field, masks, size):
    "The label image of a field's annotated nuclei (a mask in `masks`, or .dat boundaries beside it); None without."
    mask = mask_for(field, masks) if masks else None
    if mask is not None:
        return labels_from_mask(mask)
    if any(DAT.match(p.name) for p in field.parent.glob(f"{field.stem}_nuc*.dat")):
        return labels_from_dat(field, size)
    return None


def centres(labels):
    "(x, y) centre of each labelled region, and the regions' label values."
    values = [v for v in np.unique(labels) if v]
    found = ndi.center_of_mass(np.ones_like(labels), labels, values)
    return np.array([(x, y) for y, x in found]).reshape(-1, 2), values


def match(detected, annotated, radius):
    "Pairs (detected index, annotated index) matched one to one (Hungarian) within `radius`."
    if not len(detected) or not len(annotated):
        return []
    distance = np.linalg.norm(detected[:, None] - annotated[None], axis=2)
    rows, cols = linear_sum_assignment(np.where(distance <= radius, distance, 1e9))
    return [(r, c) for r, c in zip(rows, cols, strict=True) if distance[r, c] <= radius]


def dice(found_labels, scale, label, annotated_labels, value):
    "Dice of one detected nucleus (working-resolution labels, upsampled) and one annotated nucleus."
    truth = annotated_labels == value
    mine = np.asarray(Image.fromarray((found_labels == label).astype(np.uint8) * 255).resize(
        truth.shape[::-1], Image.NEAREST)) > 0 if scale != 1 else found_labels == label
    return 2 * (mine & truth).sum() / max(mine.sum() + truth.sum(), 1)


def median_radius(annotated_labels):
    "Half the median annotated nucleus diameter (the diameter of a disk of the same area)."
    areas = np.bincount(annotated_labels.ravel())[1:]
    return float(np.sqrt(np.median(areas[areas > 0]) / np.pi)) if (areas > 0).any() else 0.0


def evaluate_field(field, truth, nucleus_diameter, model):
    "Counts and Dice of one field's detections against its annotation."
    with Image.open(field) as image:
        found = nuclei.find_nuclei(image.convert("RGB"), nucleus_diameter, model=model)
    annotated, values = centres(truth)
    detected = found.table[["x", "y"]].to_numpy()
    pairs = match(detected, annotated, median_radius(truth))
    dices = [dice(found.labels, found.scale, found.table["label"].iloc[r], truth, values[c]) for r, c in pairs]
    return dict(field=field.name, annotated=len(annotated), detected=len(detected), matched=len(pairs),
                dice=float(np.mean(dices)) if dices else float("nan"))


def scores_of(rows):
    "Precision, recall, F1 of counts."
    precision = rows["matched"].sum() / max(rows["detected"].sum(), 1)
    recall = rows["matched"].sum() / max(rows["annotated"].sum(), 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-9)


def candidate_labels(field, truth, nucleus_diameter):
    "(features, whether each candidate is an annotated nucleus: the one matched to it) of one field."
    with Image.open(field) as image:
        positions, features = nuclei.field_candidates(image.convert("RGB"), nucleus_diameter)
    annotated, _ = centres(truth)
    positive = np.zeros(len(positions), bool)
    for r, _ in match(positions, annotated, median_radius(truth)):
        positive[r] = True
    return features, positive


def fit_model(samples):
    """The logistic regression over candidate features (scikit-learn, standardised features), with the threshold
    on its probability that gives the best F1 over the candidates."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    features = np.vstack([f for f, _ in samples])
    positive = np.concatenate([p for _, p in samples])
    scaler = StandardScaler().fit(features)
    regression = LogisticRegression(max_iter=5000).fit(scaler.transform(features), positive)
    model = dict(features=list(nuclei.FEATURES), mean=scaler.mean_.tolist(), scale=scaler.scale_.tolist(),
                 coefficients=regression.coef_[0].tolist(), intercept=float(regression.intercept_[0]), threshold=0.5)
    probability = nuclei.scores(features, model)
    best = max(np.linspace(0.2, 0.8, 25), key=lambda t: f1_at(probability >= t, positive))
    return model | dict(threshold=float(best))


def f1_at(called, positive):
    "F1 of calling candidates nuclei, against which are."
    hits = (called & positive).sum()
    return 2 * hits / max(called.sum() + positive.sum(), 1)


def synthetic_samples(n, nucleus_diameter=24, seed=100):
    "(features, positives) of the candidates of `n` synthetic fields drawn by the demo generator."
    with tempfile.TemporaryDirectory() as folder:
        demo.generate_fields(Path(folder), n_fields=n, nucleus_diameter=nucleus_diameter, seed=seed)
        return [candidate_labels(field, truth, nucleus_diameter)
                for field, truth in annotated_fields(sample_images(Path(folder)), None)]


def annotated_fields(fields, masks):
    "(field, annotation label image) of every field that has an annotation."
    found = []
    for field in fields:
        with Image.open(field) as image:
            truth = annotations(field, masks, image.size)
        if truth is not None:
            found.append((field, truth))
    if not found:
        raise UserError("no field has an annotation — give --masks, or fields with NNN_nucKK.dat beside them")
    return found


@call_parse
def main(fields: Path = Path("../shared/data/isbi2014_fields"),  # a field image, or a folder of them
         masks: Path = None,                 # folder of annotation masks (<stem>_GT.png or <stem>.png)
         nucleus_diameter: float = 18.0,     # typical nucleus diameter of the fields, pixels
         fit: bool = False,                  # fit the nucleus model on these fields (leave-one-out figures)
         synthetic: int = 6,                 # --fit: also fit on this many synthetic fields (demo generator, seed 100)
         model_out: Path = None):            # where --fit writes the model (default: papsmear/nucleus_model.json)
    "Measure nucleus detection against annotated fields; or fit the candidate scores on them."
    with user_errors():
        fields = user_path(fields)
        images = [fields] if fields.is_file() else [f for f in sample_images(fields) if "_GT" not in f.stem.upper()]
        images = [f for f in images if not (masks and f.parent.resolve() == user_path(masks).resolve()
                                            and f.stem.upper().endswith("_GT"))]
        pairs = annotated_fields(images, user_path(masks) if masks else None)
        rows = []
        if fit:
            samples = [candidate_labels(field, truth, nucleus_diameter) for field, truth in pairs]
            drawn = synthetic_samples(synthetic)
            for k, (field, truth) in enumerate(pairs):
                held_out = fit_model([s for j, s in enumerate(samples) if j != k] + drawn)
                rows.append(evaluate_field(field, truth, nucleus_diameter, held_out) | dict(model="fitted without it"))
            model = fit_model(samples + drawn)
            target = user_path(model_out or nuclei.MODEL_FILE)
            with atomic_output(target) as tmp:
                tmp.write_text(__import__("json").dumps(model, indent=1))
            every = samples + drawn
            print(f"nucleus model fitted on {len(pairs)} fields and {synthetic} synthetic ones "
                  f"({sum(len(s[1]) for s in every)} candidates, {sum(s[1].sum() for s in every)} of them nuclei): "
                  f"{target}")
        else:
            model = nuclei.load_model()
            rows = [evaluate_field(field, truth, nucleus_diameter, model) for field, truth in pairs]
        table = pd.DataFrame(rows)
        for column in ("precision", "recall"):
            table[column] = (table["matched"] / table["detected" if column == "precision" else "annotated"]).round(3)
        print(table.to_string(index=False))
        precision, recall, f1 = scores_of(table)
        print(f"\n{len(table)} fields, {table['annotated'].sum()} annotated nuclei: precision {precision:.3f}, "
              f"recall {recall:.3f}, F1 {f1:.3f}; Dice of matched nuclei {np.nanmean(table['dice']):.3f}"
              + (" (each field measured with the model fitted on the others)" if fit else ""))
