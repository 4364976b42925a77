"""implementation_DatasetDivision.py: the original's split rule, both raw layouts, nothing lost, safe reruns."""
import csv
import hashlib
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import placeholder_tree, run_script, tree_digest
from papsmear import division, leaks
from papsmear import files as papfiles
from papsmear.files import UserError

REAL_SIPAKMED_CLUSTERS = {"Dyskeratotic": 271, "Koilocytotic": 238, "Metaplastic": 223, "Parabasal": 108,
                          "Superficial-Intermediate": 126}


def split_rows(output_dir):
    with (Path(output_dir) / "split.csv").open() as f:
        return list(csv.DictReader(f))


def output_images(output_dir):
    return sorted(p.relative_to(output_dir).as_posix() for s in division.SPLITS
                  for p in (Path(output_dir) / s).rglob("*") if p.is_file())


def test_real_sipakmed_counts_give_the_originals_196_194_576(tmp_path):
    raw = placeholder_tree(tmp_path / "raw", REAL_SIPAKMED_CLUSTERS)
    table, copied, _ = division.divide_dataset(raw, tmp_path / "out", progress=False)
    assert (table.loc["total", "test"], table.loc["total", "val"], table.loc["total", "train"]) == (196, 194, 576)
    assert copied == 966 and table.loc["total", "skipped"] == 966  # the .dat files
    assert table.loc["Dyskeratotic"].tolist() == [271, 162, 54, 55, 271]
    assert len(output_images(tmp_path / "out")) == 966 and (tmp_path / "out" / "models").is_dir()


def test_split_follows_sklearn_train_test_split_exactly():
    from sklearn.model_selection import train_test_split
    files = [f"f{i:03d}.bmp" for i in range(50)]
    rest, test = train_test_split(files, test_size=0.2, random_state=42)
    train, val = train_test_split(rest, test_size=0.25, random_state=42)
    assert division.split_class(list(reversed(files))) == (train, val, test)


def test_same_inputs_give_the_same_division(raw_data, tmp_path):
    for out in ("a", "b"):
        division.divide_dataset(raw_data / "sipakmed", tmp_path / out, progress=False)
    assert (tmp_path / "a" / "split.csv").read_bytes() == (tmp_path / "b" / "split.csv").read_bytes()
    division.divide_dataset(raw_data / "sipakmed", tmp_path / "c", random_state=7, progress=False)
    assert (tmp_path / "a" / "split.csv").read_bytes() != (tmp_path / "c" / "split.csv").read_bytes()


def test_demo_sipakmed_layout_cluster_and_cropped(raw_data, tmp_path):
    source = tree_digest(raw_data / "sipakmed")
    table, _, _ = division.divide_dataset(raw_data / "sipakmed", tmp_path / "clusters", progress=False)
    assert table.loc["total", "found"] == 100 and table.loc["total"][["train", "val", "test"]].sum() == 100
    assert sorted(p.name for p in (tmp_path / "clusters" / "train").iterdir()) == sorted(division.class_folders(
        raw_data / "sipakmed"))
    assert not [f for f in output_images(tmp_path / "clusters") if not f.endswith(".bmp")]  # no .dat
    n_cropped = len(list(raw_data.glob("sipakmed/im_*/im_*/CROPPED/*.bmp")))
    table, _, _ = division.divide_dataset(raw_data / "sipakmed", tmp_path / "cells", cropped=True, progress=False)
    assert table.loc["total", "found"] == n_cropped == len(output_images(tmp_path / "cells"))
    assert tree_digest(raw_data / "sipakmed") == source  # copying left the download as it was


def test_herlev_masks_are_never_samples_and_upper_case_extensions_are(raw_data, tmp_path):
    table, _, _ = division.divide_dataset(raw_data / "herlev", tmp_path / "out", progress=False)
    images = output_images(tmp_path / "out")
    assert len(images) == 70 and all(f.endswith(".BMP") for f in images)
    assert table.loc["total", "skipped"] == 70  # the -d.bmp masks
    assert sorted(p.name for p in (tmp_path / "out" / "test").iterdir())[0] == "carcinoma_in_situ"


