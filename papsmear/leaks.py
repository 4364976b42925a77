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
import hashlib
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from papsmear.files import (
    SPLITS,
    UserError,
    atomic_output,
    available_cpus,
    cell_cluster,
    file_stamp,
    is_augmentation,
    sample_images,
    source_stem,
)

MEMO_VERSION = 1  # bump when the memo's layout changes: an older memo is then ignored


def file_sha256(path):
    "SHA-256 of a file's bytes, as hex."
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_memo(memo_path):
    "{relative path: [size, mtime, ctime, sha256]} remembered from an earlier check; empty when absent or unusable."
    try:
        memo = json.loads(Path(memo_path).read_text())
        files = memo["files"] if memo.get("version") == MEMO_VERSION else {}
        return {name: entry for name, entry in files.items() if isinstance(entry, list) and len(entry) == 4}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def content_digests(path_folder, files, progress=True):
    """({file: sha256}, number hashed now) for `files` under `path_folder`; files unchanged since they were
    last hashed are not read again. The memo is rewritten when something was hashed, where it can be (a
    read-only dataset is checked all the same, only not remembered)."""
    memo_path = Path(path_folder) / "cache" / "sha256.json"
    memo = read_memo(memo_path)
    names = {f: Path(f).relative_to(path_folder).as_posix() for f in files}
    stamps = {f: file_stamp(f) for f in files}
    todo = [f for f in files if memo.get(names[f], [])[:3] != stamps[f]]
    # hashlib releases Python's lock while it hashes, so threads use every core.
    with ThreadPoolExecutor(available_cpus()) as pool:
        hashed = dict(zip(todo, tqdm(pool.map(file_sha256, todo), total=len(todo), desc="leak check", unit="img",
                                     disable=not progress or len(todo) < 1000), strict=True))
    for f, digest in hashed.items():
        memo[names[f]] = [*stamps[f], digest]
    if hashed:
        try:
            memo_path.parent.mkdir(exist_ok=True)
            with atomic_output(memo_path) as tmp:
                tmp.write_text(json.dumps({"version": MEMO_VERSION, "files": memo}))
        except OSError:
            pass
    return {f: memo[names[f]][3] for f in files}, len(hashed)


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
                        f"same bytes (e.g. {examples}), so scores would be measured on training images — divide "
                        "the raw dataset again into an empty output_dir, or remove the copies from the other splits")
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
