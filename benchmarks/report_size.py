"""The evaluation report on a large test set: a model trained briefly on synthetic Herlev-like cells (7 classes,
one of them renamed to a 60-character name), whose mistakes spread over many confusion cells, evaluated on
`n_test` test cells with the default Grad-CAM gallery.
Prints the size of report.html, how many overlays it holds and how many misclassified images it leaves out,
beside the size the report would have with an overlay for every misclassified image (the earlier gallery:
measured overlay size × the misclassified images).

    .venv/bin/python benchmarks/report_size.py --n-test 1000
"""
import shutil
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "demo")]

import pandas as pd  # noqa: E402
from fastcore.script import call_parse  # noqa: E402

import synthetic_papsmear as demo  # noqa: E402
from papsmear import division, learner  # noqa: E402
from papsmear import report as reporting  # noqa: E402
from papsmear.record import TrainingSettings  # noqa: E402

LONG = "Negative for intraepithelial lesion or malignancy (NILM cells)"


@call_parse
def main(n_test: int = 1000,      # test cells
         image_size: int = 64,    # model input side
         gradcam: int = 3):       # overlays per confusion cell and per class, as Inference_FastAI.py's default
    "Write the report of a weak model on many test cells; print its size and what its gallery holds."
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        per_class = -(-n_test // len(demo.HERLEV_CLASSES))
        demo.generate_herlev(folder / "raw", n_images=12, size=80, seed=11)
        demo.generate_herlev(folder / "test raw", n_images=per_class, size=80, seed=12)
        for raw in ("raw", "test raw"):  # a long class name, with spaces, in both
            subfolder = folder / raw / demo.HERLEV_SUBFOLDER
            (subfolder / "normal_intermediate").rename(subfolder / LONG)
        division.divide_dataset(folder / "raw", folder / "divided", progress=False)
        test = folder / "test"
        for cls in (folder / "test raw" / demo.HERLEV_SUBFOLDER).iterdir():
            (test / cls.name).mkdir(parents=True)
            for image in sorted(cls.glob("*.BMP"))[:per_class]:
                shutil.copy(image, test / cls.name / image.name)
        weights = learner.train_r50(TrainingSettings(folder / "divided", epochs=6, batch_size=8, lr=0.002,
                                                     image_size=image_size, pretrained=False, onnx=False))["weights"]
        result = reporting.evaluate_folder(weights, test, output_dir=folder / "report", gradcam=gradcam,
                                           bootstrap=1000)
        table = result["table"]
        wrong = int((table["true_class"] != table["predicted_class"]).sum())
        overlays = sorted((folder / "report" / "gradcam").iterdir())
        size = (folder / "report" / "report.html").stat().st_size
        per_overlay = sum(p.stat().st_size for p in overlays) / len(overlays) * 4 / 3  # base64 in the page
        cells = int(((table["true_class"] != table["predicted_class"]).groupby(
            [table["true_class"], table["predicted_class"]]).sum() > 0).sum())
        print(pd.Series({"test images": len(table), "misclassified": wrong, "confusion cells with mistakes": cells,
                         "overlays in the report": len(overlays),
                         "report.html MB": round(size / 1e6, 2),
                         "an overlay in the page, kB": round(per_overlay / 1e3, 1),
                         "with an overlay per misclassified image, MB (estimate)":
                             round((size + (wrong - len(overlays)) * per_overlay) / 1e6, 1)}).to_string())
