"""From smear fields to a per-cell screening report: find the nuclei of every field (`papsmear.nuclei`), cut a
square around each, classify every cell through the one prediction path, flag the abnormal ones by the model's
rule, and write cells.csv, fields.csv, an overlay per field and one self-contained report with the most
suspicious cells first.

The cell rule: the square of `CELL_SIDE` nucleus diameters around the nucleus centre (rounded to whole pixels),
moved inside the field where it would cross an edge, cut from the field as it is; the classifier then treats it
as any cell image (its own cutting rule, `papsmear.onnx_model.square_image`). A cell saved with this rule and
predicted from its file gets the same probabilities.
"""
import base64
import io
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from pytorch_grad_cam.utils.image import show_cam_on_image

from papsmear.figures import plt
from papsmear.files import (
    IMAGE_ERRORS,
    UserError,
    atomic_output,
    check_positive,
    is_inside,
    progress_bar,
    sample_images,
    spreadsheet_safe,
    user_path,
)
from papsmear.nuclei import check_diameter, find_nuclei, load_model
from papsmear.onnx_model import OnnxClassifier
from papsmear.predict import load_classifier, predict_images
from papsmear.report import gradcam_maps, inline_picture, write_html
from papsmear.screening import abnormal_probability, called_abnormal, rule_text

CELL_SIDE = 5  # a cell's square, in nucleus diameters: 90 px at 18 px nuclei, as CRIC's 90x90 crops at 40x
NUCLEUS_UM = 8.0  # a typical squamous nucleus (intermediate cell), micrometres: pixel_size_um → nucleus_diameter
# SIPaKMeD's scale, the default: a typical nucleus about 40 pixels across its 2048x1536 cluster images (README).
SIPAKMED_NUCLEUS_DIAMETER = 40.0
OVERLAY_SIDE = 1200  # overlays are drawn at most this many pixels across (the report shows them smaller)
SUSPICIOUS = 24  # cells in the report's "most suspicious" gallery
ABNORMAL_RED = (207, 34, 46)


def nucleus_scale(nucleus_diameter=None, pixel_size_um=None):
    """The typical nucleus diameter in pixels: as given, from the pixel size (a nucleus of `NUCLEUS_UM`), or
    SIPaKMeD's; refused when it cannot be right."""
    if nucleus_diameter is not None and pixel_size_um is not None:
        raise UserError("give nucleus_diameter or pixel_size_um, not both — one sets the other")
    if pixel_size_um is not None:
        check_positive(pixel_size_um=pixel_size_um)
        nucleus_diameter = NUCLEUS_UM / pixel_size_um
    return check_diameter(SIPAKMED_NUCLEUS_DIAMETER if nucleus_diameter is None else nucleus_diameter)


def cell_box(x, y, side, width, height):
    """The cell's square (left, top, right, bottom) of `side` pixels centred on the nucleus (x, y), moved inside the
    field where it would cross an edge; as much of the square as fits when the field is smaller than it."""
    left = min(max(int(round(x - side / 2)), 0), max(width - side, 0))
    top = min(max(int(round(y - side / 2)), 0), max(height - side, 0))
    return left, top, min(left + side, width), min(top + side, height)


def list_fields(path_dir):
    """(field images, the folder they are relative to): one image, or every image of a folder tree
    (patient/slide/field), linked folders walked once and never out of the tree."""
    path = user_path(path_dir)
    if path.is_file():
        return [path], path.parent
    if not path.is_dir():
        raise UserError(f"path_dir {path} does not exist — set it to a field image or a folder of them")
    files = sample_images(path, within=path, outside=[])
    if not files:
        raise UserError(f"no images anywhere under {path} — set path_dir to a field image or a folder tree of them")
    return files, path


def open_field(file):
    "A field as an RGB PIL image, decoded now; None and the reason when it cannot be read."
    try:
        with Image.open(file) as image:
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                return None, f"a {'float' if image.mode == 'F' else '16-bit'} image — convert it to 8 bits first"
            return image.convert("RGB"), None
    except (*IMAGE_ERRORS, ValueError) as e:
        return None, f"{type(e).__name__}: {e}"


def cut_cells(image, centres, nucleus_diameter):
    "(boxes, images) of the cells around nucleus centres (x, y), by the cell rule (`cell_box`)."
    side = max(int(round(CELL_SIDE * nucleus_diameter)), 8)
    boxes = [cell_box(x, y, side, image.width, image.height) for x, y in centres]
    return boxes, [image.crop(box) for box in boxes]


