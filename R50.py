"""Train a ResNet50 on a formatted dataset (train/val/test/models), e.g. the Extended DA SIPaKMeD.

Keeps the epoch with the best validation accuracy (or the score set by `monitor`); writes
path_folder/models/<save_loc>.pth (+ .json class list), the exported learner <save_loc>.pkl, the CSV log and
the training curves.
"""
from pathlib import Path
from typing import Annotated

from fastcore.script import call_parse

from papsmear.files import one_line_usage_errors, user_errors

# --- edit these -----------------------------------------------------------------------------------
path_folder = Path("data/sipakmed_formatted")  # formatted dataset: train/ val/ test/ models/
save_loc = "resnet50"           # weights name: path_folder/models/<save_loc>.pth
model_path = None               # a .pth to start from (resume / fine-tune); same classes as the data
export_path = None              # exported learner; default path_folder/models/<save_loc>.pkl
recipe = "original"             # "original" (its hyper-parameters) or "modern" (README: Training recipes)
epochs = None                   # None: the recipe's (original 50, modern 100)
batch_size = None               # None: the recipe's (original 10, modern 32)
lr = None                       # maximum learning rate; None: the recipe's (original 0.001, modern 0.003)
image_size = 224                # images are resized (and cropped) to image_size x image_size
pretrained = True               # start from ImageNet weights (downloaded once into torch's hub cache)
pretrained_weights = None       # or: a local torchvision ResNet50 state-dict file to start from
seed = 42
lr_find = False                 # also run fastai's lr_find: saves its plot and prints the suggestion
workers = None                  # data loader processes (default: one per core on a GPU, none on CPU)
cache_size = None               # files path: decode + resize every image once to this shorter side, e.g. 258
memory_budget = None            # GB the presized images may hold in memory (None: automatic; 0: read files)
monitor = "accuracy"            # validation score that picks the best epoch: accuracy, balanced_accuracy, macro_f1
balance = "none"                # imbalanced classes: none, inverse / sqrt (class-weighted loss), sampler
resume = False                  # continue the interrupted run <save_loc> from models/<save_loc>.last.pth
keep_last = False               # keep models/<save_loc>.last.pth when the run ends (it is removed otherwise)
onnx = True                     # also export models/<save_loc>.onnx, checked against fastai (README: Deploying)
int8 = False                    # also export models/<save_loc>.int8.onnx, checked against the float one (README: INT8)
abnormal_classes = None         # screening: the abnormal classes (None: SIPaKMeD's or Herlev's grouping), e.g.
normal_classes = None           # ["HSIL", "LSIL"]; or name the normal ones instead, whichever is shorter
target_sensitivity = None       # operating point: the threshold on p(abnormal) reaching this sensitivity on val
# ---------------------------------------------------------------------------------------------------

one_line_usage_errors()


@call_parse
def main(path_folder: Path = path_folder,        # formatted dataset: train/ val/ test/ models/
         save_loc: str = save_loc,                # weights name: path_folder/models/<save_loc>.pth
         model_path: Path = model_path,           # a .pth to start from (resume / fine-tune)
         export_path: Path = export_path,         # exported learner (default: path_folder/models/<save_loc>.pkl)
         recipe: str = recipe,                    # original (the default) or modern; see the README's Training recipes
         epochs: int = epochs,                    # epochs (default: the recipe's, original 50, modern 100)
         batch_size: int = batch_size,            # images per batch (default: the recipe's, original 10, modern 32)
         lr: float = lr,                          # maximum learning rate (default: the recipe's, 0.001 / 0.003)
         image_size: int = image_size,            # training image side in pixels
         pretrained: bool = pretrained,           # start from ImageNet weights (needs them downloaded once)
         pretrained_weights: Path = pretrained_weights,  # a local torchvision ResNet50 state-dict file instead
         seed: int = seed,                        # random seed (data order, augmentation, head initialisation)
         lr_find: bool = lr_find,                 # run fastai's lr_find first: plot + suggestion, lr unchanged
         workers: int = workers,                  # data loader processes (default: one per core on a GPU, none on CPU)
         cache_size: int = cache_size,            # when not in memory: read a cache resized once to this shorter side
         memory_budget: float = memory_budget,    # GB for presized images in memory (GPU, else RAM); 0: read files
         monitor: str = monitor,                  # best epoch by: accuracy, balanced_accuracy or macro_f1
         balance: str = balance,                  # none, inverse or sqrt (class-weighted loss), sampler (equal draws)
         resume: bool = resume,                   # continue the interrupted run from its last-epoch checkpoint
         keep_last: bool = keep_last,             # keep the last-epoch checkpoint when the run ends
         onnx: bool = onnx,                       # also export <save_loc>.onnx for ONNX Runtime (--no-onnx: off)
         int8: bool = int8,                       # also export <save_loc>.int8.onnx (INT8, checked against float)
         abnormal_classes: Annotated[list, {"nargs": "+", "type": str}] = abnormal_classes,  # abnormal class names
         normal_classes: Annotated[list, {"nargs": "+", "type": str}] = normal_classes,  # or: the normal ones
         target_sensitivity: float = target_sensitivity):  # operating point on val: threshold reaching this
    "Train a ResNet50 on a formatted Pap-smear dataset; save the best weights and export the learner."
    options = dict(locals())  # every option, as TrainingSettings names them
    with user_errors():
        from papsmear import learner  # after --help: torch loads only for real work
        from papsmear.launch import is_main_process
        from papsmear.record import TrainingSettings

        result = learner.train_r50(TrainingSettings.from_options(options))
        if not is_main_process():
            return
        print(result["scores"].round(4).to_string())
        print(result["leak_check"])
        if result["record"].operating_point:
            point = result["record"].operating_point
            print(f"operating point: p(abnormal) ≥ {point['threshold']:.4f} reaches sensitivity "
                  f"{point['sensitivity']:.3f} (specificity {point['specificity']:.3f}) on the validation split")
        for key in ("weights", "classes", "export", "onnx", "int8", "log", "curves"):
            if result[key]:
                print(f"{key:>8}: {result[key]}")
        print(f"Next: evaluate with Inference_FastAI.py --model-path {result['export']} "
              f"--test-dataset-path {Path(path_folder) / 'test'}")
        if int8 and not result["int8"]:
            raise SystemExit(1)  # trained and exported as float; the INT8 file was refused (said above)