def test_images_directly_in_class_folders_and_other_extensions(tmp_path):
    raw = placeholder_tree(tmp_path / "raw", {"A": 5, "B": 6}, nested=False, suffix=".JPG")
    (raw / "im_A" / "notes.txt").write_text("not an image")
    (raw / "im_B" / "x.Png").write_bytes(b"")
    table, _, _ = division.divide_dataset(raw, tmp_path / "out", progress=False)
    assert table.loc["A"].tolist() == [5, 3, 1, 1, 6] and table.loc["B"].tolist() == [7, 3, 2, 2, 6]


def test_move_takes_the_files_out_and_loses_none(tmp_path):
    raw = placeholder_tree(tmp_path / "raw", {"A": 10, "B": 4})
    division.divide_dataset(raw, tmp_path / "out", move=True, progress=False)
    assert not list(raw.rglob("*.bmp")) and len(list(raw.rglob("*.dat"))) == 14
    assert len(output_images(tmp_path / "out")) == 14 == len(split_rows(tmp_path / "out"))
    _, moved, _ = division.divide_dataset(raw, tmp_path / "out", move=True, progress=False)
    assert moved == 0  # a rerun after a move is a no-op too


def test_rerun_is_a_no_op_that_says_so(raw_data, tmp_path):
    args = ["--path-dir", str(raw_data / "herlev"), "--output-dir", str(tmp_path / "out")]
    first = run_script("implementation_DatasetDivision.py", *args)
    before = tree_digest(tmp_path / "out")
    second = run_script("implementation_DatasetDivision.py", *args)
    assert first.returncode == second.returncode == 0
    assert "Copied 70 files" in first.stdout and "Nothing to do" in second.stdout
    assert tree_digest(tmp_path / "out") == before


def test_a_different_division_is_refused_unless_forced(raw_data, tmp_path):
    args = ["--path-dir", raw_data / "herlev", "--output-dir", tmp_path / "out"]
    run_script("implementation_DatasetDivision.py", *args)
    before = tree_digest(tmp_path / "out")
    refused = run_script("implementation_DatasetDivision.py", *args, "--random-state", 1)
    assert refused.returncode == 2 and "holds a different division" in refused.stderr
    assert "Traceback" not in refused.stderr and tree_digest(tmp_path / "out") == before
    forced = run_script("implementation_DatasetDivision.py", *args, "--random-state", 1, "--force")
    assert forced.returncode == 0 and len(output_images(tmp_path / "out")) == 70
    assert tree_digest(tmp_path / "out") != before


def test_an_interrupted_run_is_completed_by_the_next(raw_data, tmp_path, monkeypatch):
    real_transfer, calls = division.transfer, []

    def transfer_then_die(source, target, move):
        calls.append(target)
        if len(calls) == 30:  # dies half-way through writing the 30th file
            papfiles.partial_name(target).write_bytes(b"half")  # what atomic_output was writing
            raise KeyboardInterrupt
        real_transfer(source, target, move)

    monkeypatch.setattr(division, "transfer", transfer_then_die)
    with pytest.raises(KeyboardInterrupt):
        division.divide_dataset(raw_data / "sipakmed", tmp_path / "out", progress=False)
    assert len(output_images(tmp_path / "out")) == 29 + 1  # 29 images and one .partial
    monkeypatch.setattr(division, "transfer", real_transfer)
    _, copied, _ = division.divide_dataset(raw_data / "sipakmed", tmp_path / "out", progress=False)
    assert copied == 71
    assert not list((tmp_path / "out").rglob("*.partial"))
    division.divide_dataset(raw_data / "sipakmed", tmp_path / "ref", progress=False)
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "ref")


