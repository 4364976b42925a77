"""Tried as users try it: relative paths, paths with spaces, read-only and misplaced folders, kills mid-write,
nonsense numbers and wrong files. Each gives a result or a one-line error, and loses nothing."""
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import synthetic_papsmear as demo
import TTLR50
from conftest import IMAGE_SIZE, placeholder_tree, run_in, train, tree_digest
from papsmear import augment as extension
from papsmear import data, division, learner
from papsmear import files as papfiles
from papsmear import report as reporting


def one_line_error(capsys, step, code=2, **kwargs):
    """Run a step of the procedure in-process as its script does (errors turned into messages by
    `user_errors`); assert exit `code` and a one-line `error:`; return that line."""
    with pytest.raises(SystemExit) as exit_info, papfiles.user_errors():
        step(**kwargs)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    # Only a progress bar's lines may come before the error line.
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("error: ") and err.endswith(f"{last}\n") and "Traceback" not in err, err
    assert all(re.match(r"^\r|^[\w .-]+:\s+\d+%\|", line) for line in err.split("\n")[:-2]), err
    return last


@contextmanager
def read_only(folder):
    "Make `folder` unwritable, also for root (immutable attribute), for the duration of the block."
    folder.chmod(0o555)
    immutable = os.access(folder, os.W_OK) and subprocess.run(["chattr", "+i", str(folder)]).returncode == 0
    try:
        probe = folder / ".probe"
        try:
            probe.touch()
            probe.unlink()
            pytest.skip("this machine cannot make a folder read-only for the test's user")
        except OSError:
            pass
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def split_contents(output_dir):
    "Sorted contents of every image in the division (each original placeholder is unique by content)."
    return sorted(p.read_bytes() for s in division.SPLITS for p in (output_dir / s).rglob("*") if p.is_file())


# --- the procedure with relative paths ------------------------------------------------------------------------

def test_the_whole_procedure_runs_with_relative_paths_from_the_users_folder(tmp_path):
    work = tmp_path / "my project"  # a space in the path, too
    demo.generate_sipakmed(work / "data" / "sipakmed", n_images=10, seed=5)
    demo.generate_herlev(work / "data" / "herlev", n_images=8, seed=5)
    steps = [
        ("implementation_DatasetDivision.py", "--path-dir", "data/sipakmed", "--output-dir", "data/sipakmed_formatted"),
        ("implementation_DatasetDivision.py", "--path-dir", "data/herlev", "--output-dir", "data/herlev_formatted"),
        ("implementation_DataAugmentation_Extension.py", "--target-directory", "data/sipakmed_formatted",
         "--output-directory", "data/sipakmed_extended", "--n-augmentations", 2),
        ("R50.py", "--no-onnx", "--path-folder", "data/sipakmed_extended", "--epochs", 1, "--batch-size", 8,
         "--image-size", 32, "--no-pretrained"),
        ("R50Herlev.py", "--no-onnx", "--previous-model-da", "data/sipakmed_extended/models/resnet50.pth",
         "--herlev-path",
         "data/herlev_formatted", "--sipakmed-path", "data/sipakmed_formatted", "--herlev-epochs", 1,
         "--epochs", 1, "--image-size", 32),
        ("Inference_FastAI.py", "--model-path", "data/sipakmed_formatted/models/resnet50_ttl_sipakmed.pkl",
         "--test-dataset-path", "data/sipakmed_formatted/test"),
    ]
    for script, *args in steps:
        result = run_in(work, script, *args)
        assert result.returncode == 0, f"{script}: {result.stderr[-2000:]}"
    models = work / "data" / "sipakmed_extended" / "models"
    assert {p.name for p in models.iterdir()} >= {"resnet50.pth", "resnet50.json", "resnet50.pkl",
                                                   "resnet50_log.csv", "resnet50_curves.png"}
    assert not (work / "data" / "sipakmed_extended" / "data").exists()  # the path was not joined twice
    report = work / "data" / "sipakmed_formatted" / "models" / "resnet50_ttl_sipakmed_inference"
    assert json.loads((report / "metrics.json").read_text())["n_images"] == 10


# --- nothing lost --------------------------------------------------------------------------------------------

