"""The leak check of a formatted dataset: no image of one split (train, val, test) may reach another.

So a validation or test score is never measured on images the model trained on.

Three kinds of leak are looked for:
- the same bytes in two splits (a copy left by an earlier division, folders merged by hand);
- an Extended DA output `<stem>_augNN` in one split whose source `<stem>` (same class) is in another;
- SIPaKMeD cells `NNN_KK` of one cluster image in two splits (a division cell by cell chose this: a warning).

File contents are hashed by all cores and remembered in path_folder/cache/sha256.json, keyed on each file's
size, modification time and change time, so a rerun hashes only new or changed files. Nothing here imports
torch; training (`papsmear.data.pap_dls`) and evaluation (`papsmear.predict`) run it.
"""
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from papsmear.files import (
    SPLITS,
    UserError,
    atomic_output,
    available_cpus,
    cell_cluster,
    file_sha256,
    file_stamp,
    is_augmentation,
    progress_bar,
    read_split_csv,
    sample_images,
    source_stem,
)

MEMO_VERSION = 1  # bump when the memo's layout changes: an older memo is then ignored


def read_memo(memo_path):
    "{relative path: [size, mtime, ctime, sha256]} remembered from an earlier check; empty when absent or unusable."
    try:
        memo = json.loads(Path(memo_path).read_text())
        files = memo["files"] if memo.get("version") == MEMO_VERSION else {}
        return {name: entry for name, entry in files.items() if isinstance(entry, list) and len(entry) == 4}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def content_digests(path_folder, files, progress=True, remember=True):
    """({file: sha256}, number hashed now) for `files` under `path_folder`; files unchanged since they were
    last hashed are not read again. The memo is rewritten when something was hashed, where it can be (a
    read-only dataset is checked all the same, only not remembered); with `remember` False it is neither read
    nor written (a folder that is not a dataset of ours)."""
    memo_path = Path(path_folder) / "cache" / "sha256.json"
    memo = read_memo(memo_path) if remember else {}
    names = {f: Path(f).relative_to(path_folder).as_posix() for f in files}
    stamps = {f: file_stamp(f) for f in files}
    todo = [f for f in files if memo.get(names[f], [])[:3] != stamps[f]]
    # hashlib releases Python's lock while it hashes, so threads use every core.
    with ThreadPoolExecutor(available_cpus()) as pool:
        bar = progress_bar(pool.map(file_sha256, todo), total=len(todo), desc="leak check", unit="img",
                           disable=not progress or len(todo) < 1000)
        hashed = dict(zip(todo, bar, strict=True))
    for f, digest in hashed.items():
        memo[names[f]] = [*stamps[f], digest]
    if hashed and remember:
        try:
            memo_path.parent.mkdir(exist_ok=True)
            with atomic_output(memo_path) as tmp:
                tmp.write_text(json.dumps({"version": MEMO_VERSION, "files": memo}))
        except OSError:
            pass
    return {f: memo[names[f]][3] for f in files}, len(hashed)


def training_digests(path_folder):
    """SHA-256 of every image of a formatted dataset's train split, an Extended DA output counting as its source
    (the image it was made from, beside it); only an output whose source is gone is hashed itself. What a model
    trained on this split has seen, for `papsmear.predict`'s check of test images against it."""
    path_folder = Path(path_folder)
    train = [f for f, (split, _) in split_files(path_folder).items() if split == "train"]
    sources = {(f.parent, f.stem) for f in train if not is_augmentation(f)}
    hashed = [f for f in train if not is_augmentation(f) or (f.parent, source_stem(f)) not in sources]
    return sorted(set(content_digests(path_folder, hashed, progress=False)[0].values()))


def split_files(path_folder):
    "{image file: (split, class)} of every sample image in the split folders of a formatted dataset."
    return {f: (split, f.relative_to(path_folder / split).parts[0])
            for split in SPLITS if (path_folder / split).is_dir() for f in sample_images(path_folder / split)
            if len(f.relative_to(path_folder / split).parts) > 1}


def identical_across_splits(path_folder, where, progress=True):
    """(groups of files with the same bytes lying in more than one split, files compared by hash, number hashed
    now). Only files whose size also occurs in another split can be identical, so only those are hashed."""
    splits_of_size = defaultdict(set)
    sizes = {f: f.stat().st_size for f in where}
    for f, size in sizes.items():
        splits_of_size[size].add(where[f][0])
    candidates = [f for f in where if len(splits_of_size[sizes[f]]) > 1]
    digests, hashed = content_digests(path_folder, candidates, progress)
    same = defaultdict(list)
    for f, digest in digests.items():
        same[digest].append(f)
    leaks = [sorted(group) for group in same.values() if len({where[f][0] for f in group}) > 1]
    return leaks, len(candidates), hashed


