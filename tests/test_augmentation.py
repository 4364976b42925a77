"""implementation_DataAugmentation_Extension.py: the 14 groups, reproducible, idempotent, safe."""
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_script, tree_digest
from papsmear import augment as extension
from papsmear import files as papfiles

# Groups that can legitimately return the image unchanged: 10 may pick GaussianBlur with a sigma close
# to 0; 11 and 12 may pick ChannelShuffle and draw the identity order (1 time in 6).
CAN_BE_IDENTICAL = {10, 11, 12}


@pytest.fixture
def dataset(formatted, tmp_path):
    "A private copy of the divided demo SIPaKMeD."
    shutil.copytree(formatted / "sipakmed", tmp_path / "sipakmed")
    return tmp_path / "sipakmed"


@pytest.fixture(scope="module")
def cell_image(raw_data):
    return extension.load_rgb(raw_data / "sipakmed" / "im_Koilocytotic" / "im_Koilocytotic" / "001.bmp")


def test_imgaug_imports_under_numpy_2_without_touching_np_bool():
    extension.imgaug_augmenters()  # the one way in: the NumPy 2 table first, then imgaug
    import imgaug
    assert int(np.__version__.split(".")[0]) >= 2 and imgaug.__version__ == "0.4.0"
    assert np.bool is np.bool_  # NumPy's own type, not Python's bool (which breaks numpy.ma)
    assert np.float64 in np.sctypes["float"] and np.uint8 in np.sctypes["uint"]


@pytest.mark.parametrize("group", range(1, 15))
def test_each_group_returns_a_changed_same_shape_rgb_image(cell_image, group):
    augmenter = extension.augmentation_groups()[group - 1]
    changed = 0
    for seed in range(6):
        augmenter.seed_(extension.group_seed(seed, "x.bmp", group))
        out = augmenter.augment_image(cell_image)
        assert out.shape == cell_image.shape and out.dtype == np.uint8
        changed += not np.array_equal(out, cell_image)
    assert changed == 6 or (group in CAN_BE_IDENTICAL and changed >= 4)


@pytest.mark.parametrize("group, channel", [(7, 0), (8, 1), (9, 2)])
def test_red_green_blue_adds_change_the_named_channel_only(cell_image, group, channel):
    image = np.full((16, 16, 3), 100, np.uint8)
    augmenter = extension.augmentation_groups()[group - 1]
    augmenter.seed_(1)
    out = augmenter.augment_image(image).astype(int)
    assert (out[..., channel] >= 110).all() and (out[..., channel] <= 200).all()
    others = [c for c in range(3) if c != channel]
    assert (out[..., others] == 100).all()


def test_fourteen_named_outputs_per_training_image_only(dataset):
    val_test = {k: v for k, v in tree_digest(dataset).items() if not k.startswith("train/")}
    summary = extension.extend_dataset(dataset, workers=2, progress=False)
    assert summary["found"] == 60 and summary["written"] == 60 * 14 and summary["skipped"] == 0
    train = sorted(p.name for p in (dataset / "train" / "Parabasal").iterdir())
    stems = sorted({name[:3] for name in train})
    assert len(stems) == 12
    assert train == sorted([f"{s}.bmp" for s in stems] + [f"{s}_aug{i:02d}.bmp" for s in stems for i in range(1, 15)])
    assert {k: v for k, v in tree_digest(dataset).items() if not k.startswith("train/")} == val_test
    with Image.open(dataset / "train" / "Parabasal" / f"{stems[0]}_aug07.bmp") as out:
        assert out.format == "BMP" and out.mode == "RGB"


def test_outputs_do_not_depend_on_the_number_of_workers(formatted, tmp_path):
    for workers in (1, 2):
        shutil.copytree(formatted / "herlev" / "train", tmp_path / str(workers))
        extension.extend_dataset(tmp_path / str(workers), n_augmentations=3, workers=workers, progress=False)
    assert tree_digest(tmp_path / "1") == tree_digest(tmp_path / "2")
    assert len(tree_digest(tmp_path / "1")) == 42 * 4


def test_rerun_writes_nothing_and_never_augments_augmentations(dataset):
    extension.extend_dataset(dataset, n_augmentations=2, progress=False)
    before = tree_digest(dataset)
    again = extension.extend_dataset(dataset, n_augmentations=2, progress=False)
    assert (again["found"], again["already_done"], again["written"]) == (60, 60, 0)
    assert tree_digest(dataset) == before and not list(dataset.rglob("*_aug01_aug*"))


