"""Inference speed: the original's loop (one `learn.predict` call per image) against Inference_FastAI.py's
batched path, with the same exported model on the same labelled images. Run by hand:
    .venv/bin/python benchmarks/inference_speed.py --n-images 40
"""
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fastcore.script import call_parse

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "demo")]
import TTLR50  # noqa: E402,I001
import Inference_FastAI as inference  # noqa: E402
import synthetic_papsmear as demo  # noqa: E402
from fastai.learner import load_learner  # noqa: E402


def predict_one_by_one(model_path, files):
    "The original's way: load the export, then one `predict` call per image."
    learn = load_learner(model_path)
    with learn.no_bar():
        return [learn.predict(f)[0] for f in files]


def export_untrained_model(folder, image_size):
    "A ResNet50 learner exported from a formatted demo folder (speed does not depend on the weights)."
    learn = TTLR50.pap_learner(TTLR50.pap_dls(folder, image_size, workers=0), path=folder)
    learn.export(folder / "model.pkl")
    return folder / "model.pkl"


@call_parse
def main(n_images: int = 40,     # labelled test images (spread over the 5 classes)
         width: int = 2048,      # image width (real SIPaKMeD cluster images: 2048)
         height: int = 1536,     # image height (real: 1536)
         image_size: int = 224,  # model input side, as in training
         batch_size: int = 16):  # batch of the batched path
    "Print images/s of the per-image predict loop and of the batched path, and their ratio."
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        demo.generate_sipakmed(folder / "raw", n_images=-(-n_images // 5), width=width, height=height)
        for split in ("train", "val", "test"):
            for path in folder.glob("raw/im_*/im_*/*.bmp"):
                target = folder / split / path.parent.name / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
        model = export_untrained_model(folder, image_size)
        files = sorted((folder / "test").rglob("*.bmp"))
        start = time.perf_counter()
        looped = predict_one_by_one(model, files)
        loop_seconds = time.perf_counter() - start
        start = time.perf_counter()
        table = inference.evaluate_folder(model, folder / "test", folder / "report", batch_size)["table"]
        batched_seconds = time.perf_counter() - start
    agree = sum(a == b for a, b in zip(looped, table["predicted_class"]))
    print(f"{len(files)} images of {width}x{height} at {image_size}px, {TTLR50.available_cpus()} cores, "
          f"device {TTLR50.default_device()}")
    print(f"per-image predict loop : {loop_seconds:7.2f} s  {len(files) / loop_seconds:7.2f} images/s")
    print(f"batched (this script)  : {batched_seconds:7.2f} s  {len(files) / batched_seconds:7.2f} images/s "
          "(reports and picture included)")
    print(f"ratio {loop_seconds / batched_seconds:.1f}x (the original looped twice: "
          f"{2 * loop_seconds / batched_seconds:.1f}x against it as written); "
          f"same predicted class for {agree}/{len(files)} images")
