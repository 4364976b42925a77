"""Results that can be trusted: no image of one split reaches another, the cache never serves old pixels, a
run never destroys the weights it starts from, and an error of the scripts is told apart from bad input."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, run_in, train, tree_digest

sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy as accuracy_benchmark  # noqa: E402
from papsmear import data, division, leaks, presize
from papsmear import files as papfiles
from papsmear import report as reporting


def sha256s(folder):
    "SHA-256 of every file under `folder`."
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_extended_da_over_an_earlier_division_is_refused_or_rebuilt_and_never_trains_on_test_images(raw_data,
                                                                                                    tmp_path):
    division.divide_dataset(raw_data / "sipakmed", tmp_path / "divided", progress=False)
    augment = ("implementation_DataAugmentation_Extension.py", "--target-directory", "divided",
               "--output-directory", "extended", "--n-augmentations", 1, "--workers", 1)
    assert run_in(tmp_path, *augment).returncode == 0
    division.divide_dataset(raw_data / "sipakmed", tmp_path / "divided", random_state=7, force=True, progress=False)
    before = tree_digest(tmp_path / "extended")
    refused = run_in(tmp_path, *augment)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "image(s) that are not in target_directory" in refused.stderr and "--force" in refused.stderr
    assert tree_digest(tmp_path / "extended") == before  # refused before anything changed
    rebuilt = run_in(tmp_path, *augment, "--force")
    assert rebuilt.returncode == 0, rebuilt.stderr
    divided, extended = tmp_path / "divided", tmp_path / "extended"
    assert "removed" in rebuilt.stdout and "of another division" in rebuilt.stdout
    assert (extended / "split.csv").read_bytes() == (divided / "split.csv").read_bytes()
    assert not sha256s(extended / "train") & sha256s(divided / "test")
    assert sha256s(extended / "test") == sha256s(divided / "test")
    trained_from = {(p.parent.name, p.stem.rsplit("_aug", 1)[0]) for p in (extended / "train").rglob("*_aug01.*")}
    assert trained_from == {(p.parent.name, p.stem) for p in (divided / "train").rglob("*.bmp")}
    assert sha256s(raw_data / "sipakmed") >= sha256s(divided / "train")  # the source was only read


def test_a_test_image_copied_into_train_stops_training_and_evaluation(sipakmed_copy, trained, tmp_path):
    test_image = sorted((sipakmed_copy / "test" / "Parabasal").iterdir())[0]
    shutil.copy(test_image, sipakmed_copy / "train" / "Koilocytotic" / "renamed copy.bmp")
    result = run_in(tmp_path, "R50.py", "--no-onnx", "--path-folder", "sipakmed", "--epochs", 1, "--image-size", 32,
                    "--no-pretrained")
    error = result.stderr.rstrip("\n").rsplit("\n", 1)[-1]  # after the leak check's progress bar
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error.startswith("error: leak check: 1 image(s) of ")
    assert f"test/Parabasal/{test_image.name} = train/Koilocytotic/renamed copy.bmp" in error
    assert not list((sipakmed_copy / "models").iterdir())
    evaluated = run_in(tmp_path, "Inference_FastAI.py", "--model-path", trained[0] / "models" / "tiny.pkl",
                       "--test-dataset-path", "sipakmed/test", "--output-dir", "report")
    assert evaluated.returncode == 2 and "error: leak check: 1 image(s)" in evaluated.stderr
    assert not (tmp_path / "report").exists()


def test_an_augmentation_of_a_test_image_in_train_stops_training(sipakmed_copy, tmp_path, capsys):
    test_image = sorted((sipakmed_copy / "test" / "Metaplastic").iterdir())[0]
    augmented = sipakmed_copy / "train" / "Metaplastic" / f"{test_image.stem}_aug03.jpg"
    Image.open(test_image).convert("RGB").rotate(90).save(augmented)  # other bytes than any image of test/
    with pytest.raises(papfiles.UserError, match=r"leak check: 1 Extended DA image\(s\)") as error:
        data.pap_dls(sipakmed_copy, 32, 10, workers=0)
    assert f"train/Metaplastic/{augmented.name} from test/Metaplastic/{test_image.name}" in str(error.value)
    assert "--force" in str(error.value)
    augmented.rename(sipakmed_copy / "test" / "Metaplastic" / augmented.name)  # beside its source: no leak
    assert leaks.check_leaks(sipakmed_copy, progress=False).startswith("leak check: passed")


def test_cells_of_one_cluster_image_in_two_splits_are_a_warning_counted_by_number(tmp_path):
    for split, name, colour in [("train", "001_01", 10), ("test", "1_02", 20), ("val", "002_01", 30),
                                ("val", "002_02", 40), ("train", "003_01", 50), ("test", "003_02_aug01", 60)]:
        (tmp_path / split / "Parabasal").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (colour, 0, 0)).save(tmp_path / split / "Parabasal" / f"{name}.png")
    line = leaks.check_leaks(tmp_path, progress=False)
    assert line.startswith("leak check: passed (6 images in train/val/test, ")
    # 001_01 and 1_02 come from cluster image 1; 003_01 and (an augmentation of) 003_02 from 3; 002 is whole.
    assert "warning: 2 cluster image(s) have cells in several splits (e.g. Parabasal 001 in test and train)" in line


def test_a_passing_check_is_reported_and_remembered(trained, evaluated_json):
    path, result = trained
    assert result["leak_check"].startswith("leak check: passed (940 images in train/val/test, ")
    again = leaks.check_leaks(path, progress=False)
    assert again.endswith(", 0 hashed now)")  # the first check's hashes were remembered
    image = sorted((path / "test" / "Parabasal").iterdir())[0]
    os.utime(image)  # touched: its hash is computed anew
    assert leaks.check_leaks(path, progress=False).endswith(", 1 hashed now)")
    assert evaluated_json["leak_check"].startswith("leak check: passed (")


@pytest.fixture
def evaluated_json(trained, formatted, tmp_path):
    "metrics.json of the trained demo model evaluated on the demo test split."
    reporting.evaluate_folder(trained[0] / "models" / "tiny.pkl", formatted / "sipakmed" / "test",
                              output_dir=tmp_path / "report", gradcam=0, bootstrap=100)
    return json.loads((tmp_path / "report" / "metrics.json").read_text())


def test_an_image_replaced_with_its_time_kept_is_presized_anew(sipakmed_copy):
    data.pap_dls(sipakmed_copy, 32, 10, workers=0)
    cache = sipakmed_copy / "cache" / "32px"
    replaced, other = sorted((sipakmed_copy / "train" / "Parabasal").iterdir())[:2]
    stat = replaced.stat()
    assert other.stat().st_size == stat.st_size and other.read_bytes() != replaced.read_bytes()
    # What rsync -a or tar x do: new bytes, same size, the modification time of the file they replace.
    subprocess.run(["cp", "-p", str(other), str(replaced)], check=True)
    os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert replaced.stat().st_size == stat.st_size and replaced.stat().st_mtime_ns == stat.st_mtime_ns
    dls = data.pap_dls(sipakmed_copy, 32, 10, workers=0)
    new_entry = (cache / "train" / "Parabasal" / f"{replaced.name}.png").read_bytes()
    assert new_entry == (cache / "train" / "Parabasal" / f"{other.name}.png").read_bytes()
    store, i = dls.train.store, list(dls.train.items).index(replaced)
    start, height, width = (int(store[k][i]) for k in ("starts", "heights", "widths"))
    held = store["pixels"][start:start + height * width].numpy().reshape(height, width, 3)
    with Image.open(cache / "train" / "Parabasal" / f"{other.name}.png") as expected:
        assert np.array_equal(held, np.asarray(expected.convert("RGB")))


def test_a_cache_made_in_another_format_is_rebuilt(sipakmed_copy):
    root = presize.build_cache(sipakmed_copy, 30, progress=False)
    entry = next((root / "train" / "Parabasal").iterdir())
    good = entry.read_bytes()
    altered = bytes(good[:-20]) + bytes(b ^ 0xFF for b in good[-20:])  # same size: no damage the cache can see
    entry.write_bytes(altered)
    manifest = json.loads((root / "manifest.json").read_text())
    presize.build_cache(sipakmed_copy, 30, progress=False)
    assert entry.read_bytes() == altered  # the same format: the entry is trusted as it is
    for key, other in (("version", 1), ("resampling", "nearest")):
        entry.write_bytes(altered)
        (root / "manifest.json").write_text(json.dumps({**manifest, key: other}))
        presize.build_cache(sipakmed_copy, 30, progress=False)
        assert entry.read_bytes() == good


def test_folds_keep_augmentations_with_their_source_and_out_of_evaluation(trained, tmp_path):
    path, _ = trained
    for fold in accuracy_benchmark.fold_datasets(path, 3, 0, tmp_path):
        sources = {split: {(p.parent.name, p.stem) for p in (fold / split).rglob("*.bmp") if "_aug" not in p.stem}
                   for split in division.SPLITS}
        assert not sources["train"] & (sources["val"] | sources["test"])
        assert not list((fold / "val").rglob("*_aug*")) and not list((fold / "test").rglob("*_aug*"))
        augmented = {(p.parent.name, p.stem.rsplit("_aug", 1)[0]) for p in (fold / "train").rglob("*_aug*")}
        assert augmented and augmented <= sources["train"]  # every augmentation trains beside its source


def test_a_rerun_from_its_own_weights_keeps_them_unless_an_epoch_beats_them(trained, tmp_path):
    path = shutil.copytree(trained[0], tmp_path / "extended")
    for augmented in (path / "train").rglob("*_aug[0-9][0-9].*"):
        augmented.unlink()  # the epoch only has to run: its sources alone keep it short
    weights = path / "models" / "tiny.pth"
    before = weights.read_bytes()
    # lr 10 wrecks the model in one epoch: no epoch can beat the weights it started from.
    result = train(path, onnx=False, save_loc="tiny", model_path=weights, epochs=1, batch_size=16, lr=10.0,
                           image_size=48, pretrained=False, workers=0)
    assert weights.read_bytes() == before
    assert result["scores"].loc["validation", "accuracy"] == pytest.approx(
        trained[1]["scores"].loc["validation", "accuracy"], abs=1e-6)


def test_a_killed_rerun_leaves_the_weights_it_started_from(formatted, tmp_path):
    path = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    first = run_in(tmp_path, "R50.py", "--no-onnx", "--path-folder", "herlev", "--epochs", 1, "--image-size", 32,
                   "--no-pretrained", "--save-loc", "mine")
    assert first.returncode == 0, first.stderr
    outputs = {name: (path / "models" / name).read_bytes() for name in ("mine.pth", "mine_log.csv", "mine.json")}
    rerun = subprocess.Popen([sys.executable, "-u", str(ROOT / "R50.py"), "--no-onnx", "--path-folder", "herlev",
                              "--epochs", "5",
                              "--image-size", "32", "--lr", "0.01", "--save-loc", "mine",
                              "--model-path", "herlev/models/mine.pth"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = []

    def read():
        for chunk in iter(lambda: rerun.stdout.read(64), ""):
            seen.append(chunk)
    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 120
    while "Epoch 3/5" not in "".join(seen) and rerun.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    rerun.send_signal(signal.SIGKILL)
    rerun.wait()
    assert "Epoch 3/5" in "".join(seen)  # two epochs had ended
    assert {name: (path / "models" / name).read_bytes() for name in outputs} == outputs


PLANTED_FAULT = """
import runpy, sys
sys.path.insert(0, {root!r})
from papsmear import {module}
def broken(*args, **kwargs):
    raise ZeroDivisionError("a fault planted by the test")
{module}.{function} = broken
sys.argv = [{script!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("script, module, function", [
    ("implementation_DatasetDivision.py", "division", "divide_dataset"),
    ("R50.py", "learner", "train_r50"),
    ("Inference_FastAI.py", "report", "evaluate_folder"),
])
def test_an_error_of_the_scripts_exits_3_with_its_traceback(script, module, function, tmp_path):
    code = PLANTED_FAULT.format(root=str(ROOT), module=module, function=function, script=str(ROOT / script))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 3
    assert result.stderr.startswith("Traceback (most recent call last):") and "ZeroDivisionError" in result.stderr
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith("internal error: ZeroDivisionError: a fault planted by the test")
    assert "please report it" in result.stderr


def test_a_model_refuses_to_be_scored_on_images_it_trained_on_wherever_they_lie(trained, formatted, tmp_path):
    path, _ = trained
    record = json.loads((path / "models" / "tiny.json").read_text())
    # A labelled folder elsewhere (not a split of the model's dataset): two training images hidden among test ones.
    elsewhere = shutil.copytree(formatted / "sipakmed" / "test", tmp_path / "new cells")
    hidden = [p for p in sorted((path / "train" / "Parabasal").glob("*.bmp")) if "_aug" not in p.stem][:2]
    for k, image in enumerate(hidden):
        shutil.copy(image, elsewhere / "Parabasal" / f"unsuspicious {k}.bmp")
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in hidden} <= set(record["trained_on"])
    refused = run_in(tmp_path, "Inference_FastAI.py", "--model-path", path / "models" / "tiny.pth",
                     "--test-dataset-path", "new cells", "--output-dir", "report", "--gradcam", 0)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "model check: 2 of the 22 test images are images the model trained on" in refused.stderr
    assert "Parabasal/unsuspicious 0.bmp" in refused.stderr and not (tmp_path / "report" / "metrics.json").exists()
    warned = run_in(tmp_path, "Inference_FastAI.py", "--model-path", path / "models" / "tiny.pth",
                    "--test-dataset-path", "new cells", "--output-dir", "report", "--gradcam", 0, "--bootstrap", 100,
                    "--allow-trained-images")
    assert warned.returncode == 0, warned.stderr[-2000:]
    line = json.loads((tmp_path / "report" / "metrics.json").read_text())["model_check"]
    assert line.startswith("model check: warning: 2 of the 22 test images") and line in warned.stdout
    assert line in (tmp_path / "report" / "report.html").read_text()
    clean = run_in(tmp_path, "Inference_FastAI.py", "--model-path", path / "models" / "tiny.pth",
                   "--test-dataset-path", formatted / "sipakmed" / "test", "--output-dir", "clean", "--gradcam", 0,
                   "--bootstrap", 100)
    assert "model check: passed (none of the 20 test images is among the 60 images the model trained on" in \
        clean.stdout


def test_trees_with_links_out_empty_files_and_classes_missing_from_val(trained, formatted, tmp_path):
    tree = tmp_path / "scanner"
    shutil.copytree(formatted / "sipakmed" / "test" / "Parabasal", tree / "slide 1")
    (tree / "slide 1" / "empty.png").write_bytes(b"")
    (tree / "slide 1" / "notes.txt").write_text("not an image")
    (tree / "slide 1" / "elsewhere").symlink_to(formatted / "sipakmed" / "train")  # a link out of the tree
    result = run_in(tmp_path, "Inference_FastAI.py", "--model-path", trained[0] / "models" / "tiny.pth",
                    "--test-dataset-path", tree, "--output-dir", "out", "--gradcam", 0)
    assert result.returncode == 1 and "skipped unreadable image" in result.stdout and "empty.png" in result.stdout
    assert "leads out of" in result.stdout and "elsewhere" in result.stdout
    predicted = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert sorted(predicted["relative_path"]) == sorted(f"slide 1/{p.name}" for p in (tree / "slide 1").glob("*.bmp"))
    # A class with one training image and none in val trains all the same.
    data = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    for image in sorted((data / "train" / "normal_columnar").iterdir())[1:]:
        image.unlink()
    shutil.rmtree(data / "val" / "normal_columnar")
    trained_anyway = run_in(tmp_path, "R50.py", "--path-folder", "herlev", "--epochs", 1, "--image-size", 32,
                            "--no-pretrained", "--no-onnx")
    assert trained_anyway.returncode == 0, trained_anyway.stderr[-2000:]
