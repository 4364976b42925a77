"""Triple Transfer Learning: weights trained on Extended DA → 7-class head, trained on Herlev → 5-class head,
trained on SIPaKMeD; the final weights and export go to sipakmed_path/models/<save_loc>.pth / .pkl.

Every stage starts from weights on disk (never from the network), so this script works offline as it is.
"""
from pathlib import Path
from typing import Annotated

from fastcore.script import call_parse

import TTLR50
from papsmear.files import one_line_usage_errors, user_errors

# --- edit these -----------------------------------------------------------------------------------
previous_model_DA = Path("data/sipakmed_extended/models/resnet50.pth")  # R50.py's weights on Extended DA
herlev_path = Path("data/herlev_formatted")        # formatted Herlev: train/ val/ test/ models/
sipakmed_path = Path("data/sipakmed_formatted")    # formatted SIPaKMeD: train/ val/ test/ models/
current_classes_of_dataset = 7                     # Herlev classes
output_classes_of_next_dataset = 5                 # SIPaKMeD classes
herlev_epochs = 10                                 # Herlev stage
herlev_batch_size = 5
herlev_save_loc = TTLR50.herlev_save_loc            # Herlev stage weights: herlev_path/models/<this>.pth
epochs = TTLR50.epochs                             # SIPaKMeD stage (defaults set in TTLR50.py)
batch_size = TTLR50.batch_size
lr = TTLR50.lr                                     # both stages
image_size = TTLR50.image_size
save_loc = TTLR50.save_loc                         # final model name, under sipakmed_path/models/
start_stage = 1                                    # 2: skip Herlev, start from its saved weights
recipe = "original"                                # training recipe of both stages: original or modern
seed = 42
workers = None                                     # data loader processes (default: one per core on a GPU, none on CPU)
cache_size = None                                  # when not in memory: a cache resized once to this side
memory_budget = None                               # GB for presized images in memory (None: automatic; 0: off)
monitor = "accuracy"                               # best epoch by: accuracy, balanced_accuracy or macro_f1
balance = "none"                                   # none, inverse / sqrt (class-weighted loss), sampler
resume = False                                     # continue the interrupted stage; finished stages are not redone
keep_last = False                                  # keep each stage's last-epoch checkpoint when it ends
onnx = True                                        # also export each stage's model as .onnx (README: Deploying)
int8 = False                                       # also export each stage's model as .int8.onnx (README: INT8)
abnormal_classes = None                            # final model's abnormal classes (None: SIPaKMeD's grouping)
normal_classes = None                              # or: its normal classes, whichever is shorter to name
target_sensitivity = None                          # final model's operating point: this sensitivity on val
# ---------------------------------------------------------------------------------------------------

one_line_usage_errors()


@call_parse
def main(previous_model_DA: Path = previous_model_DA,          # R50.py's .pth trained on Extended DA
         herlev_path: Path = herlev_path,                      # formatted Herlev dataset
         sipakmed_path: Path = sipakmed_path,                  # formatted SIPaKMeD dataset
         current_classes_of_dataset: int = current_classes_of_dataset,          # Herlev classes
         output_classes_of_next_dataset: int = output_classes_of_next_dataset,  # SIPaKMeD classes
         herlev_epochs: int = herlev_epochs,                   # Herlev stage epochs
         herlev_batch_size: int = herlev_batch_size,           # Herlev stage batch size
         herlev_save_loc: str = herlev_save_loc,               # Herlev stage weights name
         epochs: int = epochs,                                 # SIPaKMeD stage epochs
         batch_size: int = batch_size,                         # SIPaKMeD stage batch size
         lr: float = lr,                                       # maximum one-cycle learning rate of both stages
         image_size: int = image_size,                         # training image side in pixels
         save_loc: str = save_loc,                             # final weights name under sipakmed_path/models
         start_stage: int = start_stage,                       # 2: skip Herlev and start from its saved weights
         seed: int = seed,                                     # random seed
         workers: int = workers,                               # loader processes (default: 1 per core on GPU, 0 on CPU)
         cache_size: int = cache_size,                         # when not in memory: a cache resized once to this side
         recipe: str = recipe,                                 # original or modern (augmentation, loss, schedule)
         memory_budget: float = memory_budget,                 # GB for presized images held in memory; 0: off
         monitor: str = monitor,                               # best epoch by: accuracy, balanced_accuracy, macro_f1
         balance: str = balance,                               # none, inverse, sqrt (weighted loss), sampler
         resume: bool = resume,                                # continue the interrupted stage from its checkpoint
         keep_last: bool = keep_last,                          # keep each stage's last-epoch checkpoint
         onnx: bool = onnx,                                    # also export .onnx files (--no-onnx: off)
         int8: bool = int8,                                    # also export .int8.onnx files (checked against float)
         abnormal_classes: Annotated[list, {"nargs": "+", "type": str}] = abnormal_classes,  # final abnormal classes
         normal_classes: Annotated[list, {"nargs": "+", "type": str}] = normal_classes,  # or: the normal ones
         target_sensitivity: float = target_sensitivity):      # final operating point on val: this sensitivity
    "Triple Transfer Learning: Extended DA weights → Herlev (7 classes) → SIPaKMeD (5 classes)."
    options = dict(locals())  # every option, as triple_transfer names them
    with user_errors():
        from papsmear.launch import is_main_process  # after --help: torch loads only for real work

        results = TTLR50.triple_transfer(**options)
        if not is_main_process():
            return
        for stage, result in results.items():
            print(f"{stage} stage: validation accuracy {result['scores'].loc['validation', 'accuracy']:.4f}, "
                  f"weights {result['weights']}; {result['leak_check']}")
        final = results["sipakmed"]
        print(f"Final model: {final['weights']} and {final['export']}")
        print(f"Next: Inference_FastAI.py --model-path {final['export']} "
              f"--test-dataset-path {Path(sipakmed_path) / 'test'}")
        if int8 and not all(result["int8"] for result in results.values()):
            raise SystemExit(1)  # trained and exported as float; an INT8 file was refused (said above)
