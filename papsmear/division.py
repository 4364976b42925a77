"""The division of a raw SIPaKMeD or Herlev download into train/val/test per class, losing nothing.

scikit-learn and pandas are imported by the functions that use them, once the options have been checked, so
that the division script answers --help and refuses bad options in well under a second.
"""
import csv
import os
import shutil
from pathlib import Path

from papsmear.files import (
    SPLITS,
    UserError,
    atomic_output,
    cell_cluster,
    copy_atomically,
    is_augmentation,
    is_inside,
    is_partial,
    is_sample_image,
    joined,
    progress_bar,
    read_split_csv,
    recorded_runs,
    remove_partials,
    same_bytes_groups,
    same_file_content,
    user_path,
)

HERLEV_SUBFOLDER = "New database pictures"


def class_folders(path_dir, cropped=False):
    """Map each class name to the folder that holds its samples.

    SIPaKMeD `im_<Class>` folders may hold the images directly or in one nested `im_<Class>/`; the class
    is named without the `im_` prefix. Herlev class folders may sit under `New database pictures/`.
    """
    path_dir = Path(path_dir)
    if not path_dir.is_dir():
        raise UserError(f"path_dir {path_dir} is not a folder — set it to the unzipped SIPaKMeD or Herlev dataset")
    if (path_dir / HERLEV_SUBFOLDER).is_dir():
        path_dir = path_dir / HERLEV_SUBFOLDER
    folders = {}
    for folder in sorted(p for p in path_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = folder.name.removeprefix("im_")
        if name in folders:
            raise UserError(f"{folders[name].relative_to(path_dir).parts[0]} and {folder.name} in {path_dir} are "
                            f"both class {name} — merge them into one folder so that no image is left out")
        if (folder / folder.name).is_dir():
            folder = folder / folder.name
        folders[name] = folder / "CROPPED" if cropped else folder
    if not folders:
        raise UserError(f"no class folders in {path_dir} — is path_dir the unzipped SIPaKMeD or Herlev folder?")
    return folders


def find_samples(folder):
    "The sample images directly in `folder`, sorted, and how many other files were ignored."
    if not folder.is_dir():
        return [], 0
    files = sorted(p for p in folder.iterdir() if p.is_file() or p.is_symlink())
    samples = [p for p in files if is_sample_image(p)]
    for p in samples:
        try:
            p.open("rb").close()
        except OSError as e:
            raise UserError(f"cannot read {p} ({e.strerror}) — fix or remove it, then run again") from None
    return samples, len(files) - len(samples)


def check_sizes(training_size, validation_size, testing_size):
    "Refuse split fractions that are out of (0, 1) or do not add up to 1."
    sizes = dict(training_size=training_size, validation_size=validation_size, testing_size=testing_size)
    for name, size in sizes.items():
        if not 0 < size < 1:
            raise UserError(f"{name} is {size}; each fraction must lie strictly between 0 and 1")
    if abs(sum(sizes.values()) - 1) > 1e-6:
        raise UserError(f"training_size + validation_size + testing_size = {sum(sizes.values()):g}; "
                        "they must add up to 1")


def split_class(files, training_size=0.6, validation_size=0.2, testing_size=0.2, random_state=42):
    """Split one class's files into (train, val, test), exactly as the original did.

    First `testing_size` of the files goes to test, then the rest is split so that validation is
    `validation_size` of the whole (0.25 of the rest for 60/20/20); both with `random_state`.
    """
    from sklearn.model_selection import train_test_split

    rest, test = train_test_split(sorted(files), test_size=testing_size, random_state=random_state)
    # Rounded so that float noise (0.2/0.8 = 0.25000000000000006) cannot push sklearn's ceil() up by one.
    val_fraction = round(validation_size / (training_size + validation_size), 10)
    train, val = train_test_split(rest, test_size=val_fraction, random_state=random_state)
    return train, val, test


def cluster_of(file):
    """The cluster image a cropped SIPaKMeD cell was cut from: NNN of NNN_KK.bmp, as a number written with
    SIPaKMeD's three digits, so that 001_01, 1_02 and 01_03 are cells of one cluster image."""
    cluster = cell_cluster(file)
    if cluster is None or is_augmentation(file):
        raise UserError(f"cannot tell which cluster image {file} was cut from (cells are named NNN_KK.bmp) — "
                        "rename it, or pass --no-group-cells to divide cell by cell")
    return f"{int(cluster):03d}"


CONFLICTS = ("refuse", "skip", "keep")  # what to do with the same image under two classes


def same_bytes_label(digest):
    "The group name split.csv records for byte-identical images."
    return f"same-bytes-{digest[:12]}"


def class_units(files, grouped, identical):
    """{file: unit} of one class's files: the units the original's rule splits. A unit is a file, or with
    `grouped` its cluster image; files with the same bytes (`identical`: file → SHA-256) share one unit, so that an
    image and its copies always land in one split."""
    by_digest = {}
    for file in files:
        if file in identical:
            by_digest.setdefault(identical[file], []).append(file)
    return joined({file: cluster_of(file) if grouped else file for file in files}, by_digest.values())


def unit_label(file, unit, grouped, identical):
    "What split.csv's group column says of a file: its cluster image, its same-bytes group, or nothing."
    if grouped:
        return unit
    return same_bytes_label(identical[file]) if file in identical else ""


def plan_division(samples, sizes, random_state, grouped=False, identical=None):
    """Rows (file, class, split) for every sample: `samples` maps class → list of relative file names, and the
    original's rule splits each class's files.

    With `grouped` the rule splits each class's cluster images instead of its cells, so that the cells of one
    cluster image all land in one split; files with the same bytes (`identical`: file → SHA-256) are kept in one
    split the same way. Rows then carry the group: (file, class, split, group)."""
    identical = identical or {}
    with_groups = grouped or any(file in identical for files in samples.values() for file in files)
    rows = []
    for name, files in samples.items():
        units = class_units(files, grouped, identical)
        names = sorted(set(units.values()))
        if len(names) < 3:
            what = ("cluster image(s)" if grouped else "image(s)" if len(names) == len(files)
                    else f"different image(s) ({len(files)} files, identical copies counted once)")
            raise UserError(f"class {name} has {len(names)} {what}; at least 3 are needed to split it 3 ways")
        for split, part in zip(SPLITS, split_class(names, *sizes, random_state=random_state), strict=True):
            part = set(part)
            rows += [(file, name, split, unit_label(file, units[file], grouped, identical)) if with_groups
                     else (file, name, split) for file in files if units[file] in part]
    return sorted(rows)


def identical_images(located):
    """{relative file: SHA-256} of the images of `located` (relative file → where it lies now) whose bytes another
    image repeats, hashed by every core among files of equal size only."""
    files = {path: file for file, path in located.items()}
    return {files[path]: digest for path, digest in same_bytes_groups(list(files), progress=True).items()}


def labelling_conflicts(found, identical):
    "[[(class, file), …], …]: groups of byte-identical images found under more than one class."
    groups = {}
    for name, files in found.items():
        for file in files:
            if file in identical:
                groups.setdefault(identical[file], []).append((name, file))
    return [sorted(members) for members in groups.values() if len({name for name, _ in members}) > 1]


def settle_conflicts(found, identical, conflicts):
    """Apply the `conflicts` choice to the same image under two classes: refuse (naming them), `skip` (leave
    every copy out; returned), or `keep` (each copy stays in its class; `pin_conflicts` puts them in one split).
    Returns (found without skipped images, the conflicting groups)."""
    if conflicts not in CONFLICTS:
        raise UserError(f"conflicts {conflicts!r} is unknown — use {', '.join(CONFLICTS)}")
    groups = labelling_conflicts(found, identical)
    if groups and conflicts == "refuse":
        example = " and ".join(f"{file} (class {name})" for name, file in groups[0][:2])
        raise UserError(f"{len(groups)} image(s) lie in two classes with the same bytes, e.g. {example}: a labelling "
                        "conflict — remove the wrong copy, or pass --conflicts skip (leave all copies out) or "
                        "--conflicts keep (keep each in its class, all in one split)")
    if conflicts == "skip":
        skipped = {file for group in groups for _, file in group}
        found = {name: [f for f in files if f not in skipped] for name, files in found.items()}
    return found, groups


def pin_conflicts(rows, groups):
    "Rows with every copy of a conflicting image moved to the split of its first copy, so no copy leaks."
    split_of = {row[0]: row[2] for row in rows}
    pinned = {file: split_of[group[0][1]] for group in groups for _, file in group if file in split_of}
    return sorted((row[0], row[1], pinned.get(row[0], row[2]), *row[3:]) for row in rows)


def write_split_csv(output_dir, rows):
    "Record the division atomically, so an interrupted run never leaves half a split.csv."
    header = ("file", "class", "split", "group")[:len(rows[0])]
    with atomic_output(Path(output_dir) / "split.csv") as tmp, tmp.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def check_apart(path_dir, output_dir):
    """Refuse an output_dir inside the raw dataset, or a raw dataset inside output_dir's split folders
    (where a division would mix with it), comparing real locations."""
    if is_inside(output_dir, path_dir):
        raise UserError(f"output_dir {output_dir} is inside path_dir {path_dir} — choose a folder outside the raw "
                        "dataset")
    for split in SPLITS:
        if is_inside(path_dir, output_dir / split):
            raise UserError(f"path_dir {path_dir} lies inside {output_dir / split}, where the division goes — "
                            "move the raw dataset out of output_dir, or choose another output_dir")


def destination(output_dir, row):
    "Where one row (file, class, split[, group]) of the division puts its file."
    file, name, split = row[:3]
    return Path(output_dir) / split / name / Path(file).name


def transfer(source, target, move):
    """Copy (or move) one file so that `target` is either absent or complete, never half-written.

    A linked image is moved by copying what it points to and removing only the link: moving the link
    itself would leave it pointing nowhere when its target is named relative to the link."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if move and not source.is_symlink():
        try:
            os.replace(source, target)
            return
        except OSError:
            pass  # another file system: copy, then remove the source once the copy is complete
    copy_atomically(source, target)
    if move:
        source.unlink()


def plan_removal(path_dir, output_dir, recorded, planned):
    """How to take a previous division away without losing a file: (copies to delete, moved files to put
    back into path_dir). A file counts as a copy when an image of path_dir with its class and name holds
    the same bytes. Refuses when a split folder holds a file that exists nowhere else."""
    recorded_at = {destination(output_dir, row): path_dir / row[0] for row in recorded or []}
    runs = recorded_runs(output_dir)
    by_name = {(name, Path(file).name): path_dir / file for file, name, *_ in [*planned, *(recorded or [])]}
    copies, moved, unique = [], [], []
    for split in SPLITS:
        for file in sorted(p for p in (output_dir / split).rglob("*") if not p.is_dir()):
            source, original = recorded_at.get(file), by_name.get((file.parent.name, file.name))
            if is_partial(file, runs):
                copies.append(file)
            elif source is not None and not source.exists() and not source.is_symlink():
                moved.append((file, source))
            elif original is not None and same_file_content(file, original):
                copies.append(file)
            else:
                unique.append(file)
    if unique:
        raise UserError(f"{output_dir} holds {len(unique)} file(s) that are not copies of path_dir's images, "
                        f"e.g. {unique[0]}; --force never deletes those — move them out or choose another output_dir")
    return copies, moved


def remove_division(path_dir, output_dir, recorded, planned):
    """Take a previous division away before dividing again (only with force), losing nothing: copies of
    path_dir's images are deleted, images an earlier --move took out of path_dir go back there."""
    copies, moved = plan_removal(path_dir, output_dir, recorded=recorded, planned=planned)
    for file, source in moved:
        transfer(file, source, move=True)
    for file in copies:
        file.unlink()
    for split in SPLITS:
        shutil.rmtree(output_dir / split, ignore_errors=True)  # only empty folders are left by now
    (output_dir / "split.csv").unlink(missing_ok=True)


def summary_table(samples, skipped, rows, grouped=False):
    """Per class: images found, train, val, test and other files skipped; for a division by cluster image
    (`grouped`) also the cluster images per split (train_groups, val_groups, test_groups)."""
    import pandas as pd

    rows = pd.DataFrame(rows, columns=["file", "class", "split", "group"][:len(rows[0])])
    counts = rows.groupby(["class", "split"]).size()
    table = pd.DataFrame({"found": {k: len(v) for k, v in samples.items()}, "skipped": skipped})
    for split in SPLITS:
        table[split] = [int(counts.get((name, split), 0)) for name in table.index]
    columns = ["found", *SPLITS, "skipped"]
    if grouped:
        groups = rows.groupby(["class", "split"])["group"].nunique()
        for split in SPLITS:
            table[f"{split}_groups"] = [int(groups.get((name, split), 0)) for name in table.index]
        columns += [f"{split}_groups" for split in SPLITS]
    table.loc["total"] = table.sum()
    return table[columns]


def duplicates_line(duplicates):
    "The summary's line on byte-identical images: the groups kept in one split, and the labelling conflicts."
    line = (f"identical images: {duplicates['groups']} group(s) of byte-identical images ({duplicates['images']} "
            "images), each group kept in one split (split.csv's group column names it)" if duplicates["groups"]
            else "identical images: none (every image's bytes differ from every other's)")
    conflicts = duplicates["conflicts"]
    if conflicts:
        names = "; ".join(" = ".join(f"{name}/{Path(file).name}" for name, file in group) for group in conflicts[:3])
        line += (f"; {len(conflicts)} image(s) in two classes ({names}) "
                 + ("left out (--conflicts skip)" if duplicates["skipped_conflicts"] else
                    "kept in each class, in one split (--conflicts keep)"))
    return line


MIN_EVALUATION_IMAGES = 5  # fewer validation or test images of a class than this make its scores mostly noise


def small_split_warnings(table):
    """One line per class of a division's summary table that has fewer than `MIN_EVALUATION_IMAGES` images in
    val or test, saying what each split gives it."""
    classes = table.drop(index="total")
    return [f"warning: class {name} gets {row['train']} train, {row['val']} val and {row['test']} test image(s); "
            f"fewer than {MIN_EVALUATION_IMAGES} in val or test make its scores there mostly noise — collect more "
            "images of it, or raise --validation-size / --testing-size"
            for name, row in classes.iterrows() if min(row["val"], row["test"]) < MIN_EVALUATION_IMAGES]


def divide_dataset(path_dir, output_dir, training_size=0.6, validation_size=0.2, testing_size=0.2,
                   random_state=42, cropped=False, move=False, force=False, progress=True, group_cells=True,
                   conflicts="refuse"):
    """Divide the raw dataset in `path_dir` into `output_dir`/{train,val,test}/<class>; with `cropped` and
    `group_cells`, by cluster image (all cells cut from one cluster image land in one split). Byte-identical
    images of a class always land in one split; the same image under two classes is refused, or with
    `conflicts` "skip" left out, or with "keep" kept in both classes in one split.

    Returns (summary table, number of files transferred now, duplicates: a dict with the same-bytes groups
    kept together and the conflicting groups). A rerun with the same inputs transfers nothing; an interrupted
    run is completed; a different division already there is refused unless `force`.
    """
    check_sizes(training_size, validation_size, testing_size)
    if conflicts not in CONFLICTS:
        raise UserError(f"conflicts {conflicts!r} is unknown — use {', '.join(CONFLICTS)}")
    path_dir, output_dir = user_path(path_dir), user_path(output_dir)
    folders = class_folders(path_dir, cropped)
    check_apart(path_dir, output_dir)
    found, skipped = {}, {}
    for name, folder in folders.items():
        files, skipped[name] = find_samples(folder)
        found[name] = [p.relative_to(path_dir).as_posix() for p in files]
    recorded = read_split_csv(output_dir)
    # Files an earlier --move took out of path_dir still belong to the dataset (force puts them back first).
    moved = {}
    for file, name, split, *_ in recorded or []:
        if not (path_dir / file).exists() and destination(output_dir, (file, name, split)).exists():
            found.setdefault(name, []).append(file)
            moved[file] = destination(output_dir, (file, name, split))
    for name, files in found.items():
        if not files:
            raise UserError(f"no images found in {folders[name]} — is path_dir the unzipped SIPaKMeD or Herlev folder?")
        found[name] = sorted(set(files))
    identical = identical_images({file: moved.get(file, path_dir / file) for files in found.values()
                                  for file in files})
    found, conflicting = settle_conflicts(found, identical, conflicts)
    rows = pin_conflicts(plan_division(found, (training_size, validation_size, testing_size), random_state,
                                       grouped=cropped and group_cells, identical=identical), conflicting)
    existing = [s for s in SPLITS if (output_dir / s).is_dir() and any((output_dir / s).iterdir())]
    if force and (recorded is not None or existing):
        remove_division(path_dir, output_dir, recorded=recorded, planned=rows)
    elif recorded is not None and recorded != rows:
        raise UserError(f"{output_dir} holds a different division (its split.csv differs) — "
                        "choose another output_dir, or pass --force to replace it")
    elif recorded is None and existing:
        raise UserError(f"{output_dir} already holds {'/'.join(existing)} folders not made by this script — "
                        "choose another output_dir, or pass --force to replace them")
    (output_dir / "models").mkdir(parents=True, exist_ok=True)
    remove_partials(output_dir)
    write_split_csv(output_dir, rows)
    todo = [row for row in rows if not destination(output_dir, row).exists()]
    for row in progress_bar(todo, desc="move" if move else "copy", unit="file", disable=not progress or not todo):
        transfer(path_dir / row[0], destination(output_dir, row), move)
    missing = [row[0] for row in rows if not destination(output_dir, row).exists()]
    if missing or len({row[0] for row in rows}) != sum(map(len, found.values())):
        raise UserError(f"{len(missing)} file(s) did not reach {output_dir}, e.g. {missing[:3]} — run again", code=1)
    kept = [f for files in found.values() for f in files if f in identical]
    duplicates = dict(groups=len({(identical[f]) for f in kept}), images=len(kept), conflicts=conflicting,
                      skipped_conflicts=conflicts == "skip")
    return summary_table(found, skipped, rows, grouped=cropped and group_cells), len(todo), duplicates