def test_an_interrupted_run_is_completed_by_the_next(formatted, tmp_path, monkeypatch):
    shutil.copytree(formatted / "herlev" / "train", tmp_path / "ref")
    shutil.copytree(formatted / "herlev" / "train", tmp_path / "cut")
    extension.extend_dataset(tmp_path / "ref", n_augmentations=3, workers=1, progress=False)
    real_save, saved = extension.save_atomically, []

    def save_then_die(array, path):
        saved.append(path)
        if len(saved) == 20:  # killed while writing the 20th output
            papfiles.partial_name(path).write_bytes(b"half")  # what atomic_output was writing
            raise RuntimeError("killed")
        real_save(array, path)

    monkeypatch.setattr(extension, "save_atomically", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        extension.extend_dataset(tmp_path / "cut", n_augmentations=3, workers=1, progress=False)
    # The pool may start on the next image before the run stops, so at least 19 outputs exist, not all.
    existing = len([p for p in (tmp_path / "cut").rglob("*_aug0*") if p.suffix == ".BMP"])
    assert 19 <= existing < 42 * 3
    monkeypatch.setattr(extension, "save_atomically", real_save)
    summary = extension.extend_dataset(tmp_path / "cut", n_augmentations=3, workers=1, progress=False)
    assert summary["written"] == 42 * 3 - existing
    assert not list((tmp_path / "cut").rglob("*.partial"))
    assert tree_digest(tmp_path / "cut") == tree_digest(tmp_path / "ref")


def test_output_directory_leaves_the_source_untouched(dataset, tmp_path):
    before = tree_digest(dataset)
    result = run_script("implementation_DataAugmentation_Extension.py", "--target-directory", dataset,
                        "--output-directory", tmp_path / "extended", "--n-augmentations", 2)
    assert result.returncode == 0, result.stderr
    assert tree_digest(dataset) == before
    assert len(list((tmp_path / "extended" / "train").rglob("*_aug02.bmp"))) == 60
    assert (tmp_path / "extended" / "split.csv").read_bytes() == (dataset / "split.csv").read_bytes()
    assert "120 new outputs" in result.stdout


def test_splits_option_augments_val_with_a_warning(dataset):
    result = run_script("implementation_DataAugmentation_Extension.py", "--target-directory", dataset,
                        "--n-augmentations", 1, "--splits", "train", "val")
    assert result.returncode == 0 and "validation/test scores optimistic" in result.stderr
    assert len(list(dataset.rglob("*_aug01.bmp"))) == 80 and not list((dataset / "test").rglob("*_aug*"))


def test_grayscale_and_rgba_inputs_become_rgb(tmp_path):
    (tmp_path / "A").mkdir()
    Image.new("L", (40, 30), 120).save(tmp_path / "A" / "gray.png")
    Image.new("RGBA", (40, 30), (200, 100, 50, 128)).save(tmp_path / "A" / "alpha.png")
    extension.extend_dataset(tmp_path, n_augmentations=14, workers=1, progress=False)
    for name in ("gray_aug05.png", "alpha_aug12.png"):
        with Image.open(tmp_path / "A" / name) as out:
            assert out.mode == "RGB" and out.size == (40, 30)


def test_corrupt_image_is_named_skipped_and_gives_exit_code_1(formatted, tmp_path):
    shutil.copytree(formatted / "herlev" / "train", tmp_path / "train")
    (tmp_path / "train" / "normal_columnar" / "broken.bmp").write_bytes(b"BM not really")
    (tmp_path / "train" / "normal_columnar" / "mask-d.bmp").write_bytes(b"never read")
    result = run_script("implementation_DataAugmentation_Extension.py", "--target-directory", tmp_path / "train",
                        "--n-augmentations", 1)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "skipped image normal_columnar/broken.bmp" in result.stdout
    assert "images found 43, augmented 42, already done 0, skipped 1: 42 new outputs" in result.stdout
    assert not (tmp_path / "train" / "normal_columnar" / "mask-d_aug01.bmp").exists()


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_or_empty_target_exits_2(tmp_path, case):
    target = tmp_path / "target"
    if case == "empty":
        (target / "train" / "A").mkdir(parents=True)
    result = run_script("implementation_DataAugmentation_Extension.py", "--target-directory", target)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_output_format_jpg_saves_disk_and_counts_as_done(formatted, tmp_path):
    shutil.copytree(formatted / "herlev" / "train" / "normal_columnar", tmp_path / "A")
    first = extension.extend_dataset(tmp_path, n_augmentations=2, workers=1, output_format="jpg", progress=False)
    outputs = sorted(tmp_path.rglob("*_aug*"))
    assert first["written"] == 12 and {p.suffix for p in outputs} == {".jpg"}
    with Image.open(outputs[0]) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
    assert extension.extend_dataset(tmp_path, n_augmentations=2, output_format="jpg", progress=False)["written"] == 0
    with pytest.raises(extension.UserError, match="output_format gif is not one of"):
        extension.extend_dataset(tmp_path, output_format="gif", progress=False)