def test_move_then_force_ends_with_every_original_image_once(tmp_path):
    raw = placeholder_tree(tmp_path / "raw", {"A": 6, "B": 5}, boundaries=False)
    originals = sorted(p.read_bytes() for p in raw.rglob("*.bmp"))
    division.divide_dataset(raw, tmp_path / "out", move=True, progress=False)
    assert not list(raw.rglob("*.bmp"))
    new = raw / "im_A" / "im_A" / "007.bmp"  # new raw images appear; the user divides again
    new.write_bytes(b"A-7")
    division.divide_dataset(raw, tmp_path / "out", move=True, force=True, random_state=3, progress=False)
    assert split_contents(tmp_path / "out") == sorted([*originals, b"A-7"])
    assert not list(raw.rglob("*.bmp"))
    # and once more, copying this time: the moved images come back to the raw folder, and are copied
    division.divide_dataset(raw, tmp_path / "out", force=True, progress=False)
    assert sorted(p.read_bytes() for p in raw.rglob("*.bmp")) == split_contents(tmp_path / "out")
    assert split_contents(tmp_path / "out") == sorted([*originals, b"A-7"])


def test_force_never_deletes_the_raw_dataset_or_files_found_nowhere_else(tmp_path, capsys):
    out = tmp_path / "out"
    raw = placeholder_tree(out / "train", {"A": 4}, boundaries=False)  # raw images unzipped into output_dir/train
    before = tree_digest(out)
    err = one_line_error(capsys, division.divide_dataset, path_dir=raw, output_dir=out, force=True)
    assert "lies inside" in err and tree_digest(out) == before
    other = placeholder_tree(tmp_path / "raw", {"A": 4}, boundaries=False)
    (out / "val" / "A").mkdir(parents=True)
    (out / "val" / "A" / "only-copy.bmp").write_bytes(b"precious")
    err = one_line_error(capsys, division.divide_dataset, path_dir=other, output_dir=out, force=True)
    assert "not copies of path_dir's images" in err and "never deletes" in err
    assert (out / "val" / "A" / "only-copy.bmp").read_bytes() == b"precious"


def test_move_of_relative_links_moves_the_images_and_keeps_their_targets(tmp_path):
    store = placeholder_tree(tmp_path / "store", {"A": 4}, boundaries=False)
    raw = tmp_path / "raw" / "im_A"
    raw.mkdir(parents=True)
    for image in sorted(store.rglob("*.bmp")):
        (raw / image.name).symlink_to(os.path.relpath(image, raw))
    table, moved, _ = division.divide_dataset(tmp_path / "raw", tmp_path / "out", move=True, progress=False)
    assert moved == 4 and not list(raw.iterdir())
    outputs = [p for s in division.SPLITS for p in (tmp_path / "out" / s).rglob("*.bmp")]
    assert len(outputs) == 4 and not any(p.is_symlink() for p in outputs)
    assert sorted(p.read_bytes() for p in outputs) == sorted(p.read_bytes() for p in store.rglob("*.bmp"))


# --- interrupted and colliding writes -------------------------------------------------------------------------

