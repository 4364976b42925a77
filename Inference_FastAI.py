"""Evaluate a trained model on a labelled folder (accuracy, confusion matrix, precision/recall/F1 per class),
or predict a single image or a folder of unlabelled images.

model_path may be the exported learner (.pkl, unpickled by fastai: only load files you trust), the
weights (.pth) with the class list (.json) that R50.py / R50Herlev.py write beside them, which unpickles
nothing, or the ONNX export (.onnx, run by ONNX Runtime; no Grad-CAM, no test-time augmentation). A folder
whose sub-folders are not classes of the model is walked as an unlabelled tree (folders.csv counts each
folder's predictions). Reports go to output_dir: metrics.json, predictions.csv, confusion_matrix.png, roc_curves.png,
calibration.png, Grad-CAM overlays under gradcam/, and report.html, one page that holds them all.
"""
from pathlib import Path

from fastcore.script import call_parse

from papsmear.files import one_line_usage_errors, user_errors

# --- edit these -----------------------------------------------------------------------------------
model_path = Path("data/sipakmed_formatted/models/resnet50_ttl_sipakmed.pkl")  # .pkl export, or .pth + .json
test_dataset_path = Path("data/sipakmed_formatted/test")  # class folders (labelled), images, or one image
output_dir = None      # where reports go (default: <model folder>/<model name>_inference)
batch_size = 16        # images per prediction batch (16 ran fastest on a 2-core CPU)
tta = False            # also predict with fastai's test-time augmentation and report both scores
gradcam = 3            # Grad-CAM overlays: misclassified images + this many most/least confident per class; 0: none
bootstrap = 2000       # resamples of the test images for the 95% confidence intervals (seeded)
unlabelled = False     # walk test_dataset_path as an unlabelled tree (patient/slide/field/...); also chosen
                       # when none of its sub-folders is a class of the model
allow_trained_images = False  # report test images the model trained on as a warning instead of refusing them
# ---------------------------------------------------------------------------------------------------

one_line_usage_errors()


@call_parse
def main(model_path: Path = model_path,                # .pkl export, or .pth weights with their .json
         test_dataset_path: Path = test_dataset_path,  # class folders (labelled), a folder of images, or one image
         output_dir: Path = output_dir,                # reports folder (default: <model folder>/<model name>_inference)
         batch_size: int = batch_size,                 # images per prediction batch
         tta: bool = tta,                              # also report scores with test-time augmentation
         gradcam: int = gradcam,                       # Grad-CAM: wrong ones + N most/least sure per class (0: off)
         bootstrap: int = bootstrap,                   # resamples for the 95% bootstrap confidence intervals
         unlabelled: bool = unlabelled,                # predict every image of a folder tree, grouped by folder
         allow_trained_images: bool = allow_trained_images):  # warn about test images the model trained on
    "Evaluate a trained Pap-smear classifier, or predict unlabelled images."
    with user_errors():
        from papsmear import report  # after --help: torch loads only for real work

        result = report.evaluate_folder(model_path, test_dataset_path, output_dir=output_dir, batch_size=batch_size,
                                        tta=tta, gradcam=gradcam, bootstrap=bootstrap, unlabelled=unlabelled,
                                        allow_trained_images=allow_trained_images)
        table = result["table"]
        if result["metrics"]:
            report.print_report(result, result["classes"])
        else:
            print(table.to_string(index=False, float_format="%.4f"))
        if result["folders"] is not None:
            print("\nper folder:\n" + result["folders"].to_string(index=False))
        for problem in result["skipped"]:
            print(f"skipped unreadable image {problem}")
        if result["left_out"]:
            print(f"left out {len(result['left_out'])} image(s) lying beside the class folders, not in one "
                  f"(e.g. {result['left_out'][0].name}): their class is unknown — move them into a class folder")
        for note in result["tree_notes"]:
            print(note)
        if result["gradcam_skipped"]:
            print(result["gradcam_skipped"])
        if result["record"].abnormal_classes:
            print(f"abnormal: {', '.join(result['record'].abnormal_classes)}; a cell is flagged abnormal when "
                  f"{result['table']['abnormal_rule'].iloc[0]}")
        print(result["leak_check"])
        print(result["model_check"])
        print(f"\n{len(table)} images predicted, {len(result['skipped'])} skipped; reports in {result['output_dir']}")
        print(f"report: {result['report']}")
        if result["skipped"]:
            raise SystemExit(1)
