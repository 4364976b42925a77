"""A model's settings and record: what a training run is asked to do (`TrainingSettings`, one object from the
script to the learner), and what is written beside the weights (`ModelRecord`, `<save_loc>.json`): the classes
in output order, the image size, the recipe, the run's settings, the abnormal classes, the operating point and
the SHA-256 of every image the model trained on. The ONNX export's metadata mirrors the same record.

Nothing here imports torch, so the ONNX path and the file scripts read records without it.
"""
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from papsmear.files import UserError, atomic_output, check_class_names
from papsmear.screening import check_abnormal, check_operating_point

RECORD_VERSION = 2  # 1: the class list of earlier versions (classes, image_size, arch, recipe), still read
MAX_IMAGE_SIZE = 4096  # a stored image size above this is a damaged or hostile record, not a model of ours

# Settings a resumed run must share with the run that wrote its checkpoint: any of them changes the result.
RESUME_SETTINGS = ("data", "classes", "epochs", "batch_size", "lr", "image_size", "recipe", "monitor", "balance")


@dataclass
class TrainingSettings:
    """What one training run is asked to do, as the scripts' options name it; None for epochs, batch_size and lr
    means the recipe's (`papsmear.data.RECIPES`)."""
    path_folder: Path                       # formatted dataset: train/ val/ test/ models/
    save_loc: str = "resnet50"              # weights name: path_folder/models/<save_loc>.pth
    model_path: Path | None = None          # a .pth to start from
    export_path: Path | None = None         # the exported learner (default: models/<save_loc>.pkl)
    recipe: str = "original"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    image_size: int = 224
    pretrained: bool = True
    pretrained_weights: Path | None = None
    seed: int = 42
    lr_find: bool = False
    workers: int | None = None
    cache_size: int | None = None
    memory_budget: float | None = None
    monitor: str = "accuracy"
    balance: str = "none"
    resume: bool = False
    keep_last: bool = False
    onnx: bool = True
    int8: bool = False
    abnormal_classes: list | None = None    # the abnormal classes, named (or normal_classes: the others)
    normal_classes: list | None = None
    target_sensitivity: float | None = None  # choose the operating point on val reaching this sensitivity

    @classmethod
    def from_options(cls, options):
        "The settings of a script's options (a dict such as its `locals()`), ignoring names that are not settings."
        names = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in options.items() if name in names})

    def with_recipe(self, recipe_settings):
        "A copy with epochs, batch size and lr left unset taken from the recipe's settings."
        return replace(self, **{k: recipe_settings[k] for k in ("epochs", "batch_size", "lr")
                                if getattr(self, k) is None})

    def identity(self, classes):
        "What a resumed or finished run is compared on (`RESUME_SETTINGS`), as plain JSON values."
        return dict(data=str(self.path_folder), classes=list(map(str, classes)), epochs=self.epochs,
                    batch_size=self.batch_size, lr=self.lr, image_size=self.image_size, recipe=self.recipe,
                    monitor=self.monitor, balance=self.balance)

    def as_json(self):
        "Every setting as plain JSON values (paths as text)."
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class ModelRecord:
    "What a trained model is: written beside its weights as <name>.json and mirrored into its ONNX metadata."
    classes: list
    image_size: int
    arch: str = "resnet50"
    recipe: str = "original"
    abnormal_classes: list | None = None     # None: no grouping known (no screening figures)
    operating_point: dict | None = None      # `papsmear.screening.choose_operating_point`'s result
    training: dict = field(default_factory=dict)    # the run's settings (`TrainingSettings.as_json`)
    trained_on: list | None = None           # SHA-256 of every training image (an augmentation's: its source's)
    quantization: dict | None = None         # an INT8 ONNX export's settings

    def as_json(self):
        "The record as it is written: plain JSON values, with its version."
        return dict(version=RECORD_VERSION, **asdict(self))

    def write(self, path):
        "Write the record to `path` (<weights>.json) atomically."
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.as_json(), indent=1))
        return path

    @classmethod
    def from_json(cls, values, where):
        """The record of a JSON object read from `where`; refused in one line when it is not one of ours or
        holds values a model of ours cannot have (class names that are not plain folder names among them)."""
        try:
            classes, image_size = values["classes"], int(values["image_size"])
            known = {f.name for f in fields(cls)}
            record = cls(**{k: v for k, v in values.items() if k in known} | dict(image_size=image_size))
            usable = isinstance(classes, list) and classes and 0 < image_size <= MAX_IMAGE_SIZE
        except (KeyError, TypeError, ValueError, AttributeError):
            usable = False
        if not usable:
            raise UserError(f"{where} is not a model record written by R50.py / R50Herlev.py (it needs \"classes\" "
                            "and \"image_size\") — restore it, or use the .pkl export")
        record.classes = check_class_names(classes, where)
        check_abnormal(record.abnormal_classes, record.classes, where)
        check_operating_point(record.operating_point, where)
        if record.trained_on is not None and not (isinstance(record.trained_on, list)
                                                  and all(isinstance(h, str) for h in record.trained_on)):
            raise UserError(f"{where} lists its training images in a form this version cannot read — restore it")
        return record

    @classmethod
    def read(cls, path):
        "The record in a <weights>.json file; a clear error when it is missing or damaged."
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no model record {path} beside the weights — use the .pkl export, or weights saved by "
                            "R50.py / R50Herlev.py")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            values = None
        return cls.from_json(values if isinstance(values, dict) else {}, path)

    def onnx_metadata(self):
        "The record as ONNX metadata: one key per field an ONNX user reads, and the whole record as JSON."
        return dict(classes=json.dumps(self.classes), image_size=str(self.image_size), recipe=self.recipe,
                    arch=self.arch, record=json.dumps(self.as_json()))


def record_beside(model_path):
    "The record <name>.json beside a model file (.pth, .pkl, .onnx); None when there is none."
    path = Path(model_path).with_suffix(".json")
    return ModelRecord.read(path) if path.is_file() else None