def test_a_killed_dataset_copy_leaves_no_truncated_image(formatted, tmp_path, monkeypatch):
    real_copy, calls = shutil.copy2, []

    def copy_then_die(source, target, **kwargs):
        calls.append(target)
        if len(calls) == 5:
            Path(target).write_bytes(Path(source).read_bytes()[:100])  # half an image, then the kill
            raise KeyboardInterrupt
        return real_copy(source, target, **kwargs)

    monkeypatch.setattr(shutil, "copy2", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        extension.copy_dataset(formatted / "herlev", tmp_path / "copy", progress=False)
    assert all(p.stat().st_size == (formatted / "herlev" / p.relative_to(tmp_path / "copy")).stat().st_size
               for p in (tmp_path / "copy").rglob("*") if p.is_file())
    monkeypatch.setattr(shutil, "copy2", real_copy)
    extension.copy_dataset(formatted / "herlev", tmp_path / "copy", progress=False)
    dataset = {k: v for k, v in tree_digest(formatted / "herlev").items() if k.split("/")[0] not in ("cache", "models")}
    assert tree_digest(tmp_path / "copy") == dataset


def test_a_rerun_with_fewer_augmentations_removes_a_killed_runs_partial_file(formatted, tmp_path):
    path, _ = extension.copy_dataset(formatted / "herlev", tmp_path / "herlev", progress=False)
    extension.extend_dataset(path, n_augmentations=14, workers=1, progress=False)
    image = next((path / "train" / "normal_columnar").iterdir())
    partial = papfiles.partial_name(image.with_name(f"{image.stem}_aug14{image.suffix}"))
    partial.write_bytes(b"half")  # what a run killed while writing its 14th output leaves
    extension.extend_dataset(path, n_augmentations=1, workers=1, progress=False)
    assert not list(path.rglob("*.partial"))


def test_two_sources_that_would_write_the_same_outputs_are_refused(tmp_path, capsys):
    folder = tmp_path / "cells" / "A"
    folder.mkdir(parents=True)
    for suffix in (".bmp", ".png"):
        Image.new("RGB", (20, 20), "white").save(folder / f"a{suffix}")
    err = one_line_error(capsys, extension.extend_dataset, target_directory=tmp_path / "cells", output_format="jpg",
                         workers=1)
    assert "a.bmp and a.png" in err and "a_augNN.jpg" in err
    assert sorted(p.name for p in folder.iterdir()) == ["a.bmp", "a.png"]


def test_elongated_images_are_augmented_and_16_bit_or_float_ones_skipped_by_name(tmp_path, capsys):
    folder = tmp_path / "cells" / "A"
    folder.mkdir(parents=True)
    Image.new("RGB", (20, 20), "white").save(folder / "fine.png")
    # 1 x 3000 and 10 x 2000 pixels: imgaug's colour quantisation would shrink the short side to 0 pixels.
    Image.fromarray(np.full((1, 3000, 3), 128, np.uint8)).save(folder / "thin.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 2000, 3), np.uint8)).save(folder / "strip.png")
    Image.fromarray(np.full((30, 30), 40000, np.uint16)).save(folder / "deep.png")  # 16-bit grey
    Image.fromarray(np.full((30, 30), 0.5, np.float32)).save(folder / "float.tif")
    summary = extension.extend_dataset(tmp_path / "cells", seed=0, workers=1, progress=False)
    errors = "\n".join(summary["errors"])
    assert summary["skipped"] == 2
    assert "A/deep.png: ValueError: a 16-bit image (PIL mode I;16)" in errors
    assert "A/float.tif: ValueError: a float image (PIL mode F)" in errors
    for name, shape in (("fine", (20, 20)), ("thin", (3000, 1)), ("strip", (2000, 10))):
        outputs = sorted(folder.glob(f"{name}_aug*.png"))
        assert len(outputs) == 14 and all(Image.open(p).size == shape for p in outputs)
    assert not list(folder.glob("deep_aug*")) and not list(folder.glob("float_aug*"))


def test_the_export_is_replaced_in_one_step(tmp_path):
    target = tmp_path / "model.pkl"
    target.write_bytes(b"the previous export")

    class DiesWhileExporting:
        def export(self, fname):
            Path(fname).write_bytes(b"half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        learner.export_atomically(DiesWhileExporting(), target)
    assert target.read_bytes() == b"the previous export" and os.listdir(tmp_path) == ["model.pkl"]


# --- one-line errors instead of tracebacks ------------------------------------------------------------------------

def test_unusable_output_folders_are_one_line_errors(raw_data, trained, formatted, tmp_path, capsys):
    (tmp_path / "a file").write_text("")
    err = one_line_error(capsys, division.divide_dataset, path_dir=raw_data / "herlev", output_dir=tmp_path / "a file")
    assert "a file stands where a folder is needed" in err
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        err = one_line_error(capsys, division.divide_dataset, path_dir=raw_data / "herlev", output_dir=locked / "out")
        assert f"cannot use {locked / 'out'}" in err
        err = one_line_error(capsys, extension.copy_dataset, source=formatted / "herlev",
                             destination=locked / "copy")
        assert f"cannot use {locked / 'copy'}" in err
        err = one_line_error(capsys, reporting.evaluate_folder, model_path=trained[0] / "models" / "tiny.pkl",
                             test_dataset_path=formatted / "sipakmed" / "test", output_dir=locked / "report")
        assert f"cannot use {locked / 'report'}" in err


@pytest.mark.parametrize("option, value, message", [
    ("epochs", 0, "epochs is 0; it must be greater than 0"),
    ("batch_size", 0, "batch_size is 0; it must be greater than 0"),
    ("batch_size", -4, "batch_size is -4; it must be greater than 0"),
    ("image_size", 0, "image_size is 0; it must be greater than 0"),
    ("image_size", -32, "image_size is -32; it must be greater than 0"),
    ("workers", -1, "workers is -1; it must be 0 or more"),
    ("lr", 0.0, "lr is 0.0; it must be greater than 0"),
    ("save_loc", "models/x", "save_loc 'models/x' must be a plain name"),
    ("save_loc", "../../x", "save_loc '../../x' must be a plain name"),
    ("batch_size", 500, "batch_size 500 is larger than the training set"),
])
def test_r50_refuses_nonsense_options_before_training(formatted, tmp_path, capsys, option, value, message):
    path = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    options = dict(path_folder=path, epochs=1, image_size=IMAGE_SIZE, pretrained=False, workers=0)
    err = one_line_error(capsys, train, **{**options, option: value})
    assert message in err
    assert not list((path / "models").iterdir()) and not list(tmp_path.glob("x*"))


def test_r50herlev_refuses_nonsense_epochs_and_exports_as_checkpoints(trained, formatted, capsys):
    options = dict(previous_model_DA=trained[0] / "models" / "tiny.pth", herlev_path=formatted / "herlev",
                   sipakmed_path=formatted / "sipakmed", image_size=IMAGE_SIZE, workers=0)
    err = one_line_error(capsys, TTLR50.triple_transfer, **{**options, "herlev_epochs": 0})
    assert "herlev_epochs is 0; it must be greater than 0" in err
    err = one_line_error(capsys, TTLR50.triple_transfer, **{**options, "previous_model_DA": trained[1]["export"]})
    assert "is a fastai export (.pkl); give the weights file (.pth)" in err
    assert not (formatted / "herlev" / "models" / "resnet50_ttl_herlev.pth").exists()


def test_wrong_weight_files_are_named_in_one_line(formatted, trained, tmp_path, capsys):
    path = shutil.copytree(formatted / "sipakmed", tmp_path / "sipakmed")
    (tmp_path / "random.pth").write_bytes(os.urandom(1000))
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    options = dict(path_folder=path, epochs=1, image_size=IMAGE_SIZE, workers=0)
    for model_path, message in [(trained[1]["export"], "is a fastai export (.pkl)"),
                                (tmp_path / "random.pth", "cannot read weights"),
                                (tmp_path / "tensor.pth", "is not a model checkpoint")]:
        assert message in one_line_error(capsys, train, model_path=model_path, **options)
    err = one_line_error(capsys, train, pretrained_weights=tmp_path / "random.pth", **options)
    assert "is not a torchvision ResNet50 state dict" in err


@pytest.mark.parametrize("case, message", [
    ("not json", "is not a model record written by R50.py"),
    ("no classes", "is not a model record written by R50.py"),
    ("not a checkpoint", "cannot read weights"),
])
def test_inference_refuses_broken_weights_and_class_lists(trained, formatted, tmp_path, capsys, case, message):
    weights = shutil.copy(trained[0] / "models" / "tiny.pth", tmp_path / "tiny.pth")
    info = json.loads((trained[0] / "models" / "tiny.json").read_text())
    (tmp_path / "tiny.json").write_text(json.dumps(info))
    if case == "not json":
        (tmp_path / "tiny.json").write_text("{classes: [")
    elif case == "no classes":
        (tmp_path / "tiny.json").write_text(json.dumps({"image_size": 48}))
    else:
        Path(weights).write_bytes(b"not a checkpoint")
    err = one_line_error(capsys, reporting.evaluate_folder, model_path=weights,
                         test_dataset_path=formatted / "sipakmed" / "test", output_dir=tmp_path / "report")
    assert message in err


def test_data_that_cannot_train_is_refused_with_the_reason(formatted, tmp_path, capsys):
    path = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    options = dict(path_folder=path, epochs=1, batch_size=4, image_size=32, pretrained=False, workers=0)
    shutil.move(path / "train" / "normal_columnar", tmp_path / "aside")
    err = one_line_error(capsys, train, **options)
    assert "val has class(es) normal_columnar with no image in" in err
    shutil.move(tmp_path / "aside", path / "train" / "normal_columnar")
    broken = sorted((path / "train" / "normal_columnar").iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    err = one_line_error(capsys, train, **options)  # found while presizing, before training
    assert f"cannot read image {broken} (" in err and "remove or replace" in err
    err = one_line_error(capsys, train, **options, memory_budget=0)  # found when training stops on it
    assert f"e.g. {broken} (" in err and "remove or replace" in err
    broken.write_bytes(b"not an image")
    err = one_line_error(capsys, train, **options)  # found while measuring the presized images
    assert f"cannot read image {broken} (UnidentifiedImageError" in err


def test_export_path_in_a_new_folder_is_created(formatted, tmp_path):
    path = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    result = train(path, onnx=False, save_loc="x", export_path=tmp_path / "new" / "folder" / "x.pkl",
                               epochs=1,
                           batch_size=8, image_size=32, pretrained=False, workers=0)
    assert result["export"] == tmp_path / "new" / "folder" / "x.pkl" and result["export"].stat().st_size > 1000


# --- wrong answers without an error ------------------------------------------------------------------------

def test_output_inside_the_raw_dataset_is_refused_however_it_is_spelled(tmp_path, capsys, monkeypatch):
    raw = placeholder_tree(tmp_path / "raw", {"A": 4}, boundaries=False)
    (tmp_path / "link").symlink_to(raw)
    for output_dir in (tmp_path / "elsewhere" / ".." / "raw" / "out", tmp_path / "link" / "out"):
        err = one_line_error(capsys, division.divide_dataset, path_dir=raw, output_dir=output_dir)
        assert "is inside path_dir" in err
    assert tree_digest(raw) == tree_digest(placeholder_tree(tmp_path / "again", {"A": 4}, boundaries=False))
    monkeypatch.chdir(raw)
    table, copied, _ = division.divide_dataset(".", "../out", progress=False)
    assert copied == 4 and (tmp_path / "out" / "split.csv").exists()


def test_an_empty_class_folder_does_not_count_as_a_class(formatted, tmp_path, capsys):
    path = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    for split in ("train", "val", "test"):
        for image in (path / split / "normal_columnar").iterdir():
            image.unlink()
    err = one_line_error(capsys, TTLR50.triple_transfer, previous_model_DA=tmp_path / "x.pth", herlev_path=path,
                         sipakmed_path=formatted / "sipakmed")
    assert "has 6 classes with images" in err and "but 7 were expected" in err


def test_images_are_never_left_out_silently(raw_data, trained, formatted, tmp_path, capsys):
    raw = placeholder_tree(tmp_path / "raw", {"Parabasal": 4}, boundaries=False)
    shutil.copytree(raw / "im_Parabasal" / "im_Parabasal", raw / "Parabasal")
    err = one_line_error(capsys, division.divide_dataset, path_dir=raw, output_dir=tmp_path / "out")
    assert "Parabasal and im_Parabasal" in err and "both class Parabasal" in err
    # a class folder that is a link is augmented like the others
    cells = tmp_path / "cells"
    shutil.copytree(formatted / "herlev" / "train" / "normal_columnar", tmp_path / "elsewhere")
    cells.mkdir()
    (cells / "normal_columnar").symlink_to(tmp_path / "elsewhere")
    n_images = len(list((tmp_path / "elsewhere").iterdir()))
    summary = extension.extend_dataset(cells, n_augmentations=1, workers=1, progress=False)
    assert summary["found"] == summary["written"] == n_images > 0
    # loose images beside class folders are named in the inference report
    test = shutil.copytree(formatted / "sipakmed" / "test", tmp_path / "test")
    shutil.copy(next((test / "Parabasal").iterdir()), test / "loose.bmp")
    result = run_in(tmp_path, "Inference_FastAI.py", "--model-path", trained[0] / "models" / "tiny.pkl",
                    "--test-dataset-path", test, "--output-dir", tmp_path / "report", "--gradcam", 0,
                    "--bootstrap", 100)
    assert "left out 1 image(s) lying beside the class folders" in result.stdout
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["left_out"] == [str(test / "loose.bmp")]


def test_a_silent_network_times_out_with_the_offline_message(formatted, tmp_path, monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()  # accepts connections, never answers
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    real_download = torch.hub.download_url_to_file

    def download_from_silent_server(url, dst, *args, **kwargs):
        return real_download(f"http://127.0.0.1:{server.getsockname()[1]}/resnet50.pth", dst, *args, **kwargs)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download_from_silent_server)
    monkeypatch.setattr(learner, "DOWNLOAD_TIMEOUT", 1)
    dls = data.pap_dls(formatted / "sipakmed", IMAGE_SIZE, workers=0)
    with pytest.raises(papfiles.UserError, match="cannot download the ImageNet ResNet50 weights"):
        learner.pap_learner(dls, pretrained=True)
    server.close()
    assert accepted and socket.getdefaulttimeout() is None


def test_os_errors_read_as_sentences():
    assert papfiles.describe_os_error(PermissionError(13, "Permission denied", "/x")).startswith(
        "cannot use /x (Permission denied) — check its permissions")