def classify_field(learn, record, image, nucleus_diameter, model, batch_size=16):
    """The cells of one field: its nuclei, each cell's box, crop, class probabilities and abnormal flag. Returns
    (table, crops, nuclei): a table row per cell, in the order of the nuclei found."""
    nuclei = find_nuclei(image, nucleus_diameter, model=model)
    table = nuclei.table.rename(columns=dict(area="nucleus_area", score="nucleus_score"))
    boxes, crops = cut_cells(image, zip(table["x"], table["y"], strict=True), nucleus_diameter)
    for k, side_name in enumerate(("left", "top", "right", "bottom")):
        table[side_name] = [box[k] for box in boxes]
    table = table[["x", "y", "left", "top", "right", "bottom", "nucleus_area", "nucleus_score", "label"]].copy()
    with learn.no_bar() if hasattr(learn, "no_bar") else nullcontext():
        probabilities = predict_images(learn, crops, batch_size) if crops else np.zeros((0, len(record.classes)))
    table["predicted_class"] = [record.classes[i] for i in probabilities.argmax(1)] if crops else []
    for k, name in enumerate(record.classes):
        table[f"p_{name}"] = probabilities[:, k]
    if record.abnormal_classes:
        table["p_abnormal"] = abnormal_probability(probabilities, record.classes, record.abnormal_classes)
        table["abnormal"] = called_abnormal(probabilities, record.classes, record.abnormal_classes,
                                            record.operating_point)
    return table, crops, nuclei


def class_colours(classes):
    "A distinct colour per class (matplotlib's tab10, or tab20 for more classes, without its reds), as RGB tuples."
    palette = plt.get_cmap("tab10" if len(classes) <= 9 else "tab20").colors
    colours = [c for c in palette if not (c[0] > 0.8 and c[1] < 0.5 and c[2] < 0.5)]  # red marks abnormal cells
    return {name: tuple(int(255 * c) for c in colours[k % len(colours)]) for k, name in enumerate(classes)}


def draw_overlay(image, nuclei, table, classes, png):
    "Write the field's overlay (`overlay_image`) atomically as PNG."
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(png) as tmp:
        overlay_image(image, nuclei, table, classes).save(tmp, format="PNG")
    return png


