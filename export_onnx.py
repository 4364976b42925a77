"""Export trained weights (.pth with the .json class list saved beside them) to ONNX, for ONNX Runtime.

R50.py and R50Herlev.py already write <save_loc>.onnx when they finish; this script exports weights trained
before, or again. The file takes uint8 RGB images [batch, size, size, 3] cut by the project's one rule and
returns class probabilities; its metadata names the classes, the image size, the rule and the recipe
(README: Deploying a model). Right after writing, ONNX Runtime's probabilities on a few images of
check_folder are compared with fastai's; a difference above 1e-3 is an error and leaves no file.
"""
from pathlib import Path

from fastcore.script import call_parse

from papsmear.files import UserError, sample_images, user_errors, user_path

# --- edit these -----------------------------------------------------------------------------------
model_path = Path("data/sipakmed_formatted/models/resnet50_ttl_sipakmed.pth")  # weights with their .json
output = None          # the ONNX file (default: beside the weights, <name>.onnx)
check_folder = None    # images to check the export on (default: the val/ folder of the weights' dataset)
# ---------------------------------------------------------------------------------------------------


@call_parse
def main(model_path: Path = model_path,      # .pth saved by R50.py / R50Herlev.py, with its .json beside it
         output: Path = output,              # ONNX file to write (default: <model_path without .pth>.onnx)
         check_folder: Path = check_folder):  # images (any depth) to check on; default <dataset>/val
    "Export .pth weights to ONNX and check ONNX Runtime against fastai on real images."
    with user_errors():
        from papsmear import export, predict  # after --help: torch loads only for real work

        model_path = user_path(model_path)
        if model_path.suffix != ".pth" or not model_path.is_file():
            raise UserError(f"{model_path} is not a .pth file — give the weights saved by R50.py or R50Herlev.py")
        check_folder = user_path(check_folder or model_path.parent.parent / "val")
        files = sample_images(check_folder) if check_folder.is_dir() else []
        if not files:
            raise UserError(f"no images in {check_folder} to check the export on — set --check-folder to a folder "
                            "of cell images (the dataset's val/ split is the default)")
        learn, classes = predict.load_classifier(model_path, files)
        info = predict.read_class_list(model_path.with_suffix(".json"))
        path, difference, seconds = export.export_onnx(
            learn, user_path(output or model_path.with_suffix(".onnx")), classes, image_size=info["image_size"],
            recipe=info.get("recipe", "not recorded"), check_files=files)
        print(f"wrote {path}: ONNX Runtime agrees with fastai within {difference:.1e} on "
              f"{min(export.CHECK_IMAGES, len(files))} images of {check_folder} ({seconds:.0f} s)")
        print(f"Next: Inference_FastAI.py --model-path {path} --test-dataset-path <images>")
