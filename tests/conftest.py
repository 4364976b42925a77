"""Shared fixtures: small synthetic datasets and one tiny trained model, made once per test session."""
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import synthetic_papsmear as demo
from papsmear import augment as extension
from papsmear import division, learner
from papsmear.files import RUN_RECORD
from papsmear.record import TrainingSettings

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 48


def tree_digest(folder):
    """Relative path → sha256 of every file under `folder`: equal digests mean byte-identical trees. The run
    records (the token of the last run that wrote there, new in every run) are left out."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != RUN_RECORD}


def placeholder_tree(root, counts, nested=True, suffix=".bmp", boundaries=True):
    """A raw SIPaKMeD-like tree of placeholder images (each with bytes of its own), `counts` images per class, with
    a .dat boundary file beside each when `boundaries`."""
    for name, n in counts.items():
        folder = root / f"im_{name}" / (f"im_{name}" if nested else "")
        folder.mkdir(parents=True)
        for i in range(1, n + 1):
            (folder / f"{i:03d}{suffix}").write_bytes(f"{name} {i}".encode())
            if boundaries:
                (folder / f"{i:03d}_cyt01.dat").write_text("1,1\n")
    return root


def train(path_folder, **options):
    "Train R50 on a formatted dataset with the options R50.py takes (as `papsmear.record.TrainingSettings`)."
    return learner.train_r50(TrainingSettings(path_folder, **options))


def run_in(cwd, script, *args):
    "Run a project script from the working directory `cwd`, as a user in their own folder would."
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True)


def run_script(script, *args):
    "Run a project script from the repository's folder; returns the CompletedProcess (text output)."
    return run_in(ROOT, script, *args)


def last_line(stderr):
    "The last line a script wrote to stderr (progress bars come before it)."
    return stderr.rstrip("\n").rsplit("\n", 1)[-1]


@pytest.fixture
def sipakmed_copy(formatted, tmp_path):
    "A copy of the demo SIPaKMeD division in the test's own folder, for tests that change it."
    return shutil.copytree(formatted / "sipakmed", tmp_path / "sipakmed")


@pytest.fixture(scope="session")
def raw_data(tmp_path_factory):
    "Raw synthetic SIPaKMeD (20 cluster images per class) and Herlev (10 cells per class)."
    root = tmp_path_factory.mktemp("raw")
    demo.generate_sipakmed(root / "sipakmed", n_images=20, seed=3)
    demo.generate_herlev(root / "herlev", n_images=10, seed=3)
    return root


@pytest.fixture(scope="session")
def formatted(raw_data, tmp_path_factory):
    "Divided SIPaKMeD and Herlev (session-wide: tests must not change them)."
    root = tmp_path_factory.mktemp("formatted")
    for name in ("sipakmed", "herlev"):
        division.divide_dataset(raw_data / name, root / name, progress=False)
    return root


@pytest.fixture(scope="session")
def trained(formatted, tmp_path_factory):
    "R50 trained for a few epochs on the Extended DA copy of the demo SIPaKMeD (no network, random init)."
    path, _ = extension.copy_dataset(formatted / "sipakmed", tmp_path_factory.mktemp("trained") / "sipakmed",
                                     progress=False)
    extension.extend_dataset(path, workers=2, progress=False)
    result = train(path, save_loc="tiny", epochs=4, batch_size=16, lr=0.01, image_size=IMAGE_SIZE,
                               pretrained=False, workers=0)
    return path, result
