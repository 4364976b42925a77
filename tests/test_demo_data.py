"""The synthetic Pap-smear generator: real raw layouts, deterministic, and learnable classes."""
import numpy as np
import pytest
from PIL import Image
from sklearn.ensemble import RandomForestClassifier

import synthetic_papsmear as demo
from conftest import run_script, tree_digest


def test_sipakmed_layout_is_the_real_download(tmp_path):
    demo.generate_sipakmed(tmp_path, n_images=4, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "im_Dyskeratotic", "im_Koilocytotic", "im_Metaplastic", "im_Parabasal", "im_Superficial-Intermediate"]
    for name in demo.SIPAKMED_CLASSES:
        folder = tmp_path / f"im_{name}" / f"im_{name}"
        bmps = sorted(p.name for p in folder.glob("*.bmp"))
        assert bmps == ["001.bmp", "002.bmp", "003.bmp", "004.bmp"]
        for i in range(1, 5):
            cyt = sorted(folder.glob(f"{i:03d}_cyt*.dat"))
            nuc = sorted(folder.glob(f"{i:03d}_nuc*.dat"))
            crops = sorted((folder / "CROPPED").glob(f"{i:03d}_*.bmp"))
            assert 3 <= len(cyt) <= 5 and len(nuc) == len(cyt) == len(crops)
            assert cyt[0].name == f"{i:03d}_cyt01.dat" and crops[0].name == f"{i:03d}_01.bmp"
            x, y = map(float, cyt[0].read_text().splitlines()[0].split(","))
            assert 0 <= x <= 160 and 0 <= y <= 120
        with Image.open(folder / "001.bmp") as image:
            assert image.format == "BMP" and image.mode == "RGB" and image.size == (160, 120)


def test_herlev_layout_is_the_real_download(tmp_path):
    demo.generate_herlev(tmp_path, n_images=3, size=60, seed=1)
    pictures = tmp_path / "New database pictures"
    assert sorted(p.name for p in pictures.iterdir()) == list(demo.HERLEV_CLASSES)
    assert "normal_superficiel" in demo.HERLEV_CLASSES
    for name in demo.HERLEV_CLASSES:
        images = sorted(p for p in (pictures / name).iterdir() if p.suffix == ".BMP")
        masks = sorted((pictures / name).glob("*-d.bmp"))
        assert len(images) == 3 and len(masks) == 3
        assert [m.name for m in masks] == [f"{p.stem}-d.bmp" for p in images]
        with Image.open(images[0]) as image, Image.open(masks[0]) as mask:
            assert image.size == mask.size and 48 <= image.width <= 72
            colours = {tuple(c) for c in np.asarray(mask).reshape(-1, 3)}
            assert colours == {(0, 0, 0), (0, 0, 255), (255, 0, 0)}


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    for run in ("a", "b"):
        demo.generate_sipakmed(tmp_path / run / "s", n_images=3, seed=7)
        demo.generate_herlev(tmp_path / run / "h", n_images=3, seed=7)
    demo.generate_sipakmed(tmp_path / "c" / "s", n_images=3, seed=8)
    first, second, other = (tree_digest(tmp_path / run / "s") for run in ("a", "b", "c"))
    assert first == second and tree_digest(tmp_path / "a" / "h") == tree_digest(tmp_path / "b" / "h")
    image = "im_Parabasal/im_Parabasal/001.bmp"
    assert first[image] != other[image]


def colour_features(path):
    "Simple colour and size statistics of an image: what a trivial classifier sees."
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    background = np.median(pixels.reshape(-1, 3), axis=0)
    cell = np.abs(pixels - background).sum(-1) > 0.12
    dark = pixels.mean(-1) < 0.35
    stained = pixels[cell] if cell.any() else pixels.reshape(-1, 3)
    return [*stained.mean(0), *stained.std(0), cell.mean(), dark.mean(), dark.sum() / max(cell.sum(), 1)]


@pytest.mark.parametrize("dataset", ["sipakmed", "herlev"])
def test_classes_are_learnable_on_held_out_samples(tmp_path, dataset):
    def features(seed):
        root = tmp_path / str(seed)
        if dataset == "sipakmed":
            demo.generate_sipakmed(root, n_images=12, seed=seed)
            files = sorted(root.glob("im_*/im_*/*.bmp"))
            return [colour_features(f) for f in files], [f.parent.name for f in files]
        demo.generate_herlev(root, n_images=12, seed=seed)
        files = sorted(p for p in root.rglob("*.BMP"))
        return [colour_features(f) for f in files], [f.parent.name for f in files]

    (x_train, y_train), (x_test, y_test) = features(1), features(2)
    score = RandomForestClassifier(random_state=0).fit(x_train, y_train).score(x_test, y_test)
    chance = 1 / len(set(y_train))
    assert score > max(0.75, 3 * chance)


def test_command_line_writes_both_datasets(tmp_path):
    result = run_script("demo/synthetic_papsmear.py", "--out", tmp_path, "--n-sipakmed", 3, "--n-herlev", 3)
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("sipakmed/im_*/im_*/*.bmp"))) == 15
    assert len(list(tmp_path.glob("herlev/New database pictures/*/*.BMP"))) == 21
