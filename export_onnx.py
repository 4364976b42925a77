"""Export trained weights (.pth with the .json record saved beside them) to ONNX, for ONNX Runtime; with --int8
also an INT8 version for fast prediction on CPUs.

R50.py and R50Herlev.py already write <save_loc>.onnx when they finish; this script exports weights trained
before, or again. The file takes uint8 RGB images [batch, size, size, 3] cut by the project's one rule and
returns class probabilities; its metadata holds the model's record: the classes, the image size, the rule,
the recipe, the abnormal classes and the operating point (README: Deploying a model). Right after writing,
ONNX Runtime's probabilities on a few images of check_folder are compared with fastai's; a difference above
1e-3 is an error and leaves no file. The INT8 file (<name>.int8.onnx) is calibrated on up to 200 images of
calibration_folder and must give the float file's top class on at least 99% of check_folder's images, or it
is not kept (README: INT8 on CPU).
"""
from pathlib import Path

from fastcore.script import call_parse

from papsmear.files import UserError, one_line_usage_errors, sample_images, user_errors, user_path

# --- edit these -----------------------------------------------------------------------------------
model_path = Path("data/sipakmed_formatted/models/resnet50_ttl_sipakmed.pth")  # weights with their .json
output = None          # the ONNX file (default: beside the weights, <name>.onnx)
check_folder = None    # images to check the export on (default: the val/ folder of the weights' dataset)
int8 = False           # also write <output without .onnx>.int8.onnx, quantized and checked against the float one
calibration_folder = None  # INT8: images to calibrate on (default: the train/ folder of the weights' dataset)
calibration_method = "Percentile"  # INT8: how activation ranges are set: MinMax, Entropy or Percentile
# ---------------------------------------------------------------------------------------------------

one_line_usage_errors()

CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")


def folder_images(folder, option, what):
    "The sample images under `folder` (any depth); refused in one line when there are none."
    files = sample_images(folder) if folder.is_dir() else []
    if not files:
        raise UserError(f"no images in {folder} to {what} — set --{option} to a folder of cell images")
    return files


@call_parse
def main(model_path: Path = model_path,      # .pth saved by R50.py / R50Herlev.py, with its .json beside it
         output: Path = output,              # ONNX file to write (default: <model_path without .pth>.onnx)
         check_folder: Path = check_folder,  # images (any depth) to check on; default <dataset>/val
         int8: bool = int8,                  # also write the INT8 file <output without .onnx>.int8.onnx
         calibration_folder: Path = calibration_folder,  # INT8 calibration images; default <dataset>/train
         calibration_method: str = calibration_method):  # INT8: MinMax, Entropy or Percentile
    "Export .pth weights to ONNX and check ONNX Runtime against fastai on real images; optionally INT8 too."
    with user_errors():
        model_path = user_path(model_path)
        if model_path.suffix != ".pth" or not model_path.is_file():
            raise UserError(f"{model_path} is not a .pth file — give the weights saved by R50.py or R50Herlev.py")
        if calibration_method not in CALIBRATION_METHODS:
            raise UserError(f"calibration_method {calibration_method!r} is unknown — use "
                            f"{', '.join(CALIBRATION_METHODS)}")
        check_folder = user_path(check_folder or model_path.parent.parent / "val")
        files = folder_images(check_folder, "check-folder", "check the export on")
        calibration_folder = user_path(calibration_folder or model_path.parent.parent / "train")
        calibration = folder_images(calibration_folder, "calibration-folder", "calibrate on") if int8 else []
        from papsmear import export, predict  # after --help and the checks: torch loads only for real work

        learn, record = predict.load_classifier(model_path, files)
        output = user_path(output or model_path.with_suffix(".onnx"))
        path, difference, seconds = export.export_onnx(learn, output, record, check_files=files)
        print(f"wrote {path}: ONNX Runtime agrees with fastai within {difference:.1e} on "
              f"{min(export.CHECK_IMAGES, len(files))} images of {check_folder} ({seconds:.0f} s)")
        if int8:
            quantized = export.quantize_export(path, output.with_suffix(".int8.onnx"), record,
                                               calibration_files=calibration, check_files=files,
                                               method=calibration_method)
            print(quantized["line"])
            path = quantized["path"]
        print(f"Next: Inference_FastAI.py --model-path {path} --test-dataset-path <images>")