def error_of(capsys, **kwargs):
    "Divide in-process as the script does, its errors turned into messages; return (exit code, stderr)."
    with pytest.raises(SystemExit) as exit_info, papfiles.user_errors():
        division.divide_dataset(**kwargs)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a folder"),
    ("file", "is not a folder"),
    ("no_classes", "no class folders in"),
    ("empty_class", "no images found in"),
    ("output_inside", "is inside path_dir"),
    ("unreadable", "cannot read"),
    ("two_images", "class B has 2 image(s); at least 3 are needed"),
    ("bad_sum", "they must add up to 1"),
    ("out_of_range", "validation_size is 1.2; each fraction must lie strictly between 0 and 1"),
])
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys, case, message):
    raw = tmp_path / "raw"
    kwargs = dict(path_dir=raw, output_dir=tmp_path / "out")
    if case == "missing":
        kwargs["path_dir"] = tmp_path / "nowhere"
    elif case == "file":
        raw.write_text("")
    elif case == "no_classes":
        raw.mkdir()
    elif case == "empty_class":
        placeholder_tree(raw, {"A": 4})
        (raw / "im_B" / "im_B").mkdir(parents=True)
    elif case == "output_inside":
        placeholder_tree(raw, {"A": 4})
        kwargs["output_dir"] = raw / "formatted"
    elif case == "unreadable":
        placeholder_tree(raw, {"A": 4})
        (raw / "im_A" / "im_A" / "009.bmp").symlink_to(tmp_path / "gone.bmp")
    elif case == "two_images":
        placeholder_tree(raw, {"A": 4, "B": 2})
    elif case == "bad_sum":
        placeholder_tree(raw, {"A": 4})
        kwargs["training_size"] = 0.7
    elif case == "out_of_range":
        placeholder_tree(raw, {"A": 4})
        kwargs.update(training_size=0.1, validation_size=1.2, testing_size=-0.3)
    before = tree_digest(raw) if raw.is_dir() else None
    code, err = error_of(capsys, **kwargs)
    assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out" / "split.csv").exists()
    if before is not None:
        assert tree_digest(raw) == before


def test_bad_input_from_the_command_line(tmp_path):
    result = run_script("implementation_DatasetDivision.py", "--path-dir", tmp_path / "nowhere",
                        "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: path_dir {tmp_path / 'nowhere'} is not a folder — set it to the " \
                                    "unzipped SIPaKMeD or Herlev dataset"


def test_help_explains_every_option():
    result = run_script("implementation_DatasetDivision.py", "--help")
    for flag in ("--path-dir", "--output-dir", "--training-size", "--validation-size", "--testing-size",
                 "--random-state", "--cropped", "--move", "--force"):
        assert flag in result.stdout
    with pytest.raises(UserError):
        division.check_sizes(0.6, 0.3, 0.2)


def images_with_copies(root, copies, conflict=False):
    """A raw class-folder dataset of small distinct PNGs: 3 classes of 12, plus in HSIL `copies` byte-identical
    copies under other names (as a real set held 8825.png and 8832.png); with `conflict`, also one HSIL image
    copied into LSIL. Returns the pairs (original, copy) as relative paths."""
    pairs = []
    for k, name in enumerate(("HSIL", "LSIL", "NILM")):
        (root / name).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (8, 8), (k * 80, i * 20, 7)).save(root / name / f"{8800 + i}.png")
    for i in range(copies):
        shutil.copy(root / "HSIL" / f"{8800 + i}.png", root / "HSIL" / f"{8900 + i}.png")
        pairs.append((f"HSIL/{8800 + i}.png", f"HSIL/{8900 + i}.png"))
    if conflict:
        shutil.copy(root / "HSIL" / "8811.png", root / "LSIL" / "8999.png")
    return pairs


def test_identical_images_are_never_divided_apart_whatever_the_seed(tmp_path):
    pairs = images_with_copies(tmp_path / "raw", copies=3)
    # The expectation, found independently: which files of the raw folder hold the same bytes.
    digests = {p.relative_to(tmp_path / "raw").as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in (tmp_path / "raw").rglob("*.png")}
    assert all(digests[a] == digests[b] for a, b in pairs) and len(set(digests.values())) == len(digests) - 3
    for seed in range(25):
        _, _, duplicates = division.divide_dataset(tmp_path / "raw", tmp_path / f"out{seed}", random_state=seed,
                                                   progress=False)
        rows = {row["file"]: row for row in split_rows(tmp_path / f"out{seed}")}
        assert duplicates["groups"] == 3 and duplicates["images"] == 6
        for a, b in pairs:
            assert rows[a]["split"] == rows[b]["split"] and rows[a]["group"] == rows[b]["group"] != ""
        assert sum(row["group"] != "" for row in rows.values()) == 6
    result = run_script("implementation_DatasetDivision.py", "--path-dir", tmp_path / "raw", "--output-dir",
                        tmp_path / "cli")
    assert result.returncode == 0 and "identical images: 3 group(s) of byte-identical images (6 images), each " \
                                      "group kept in one split" in result.stdout


