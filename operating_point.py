"""Choose a trained model's operating point for screening: the threshold on p(abnormal) that reaches a target
sensitivity on labelled cells you trust, stored with the model (its .json record and the metadata of its .onnx
exports), so that Inference_FastAI.py, app.py and Inference_Fields.py flag cells by it and report sensitivity and
specificity at it.

p(abnormal) is the sum of the abnormal classes' probabilities. The abnormal classes are SIPaKMeD's or Herlev's
grouping for those class sets; for any other class set name them (or the normal ones) here or when training.
R50.py --target-sensitivity chooses the point on the validation split when training ends; this script chooses it
for a model trained before, or on another labelled folder.
"""
from pathlib import Path
from typing import Annotated

from fastcore.script import call_parse

from papsmear.files import one_line_usage_errors, user_errors, user_path

# --- edit these -----------------------------------------------------------------------------------
model_path = Path("data/sipakmed_formatted/models/resnet50_ttl_sipakmed.pth")  # .pth (+ .json), .pkl or .onnx
target_sensitivity = 0.95   # share of the abnormal cells the threshold must flag on labelled_folder
labelled_folder = None      # class folders to choose on (default: the val/ split of the model's dataset)
abnormal_classes = None     # the abnormal classes (default: the model's record, or SIPaKMeD's / Herlev's grouping)
normal_classes = None       # or: the normal ones, whichever is shorter to name
batch_size = 16             # images per prediction batch
# ---------------------------------------------------------------------------------------------------

one_line_usage_errors()


@call_parse
def main(model_path: Path = model_path,                # .pth with its .json, .pkl or .onnx
         target_sensitivity: float = target_sensitivity,  # sensitivity to reach on labelled_folder, in (0, 1]
         labelled_folder: Path = labelled_folder,      # class folders to choose on (default: <dataset>/val)
         abnormal_classes: Annotated[list, {"nargs": "+", "type": str}] = abnormal_classes,  # abnormal class names
         normal_classes: Annotated[list, {"nargs": "+", "type": str}] = normal_classes,  # or: the normal ones
         batch_size: int = batch_size):                # images per prediction batch
    "Choose the threshold on p(abnormal) reaching a target sensitivity on labelled cells, and store it."
    with user_errors():
        from papsmear import report  # after --help: torch loads only for real work

        folder = labelled_folder or user_path(model_path).parent.parent / "val"
        record, written = report.choose_on_folder(model_path, folder, target_sensitivity, abnormal=abnormal_classes,
                                                  normal=normal_classes, batch_size=batch_size)
        point = record.operating_point
        print(f"abnormal: {', '.join(record.abnormal_classes)}")
        print(f"operating point: p(abnormal) ≥ {point['threshold']:.4f} flags {point['sensitivity']:.1%} of the "
              f"{point['abnormal_cells']} abnormal cells (target {point['target_sensitivity']:.0%}) and keeps "
              f"{point['specificity']:.1%} of the {point['other_cells']} others in {point['chosen_on']}")
        for file in written:
            print(f"stored in {file}")
        print(f"Next: Inference_FastAI.py --model-path {model_path} --test-dataset-path <the test split> reports "
              "sensitivity and specificity at this threshold")