def overlay_image(image, nuclei, table, classes):
    """The field with each nucleus outlined in its cell's class colour and numbered, abnormal cells ringed in red,
    and a legend below; at most `OVERLAY_SIDE` pixels across."""
    from skimage.segmentation import find_boundaries

    shrink = min(1.0, OVERLAY_SIDE / max(image.size))
    size = (max(1, round(image.width * shrink)), max(1, round(image.height * shrink)))
    colours = class_colours(classes)
    outlines = np.where(find_boundaries(nuclei.labels, mode="thick"), nuclei.labels, 0).astype(np.int32)
    outlines = np.asarray(Image.fromarray(outlines).resize(size, Image.NEAREST))
    pixels = np.asarray(image.resize(size, Image.BILINEAR)).copy()
    for label, name in zip(table["label"], table["predicted_class"], strict=True):
        pixels[outlines == label] = colours[name]
    canvas = Image.fromarray(pixels)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(12, size[0] // 60))
    ring = max(2, size[0] // 300)
    for _, cell in table.iterrows():
        x, y = cell["x"] * shrink, cell["y"] * shrink
        reach = max(6.0, (cell["right"] - cell["left"]) * shrink / 2.5)
        if cell.get("abnormal", False):
            draw.ellipse((x - reach, y - reach, x + reach, y + reach), outline=ABNORMAL_RED, width=ring)
        draw.text((x + reach * 0.5, y - reach), str(int(cell["cell"])), fill=colours[cell["predicted_class"]],
                  font=font)
    return with_legend(canvas, classes, font)


def with_legend(canvas, classes, font):
    "The overlay with a legend band below it: each class's colour, and the abnormal ring (long names wrap)."
    colours = class_colours(classes)
    entries = [(name, colours[name]) for name in classes] + [("abnormal: red ring", ABNORMAL_RED)]
    measure = ImageDraw.Draw(canvas)
    line, gap = font.size + 6, font.size
    rows, x, row = [], 8, 0
    for name, colour in entries:
        width = line + measure.textlength(name, font=font) + gap
        if x + width > canvas.width and x > 8:
            x, row = 8, row + 1
        rows.append((x, row, name, colour))
        x += width
    band = Image.new("RGB", (canvas.width, canvas.height + (row + 1) * line + 8), (255, 255, 255))
    band.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(band)
    for x, row, name, colour in rows:
        y = canvas.height + 4 + row * line
        draw.rectangle((x, y + 2, x + line - 8, y + line - 6), fill=colour)
        draw.text((x + line - 2, y), name, fill=(27, 31, 36), font=font)
    return band


def field_rows(cells, fields, classes, screened):
    """fields.csv: per field and per folder (slide), the fields, the cells, the cells per class and, when the model
    has abnormal classes, the abnormal cells and the highest p(abnormal)."""
    rows = []
    for level in ("field", "folder"):
        for name in sorted(set(fields[level])):
            mine = cells[cells["field"].isin(fields.loc[fields[level] == name, "field"])]
            row = dict(level=level, path=spreadsheet_safe(name), fields=int((fields[level] == name).sum()),
                       cells=len(mine), **{c: int((mine["predicted_class"] == c).sum()) for c in classes})
            if screened:
                row["abnormal"] = int(mine["abnormal"].sum())
                row["max_p_abnormal"] = float(mine["p_abnormal"].max()) if len(mine) else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def jpeg_url(image, side=None, quality=80):
    "A PIL image as a JPEG data: URL, shrunk to `side` pixels across when it is larger."
    if side and max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def suspicious_gallery(learn, cells, record, root, n=SUSPICIOUS):
    """The `n` cells with the highest p(abnormal) over the whole run (highest first), each with its field,
    position, class probabilities, the cell as cut (cut again from its field by its box) and, for a PyTorch
    model, its Grad-CAM for the predicted class."""
    if not record.abnormal_classes or not len(cells):
        return []
    top = cells.sort_values("p_abnormal", ascending=False, kind="stable").head(n)
    crops = []
    for _, cell in top.iterrows():
        image, _ = open_field(Path(root) / cell["field"])
        crops.append(image.crop((int(cell["left"]), int(cell["top"]), int(cell["right"]), int(cell["bottom"]))))
    maps = None if isinstance(learn, OnnxClassifier) else gradcam_maps(
        learn, crops, [record.classes.index(c) for c in top["predicted_class"]])
    gallery = []
    for rank, (_, cell) in enumerate(top.iterrows()):
        top3 = sorted(((name, float(cell[f"p_{name}"])) for name in record.classes), key=lambda t: -t[1])[:3]
        gradcam = None if maps is None else jpeg_url(Image.fromarray(show_cam_on_image(
            maps[1][rank].astype(np.float32), maps[0][rank], use_rgb=True)))
        gallery.append(dict(field=cell["field"], cell=int(cell["cell"]), x=float(cell["x"]), y=float(cell["y"]),
                            p_abnormal=float(cell["p_abnormal"]), abnormal=bool(cell["abnormal"]),
                            predicted=cell["predicted_class"], top3=top3, picture=jpeg_url(crops[rank], 160),
                            gradcam=gradcam))
    return gallery


def check_field_options(output_dir, path_dir, batch_size, top):
    "Refuse options out of range, and an output folder inside the fields (its overlays would become fields)."
    check_positive(batch_size=batch_size, top=top)
    source = user_path(path_dir)
    if source.is_dir() and is_inside(output_dir, source):
        raise UserError(f"output_dir {output_dir} is inside path_dir {source}: its overlays would become fields — "
                        "choose an output_dir outside it")


def process_share(files):
    """(index, field) pairs this process measures, and Accelerate's process state: every field in a single process;
    under `accelerate launch`, this process's part of the list (Accelerate splits it between the processes), so
    that a slide archive uses every GPU or machine."""
    import torch
    from accelerate import PartialState

    # Accelerate's process state finds the launcher's processes on GPUs by itself; on CPUs (gloo) only when asked.
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)
    pairs = list(enumerate(files))
    if state.num_processes == 1:
        return pairs, state
    with state.split_between_processes(pairs) as mine:
        return list(mine), state


CELL_COLUMNS = ["field", "cell", "x", "y", "left", "top", "right", "bottom", "nucleus_area", "nucleus_score"]


def measure_field(learn, record, file, root, output_dir, nucleus_diameter, model, batch_size):
    """(cells of one field, its row) — or (None, the reason it cannot be read). Writes the field's overlay."""
    image, problem = open_field(file)
    if image is None:
        return None, f"{file}: {problem}"
    relative = Path(file).relative_to(root).as_posix()
    start = time.perf_counter()
    table, _, nuclei = classify_field(learn, record, image, nucleus_diameter, model, batch_size)
    table.insert(0, "field", relative)
    table.insert(1, "cell", np.arange(1, len(table) + 1))
    draw_overlay(image, nuclei, table, record.classes, overlay_path(output_dir, relative))
    cells = table.drop(columns=["label"])
    return cells, dict(field=relative, folder=Path(relative).parent.as_posix(), width=image.width,
                       height=image.height, cells=len(cells), seconds=round(time.perf_counter() - start, 3))


def overlay_path(output_dir, relative):
    "Where the overlay of a field (its path relative to path_dir) is written: overlays/<path>.png."
    return Path(output_dir) / "overlays" / f"{relative}.png"


def evaluate_fields(model_path, path_dir, output_dir=None, nucleus_diameter=None, pixel_size_um=None, batch_size=16,
                    top=SUSPICIOUS):
    """Find, cut and classify the cells of every field of `path_dir` (one image, a folder or a folder tree), and
    write cells.csv, fields.csv (per field and per folder), an overlay per field and report.html into
    `output_dir`. Under `accelerate launch` the fields are shared between the processes and process 0 writes the
    tables and the report. Returns a dict with the tables, the unreadable fields, the model's record, the
    output folder and the report (None in the other processes)."""
    diameter = nucleus_scale(nucleus_diameter, pixel_size_um)
    model_path = user_path(model_path)
    output_dir = user_path(output_dir or model_path.with_name(f"{model_path.stem}_fields"))
    check_field_options(output_dir, path_dir, batch_size, top)
    files, root = list_fields(path_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    learn, record = load_classifier(model_path, [], batch_size)
    model = load_model()
    mine, state = process_share(files)
    cells, fields, skipped = [], [], []
    for _, file in progress_bar(mine, desc="fields", unit="field", disable=len(mine) < 2):
        table, row = measure_field(learn, record, file, root, output_dir, diameter, model, batch_size)
        if table is None:
            skipped.append(row)
        else:
            cells.append(table)
            fields.append(row)
    cells, fields, skipped = gather(state, output_dir, cells, fields, skipped)
    if not state.is_main_process:
        return dict(report=None)
    if not fields:
        raise UserError(f"none of the {len(files)} field(s) of {path_dir} can be read — check that they are images")
    return write_field_outputs(learn, record, cells, pd.DataFrame(fields), skipped, root, output_dir, diameter, top,
                               model_path=model_path, path_dir=path_dir)


def gather(state, output_dir, cells, fields, skipped):
    """Every process's cells, fields and skipped files, for process 0 (each process writes its share to
    output_dir/.parts, process 0 reads them all once every process has finished, then removes them)."""
    cells = pd.concat(cells, ignore_index=True) if cells else pd.DataFrame(columns=CELL_COLUMNS)
    if state.num_processes == 1:
        return cells, fields, skipped
    parts = Path(output_dir) / ".parts"
    parts.mkdir(exist_ok=True)
    with atomic_output(parts / f"{state.process_index}.json") as tmp:
        tmp.write_text(json.dumps(dict(cells=cells.to_dict("records"), fields=fields, skipped=skipped)))
    state.wait_for_everyone()
    if not state.is_main_process:
        return cells, fields, skipped
    shares = [json.loads((parts / f"{rank}.json").read_text()) for rank in range(state.num_processes)]
    for share in shares:
        (parts / f"{shares.index(share)}.json").unlink(missing_ok=True)
    parts.rmdir()
    every = [pd.DataFrame(share["cells"]) for share in shares if share["cells"]]
    merged = pd.concat(every, ignore_index=True) if every else pd.DataFrame(columns=CELL_COLUMNS)
    order = {share_field["field"]: k for k, share_field in enumerate(f for share in shares for f in share["fields"])}
    merged = merged.sort_values(["field", "cell"], key=lambda c: c.map(order) if c.name == "field" else c)
    return merged.reset_index(drop=True), [f for share in shares for f in share["fields"]], \
        [s for share in shares for s in share["skipped"]]


def write_field_outputs(learn, record, cells, fields, skipped, root, output_dir, diameter, top, model_path, path_dir):
    "cells.csv, fields.csv and report.html (atomically) from the merged tables; returns the summary dict."
    screened = record.abnormal_classes is not None
    if screened and len(cells):
        cells["abnormal_rule"] = rule_text(record.operating_point)
    cells_csv = cells.assign(field=cells["field"].map(spreadsheet_safe))
    with atomic_output(output_dir / "cells.csv") as tmp:
        cells_csv.to_csv(tmp, index=False)
    counts = field_rows(cells, fields, record.classes, screened)
    with atomic_output(output_dir / "fields.csv") as tmp:
        counts.to_csv(tmp, index=False)
    gallery = suspicious_gallery(learn, cells, record, root, n=top)
    summary = dict(model_path=str(model_path), path_dir=str(path_dir), classes=record.classes,
                   abnormal_classes=record.abnormal_classes,
                   abnormal_rule=rule_text(record.operating_point) if screened else None,
                   nucleus_diameter=diameter, cell_side=int(round(CELL_SIDE * diameter)), fields=len(fields),
                   cells=len(cells), skipped=skipped)
    overlays = [dict(field=row["field"], cells=int(row["cells"]),
                     picture=inline_picture(overlay_path(output_dir, row["field"])))
                for _, row in fields.iterrows()]
    html = write_html(dict(summary=summary, folders=counts[counts["level"] == "folder"].to_dict("records"),
                           fields=counts[counts["level"] == "field"].to_dict("records"), overlays=overlays,
                           gallery=gallery), output_dir / "report.html", template="fields_report.html")
    return dict(cells=cells, fields=counts, skipped=skipped, record=record, output_dir=output_dir, report=html,
                nucleus_diameter=diameter, gradcam=not isinstance(learn, OnnxClassifier))