def test_the_same_image_in_two_classes_is_refused_or_skipped_or_kept_in_one_split(tmp_path):
    images_with_copies(tmp_path / "raw", copies=0, conflict=True)
    refused = run_script("implementation_DatasetDivision.py", "--path-dir", tmp_path / "raw", "--output-dir",
                         tmp_path / "refused")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "HSIL/8811.png (class HSIL) and LSIL/8999.png (class LSIL)" in refused.stderr
    assert "--conflicts skip" in refused.stderr and not (tmp_path / "refused" / "train").exists()
    skipped = run_script("implementation_DatasetDivision.py", "--path-dir", tmp_path / "raw", "--output-dir",
                         tmp_path / "skipped", "--conflicts", "skip")
    assert skipped.returncode == 0 and "left out (--conflicts skip)" in skipped.stdout
    files = {row["file"] for row in split_rows(tmp_path / "skipped")}
    assert "HSIL/8811.png" not in files and "LSIL/8999.png" not in files and len(files) == 35
    for seed in range(10):
        _, _, duplicates = division.divide_dataset(tmp_path / "raw", tmp_path / f"kept{seed}", random_state=seed,
                                                   conflicts="keep", progress=False)
        rows = {row["file"]: row["split"] for row in split_rows(tmp_path / f"kept{seed}")}
        assert rows["HSIL/8811.png"] == rows["LSIL/8999.png"] and len(rows) == 37
        assert len(duplicates["conflicts"]) == 1
        assert papfiles.read_split_csv(tmp_path / f"kept{seed}") is not None
    with pytest.raises(UserError, match="conflicts 'both' is unknown"):
        division.divide_dataset(tmp_path / "raw", tmp_path / "x", conflicts="both", progress=False)


def test_the_leak_message_names_the_fix_for_each_cause(tmp_path):
    images_with_copies(tmp_path / "raw", copies=1)
    division.divide_dataset(tmp_path / "raw", tmp_path / "out", progress=False)
    rows = {row["file"]: row for row in split_rows(tmp_path / "out")}
    # What an earlier version could leave: the two copies of the raw data in different splits, both in split.csv.
    first, second = rows["HSIL/8800.png"], rows["HSIL/8900.png"]
    moved_to = next(s for s in division.SPLITS if s != first["split"])
    (tmp_path / "out" / second["split"] / "HSIL" / "8900.png").rename(tmp_path / "out" / moved_to / "HSIL" / "8900.png")
    table = (tmp_path / "out" / "split.csv").read_text().replace(f"HSIL/8900.png,HSIL,{second['split']}",
                                                                f"HSIL/8900.png,HSIL,{moved_to}")
    (tmp_path / "out" / "split.csv").write_text(table)
    with pytest.raises(UserError, match="duplicates in the raw data.*--force into this folder.*remove one of each "
                                        "group from the raw data"):
        leaks.check_leaks(tmp_path / "out", progress=False)
    fixed = run_script("implementation_DatasetDivision.py", "--path-dir", tmp_path / "raw", "--output-dir",
                       tmp_path / "out", "--force")
    assert fixed.returncode == 0 and leaks.check_leaks(tmp_path / "out", progress=False).startswith("leak check: "
                                                                                                      "passed")
    # A copy put there by hand, under a name the division never wrote.
    test_image = next((tmp_path / "out" / "test" / "NILM").iterdir())
    shutil.copy(test_image, tmp_path / "out" / "train" / "NILM" / "mine.png")
    with pytest.raises(UserError, match=r"1 of them are not in split.csv, copies made by hand: remove them "
                                        r"\(train/NILM/mine.png\)"):
        leaks.check_leaks(tmp_path / "out", progress=False)