def augmentations_across_splits(where):
    "(Extended DA output, its source) pairs whose source (same class, any extension) lies in another split."
    sources = {(label, f.stem): f for f, (_, label) in where.items() if not is_augmentation(f)}
    pairs = [(f, sources.get((label, source_stem(f)))) for f, (_, label) in where.items() if is_augmentation(f)]
    return [(f, source) for f, source in pairs if source is not None and where[source][0] != where[f][0]]


def cells_across_splits(where):
    "{(class, cluster number): splits} of SIPaKMeD cluster images whose cells `NNN_KK` lie in several splits."
    splits = defaultdict(set)
    for f, (split, label) in where.items():
        cluster = cell_cluster(f)
        if cluster is not None:
            splits[(label, int(cluster))].add(split)  # as numbers: 001_01 and 1_02 come from one cluster image
    return {key: sorted(found) for key, found in splits.items() if len(found) > 1}


def find_leaks(path_folder, progress=True):
    """Every kind of leak between the splits of the formatted dataset `path_folder`: a dict with the number
    of images, how many were compared by hash and how many of those hashed now, and the `identical`,
    `augmented` and `cells` findings."""
    path_folder = Path(path_folder)
    where = split_files(path_folder)
    identical, compared, hashed = identical_across_splits(path_folder, where, progress)
    return dict(images=len(where), compared=compared, hashed=hashed, identical=identical,
                augmented=augmentations_across_splits(where), cells=cells_across_splits(where))


def identical_fix(path_folder, groups, name):
    """What removes identical images from two splits, by their cause: copies the division itself placed are
    duplicates in the raw data (this version's division keeps them in one split); a copy split.csv does not
    list was put there by hand."""
    rows = read_split_csv(path_folder)
    if rows is None:
        return ("remove the copies from the other splits, or divide the raw dataset again with this version, "
                "which keeps identical images in one split")
    placed = {f"{split}/{label}/{Path(file).name}" for file, label, split, *_ in rows}
    by_hand = [f for group in groups for f in group if name(f) not in placed]
    if by_hand:
        return (f"{len(by_hand)} of them are not in split.csv, copies made by hand: remove them "
                f"({', '.join(map(name, by_hand[:5]))})")
    pairs = ", ".join(" = ".join(map(name, group)) for group in groups[:5])
    return ("they are duplicates in the raw data, which every division may split: divide it again with this "
            "version (implementation_DatasetDivision.py --force into this folder; it keeps identical images in "
            f"one split), or remove one of each group from the raw data ({pairs})")


def check_leaks(path_folder, progress=True):
    """Refuse a formatted dataset with the same image, or an image and its Extended DA output, in two splits
    (one line: the count, three examples and what to do); return the line for the log, which warns about
    SIPaKMeD cells of one cluster image in two splits."""
    path_folder = Path(path_folder)
    leaks = find_leaks(path_folder, progress)

    def name(f):
        return f.relative_to(path_folder).as_posix()
    if leaks["identical"]:
        examples = "; ".join(" = ".join(map(name, group)) for group in leaks["identical"][:3])
        raise UserError(f"leak check: {len(leaks['identical'])} image(s) of {path_folder} lie in two splits with the "
                        f"same bytes (e.g. {examples}), so scores would be measured on training images — "
                        f"{identical_fix(path_folder, leaks['identical'], name)}")
    if leaks["augmented"]:
        examples = "; ".join(f"{name(f)} from {name(source)}" for f, source in leaks["augmented"][:3])
        raise UserError(f"leak check: {len(leaks['augmented'])} Extended DA image(s) of {path_folder} come from an "
                        f"image of another split (e.g. {examples}) — rebuild the Extended DA copy from the current "
                        "division with implementation_DataAugmentation_Extension.py --force")
    line = (f"leak check: passed ({leaks['images']} images in {'/'.join(SPLITS)}, {leaks['compared']} of them "
            f"compared by SHA-256, {leaks['hashed']} hashed now)")
    if leaks["cells"]:
        (label, cluster), splits = next(iter(leaks["cells"].items()))
        line += (f"; warning: {len(leaks['cells'])} cluster image(s) have cells in several splits (e.g. {label} "
                 f"{cluster:03d} in {' and '.join(splits)}): divided cell by cell, test scores are optimistic")
    return line
