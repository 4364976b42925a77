"""Seconds to screen one 2048x1536 smear field (SIPaKMeD's cluster-image size): find its nuclei and classify all
its cells with the ONNX model (float and INT8, 224 px), and with PyTorch beside them; the detection alone and the
classification alone too. Every path runs once untimed (warm-up), then `repeats` times; the median is reported
with the min–max. The field is synthetic (the demo generator's smear field at SIPaKMeD's scale, 40-pixel nuclei).

    .venv/bin/python benchmarks/field_speed.py
"""
import shutil
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "demo")]

import numpy as np  # noqa: E402
from fastcore.script import call_parse  # noqa: E402

import synthetic_papsmear as demo  # noqa: E402
from inference_speed import trained_model  # noqa: E402
from papsmear import export, fields, nuclei, predict  # noqa: E402
from papsmear.files import available_cpus  # noqa: E402
from papsmear.onnx_model import OnnxClassifier  # noqa: E402
from timing import repeated, spread  # noqa: E402


def screen(learn, record, image, diameter, model):
    "Cells of one field: nuclei found, cells cut and classified (what Inference_Fields.py does per field)."
    return fields.classify_field(learn, record, image, diameter, model)[0]


@call_parse
def main(width: int = 2048, height: int = 1536,   # the field (SIPaKMeD's cluster images: 2048x1536)
         nucleus_diameter: int = 40,              # a typical nucleus, pixels (SIPaKMeD's scale)
         cells: int = 40,                         # cells drawn on the field (as many as fit)
         image_size: int = 224,                   # the classifier's input side
         repeats: int = 5):                       # timed runs after a warm-up
    "Print the seconds to screen one large field, with float ONNX, INT8 ONNX and PyTorch."
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng([0, 4])
        image, drawn = demo.generate_field(rng, width, height, nucleus_diameter, n_cells=cells)
        demo.generate_sipakmed(folder / "raw", n_images=8, width=320, height=240)
        for cls in sorted(folder.glob("raw/im_*/im_*")):
            for i, path in enumerate(sorted(cls.glob("*.bmp"))):
                target = folder / ("train" if i < 6 else "val") / cls.name.removeprefix("im_")
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / path.name)
        weights = trained_model(folder, image_size, epochs=1)
        learn, record = predict.load_classifier(weights, [])
        float_path, _, _ = export.export_onnx(learn, folder / "model.onnx", record,
                                              check_files=sorted((folder / "val").rglob("*.bmp")))
        int8 = export.quantize_export(float_path, folder / "model.int8.onnx", record,
                                      calibration_files=sorted((folder / "train").rglob("*.bmp")),
                                      check_files=sorted((folder / "val").rglob("*.bmp")), min_agreement=0)
        model = nuclei.load_model()
        *detection, found = repeated(nuclei.find_nuclei, image, nucleus_diameter, model, repeats=repeats)
        rows = [("nucleus detection alone", detection, len(found.table))]
        for name, classifier in (("float ONNX", OnnxClassifier(float_path, threads=available_cpus())),
                                 ("INT8 ONNX", OnnxClassifier(int8["path"], threads=available_cpus())),
                                 ("PyTorch", learn)):
            with learn.no_bar():
                *timing, table = repeated(screen, classifier, record, image, nucleus_diameter, model, repeats=repeats)
            rows.append((f"detection + {len(table)} cells, {name}", timing, len(table)))
    print(f"one {width}x{height} field, {len(drawn)} cells drawn, nuclei of {nucleus_diameter} px, cells cut at "
          f"{fields.CELL_SIDE * nucleus_diameter} px and classified at {image_size} px; {available_cpus()} cores; "
          f"median of {repeats} runs after a warm-up (min–max)")
    print("what                                    | seconds            | cells found")
    for what, timing, n in rows:
        print(f"{what:39} | {spread(*timing):18} | {n}")
