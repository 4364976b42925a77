"""File rules and user errors: samples, user paths, option checks, messages and exit codes, atomic outputs.

Nothing here imports torch or fastai, so the division and augmentation scripts start in about a second.
"""
import argparse
import csv
import errno
import filecmp
import hashlib
import math
import os
import re
import secrets
import shutil
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff")
PARTIAL = ".partial"  # suffix of files being written; see atomic_output
# This run's mark in the temporary names it writes; a folder's RUN_RECORD names the runs that wrote there, so
# that a later run removes only temporary files of recorded runs, never a user's file that looks like one.
RUN_TOKEN = secrets.token_hex(8)
RUN_RECORD = ".deep-cervical-cancer-runs"
AUGMENTED = re.compile(r"_aug\d{2}$")  # Extended DA's outputs: <source stem>_augNN.<ext>
SPLITS = ("train", "val", "test")  # the split folders of a formatted dataset
# SIPaKMeD's cropped cells are named NNN_KK.bmp: cell KK cut from cluster image NNN.bmp of the same class.
CELL_NAME = re.compile(r"^(?P<cluster>\d+)_\d+$")
INTERNAL_ERROR = 3  # exit code of an error that is a fault of the scripts, not of the user's input


# What decoding a broken image file raises: PIL's OSError kinds, and its refusal of a decompression bomb
# (an image of more than twice Image.MAX_IMAGE_PIXELS pixels), which is not an OSError.
IMAGE_ERRORS = (OSError, Image.DecompressionBombError)


class UserError(Exception):
    "A problem with the user's input or files: shown as one line, never a traceback."
    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


def describe_os_error(error):
    "One line for an operating-system error on a user's path: what failed, where, and what to do."
    where = error.filename or str(error).splitlines()[0]
    advice = {errno.EACCES: "check its permissions or choose another folder",
              errno.EPERM: "check its permissions or choose another folder",
              errno.EROFS: "it is on a read-only file system: choose another folder",
              errno.ENOSPC: "the disk is full: free some space or choose another folder",
              errno.ENOTDIR: "a file stands where a folder is needed: choose another path",
              errno.EEXIST: "a file stands where a folder is needed: choose another path",
              errno.EISDIR: "a folder stands where a file is needed: choose another path"}
    return f"cannot use {where} ({error.strerror or type(error).__name__}) — " \
           f"{advice.get(error.errno, 'check that the path exists and is the right kind of file or folder')}"


def tell(line):
    "Print a line on stderr from the one process that speaks: the only one, or RANK 0 under a launcher."
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


@contextmanager
def user_errors():
    """Print a `UserError`, or an operating-system error on a user's path (an output folder that is
    read-only, missing, or a file), as one line on stderr and exit with its code (2 = bad input). Any other
    error is a fault of the scripts: its traceback, a line asking to report it, and exit code 3. Under a
    launcher every process exits with the code, and only the first (RANK 0) prints the line."""
    try:
        yield
    except UserError as e:
        tell(f"error: {e}")
        raise SystemExit(e.code) from None
    except OSError as e:
        tell(f"error: {describe_os_error(e)}")
        raise SystemExit(2) from None
    except Exception as e:  # noqa: BLE001  every other error is ours, and is reported as such
        traceback.print_exc()
        print(f"internal error: {type(e).__name__}: {e} — this is a fault of the scripts, not of your input; "
              "please report it with the traceback above", file=sys.stderr)
        raise SystemExit(INTERNAL_ERROR) from None


def one_line_usage_errors():
    """Make argparse's usage errors (an unknown option, a value of the wrong type) one line `error: …` on stderr
    with exit code 2, as every other bad input, instead of the multi-line usage text. Each script calls this
    before its `call_parse`."""
    def error(parser, message):
        print(f"error: {message} — run {parser.prog} --help to list the options", file=sys.stderr)
        raise SystemExit(2)
    argparse.ArgumentParser.error = error


class LineWriter:
    "A stream for progress bars where no terminal redraws them: each update becomes one line of its own."
    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        "Write one update as a line (tqdm begins each update with a carriage return)."
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        "Flush the stream underneath."
        self.stream.flush()


def progress_bar(iterable=None, **options):
    """tqdm's progress bar (same options) on a terminal; when stderr is a file or a CI log, one line at every
    tenth of the work instead of thousands of carriage-return updates on one line."""
    if sys.stderr.isatty() or options.get("disable"):
        return tqdm(iterable, **options)
    total = options.pop("total", None) or (len(iterable) if hasattr(iterable, "__len__") else None)
    return tqdm(iterable, total=total, file=LineWriter(sys.stderr), mininterval=0,
                miniters=max(1, math.ceil((total or 10) / 10)), **options)


def user_path(path):
    """A user's path made absolute against the working directory, `~` expanded and `..` folded, links kept
    (so messages show the path as the user named it). Every script reads its path options through this."""
    return Path(os.path.abspath(Path(path).expanduser()))


def is_inside(path, folder):
    "True when `path` is `folder` or lies under it, comparing the real locations (links and `..` resolved)."
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_positive(**values):
    "Refuse any option (name=value; None means unset) that is not greater than 0."
    for name, value in values.items():
        if value is not None and not value > 0:
            raise UserError(f"{name} is {value}; it must be greater than 0 — set --{name.replace('_', '-').lower()}")


def check_not_negative(**values):
    "Refuse any option (name=value; None means unset) below 0."
    for name, value in values.items():
        if value is not None and not value >= 0:
            raise UserError(f"{name} is {value}; it must be 0 or more — set --{name.replace('_', '-').lower()}")


def check_file_name(name, what="save_loc"):
    "Refuse a name for files under models/ that is empty, holds a folder separator, or is `.`/`..`."
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise UserError(f"{what} {name!r} must be a plain name without folders (it names files under models/) "
                        f"— e.g. --{what.replace('_', '-')} resnet50")
    return name


NAME_BYTES = 200  # longest file or folder name written, in UTF-8 bytes (file systems allow 255)


def check_class_names(classes, where):
    """Refuse class names (read from a model file) that cannot be folder names as they are: not text, empty,
    longer than `NAME_BYTES` in UTF-8, `.`/`..`, hidden (a leading dot), or holding a folder separator or a
    control character. Class names become folders (corrections, divisions), so one such as `../../x` would
    write outside them."""
    for name in classes:
        bad = (not isinstance(name, str) or not name.strip() or name in (".", "..") or name.startswith(".")
               or len(name.encode("utf-8", "replace")) > NAME_BYTES
               or any(c in name for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in name))
        if bad:
            raise UserError(f"{where} names a class {str(name)[:80]!r} that is not a plain folder name (no folders, "
                            f"no leading dot, no control characters, at most {NAME_BYTES} bytes) — use a model "
                            "trained by these scripts")
    if len(set(classes)) != len(classes):
        raise UserError(f"{where} names a class twice — use a model trained by these scripts")
    return list(classes)


def shorten_to_bytes(name, limit=NAME_BYTES):
    "`name` cut at a character boundary so that its UTF-8 form has at most `limit` bytes."
    return name.encode("utf-8")[:limit].decode("utf-8", "ignore")


def spreadsheet_safe(text):
    """Text for a CSV cell that a spreadsheet shows as text, never runs as a formula: a leading =, +, -, @, tab
    or carriage return gets a quote before it (OWASP's advice on CSV injection)."""
    text = str(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def source_stem(path):
    "The stem of the image an Extended DA output `<stem>_augNN.<ext>` was made from; any other file's own stem."
    return AUGMENTED.sub("", Path(path).stem)


def is_augmentation(path):
    "True for an Extended DA output (`<stem>_augNN.<ext>`)."
    return source_stem(path) != Path(path).stem


def cell_cluster(path):
    "The cluster image (NNN, as written) a SIPaKMeD cell `NNN_KK` or its augmentation comes from; else None."
    match = CELL_NAME.match(source_stem(path))
    return match["cluster"] if match else None


def is_sample_image(path):
    "True for an image file that is a sample: not a Herlev segmentation mask (`*-d.bmp`), not hidden."
    name = path.name.lower()
    return (path.suffix.lower() in IMAGE_EXTENSIONS and not path.stem.lower().endswith("-d")
            and not name.startswith("."))


def sample_images(folder, within=None, outside=None):
    """Sample images under `folder`, sorted, following linked folders (each real folder visited once). With
    `within`, a linked folder whose real location lies outside that folder is not walked; its path is appended
    to the list `outside`."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back to a folder already walked
            dirs[:] = []
            continue
        if within is not None and not is_inside(real, within):
            outside.append(Path(root))
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in files if is_sample_image(Path(root) / f)]
    return sorted(found)


def read_split_csv(output_dir):
    "The division recorded in output_dir/split.csv, as sorted (file, class, split[, group]) rows; None without one."
    path = Path(output_dir) / "split.csv"
    if not path.exists():
        return None
    with path.open(newline="") as f:
        return sorted(tuple(row) for row in list(csv.reader(f))[1:])


def class_names(folder):
    "Sorted names of the class folders in `folder` that hold at least one sample image (fastai's vocab order)."
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.is_dir() and not p.name.startswith(".") and any(is_sample_image(f) for f in p.iterdir()))


def available_cpus():
    "CPU cores this process may use."
    return len(os.sched_getaffinity(0))


@contextmanager
def atomic_output(path):
    """Yield a temporary name beside `path` to write to; when the block ends without error it replaces
    `path` in one step, so `path` is either absent, the old file, or complete — never half-written."""
    tmp = partial_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_atomically(source, target):
    "Copy a file (the content behind a link) with its time stamps, through `atomic_output`."
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target) as tmp:
        shutil.copy2(source, tmp)


def partial_name(path):
    "The temporary name this run writes `path` under: `.<name>.<RUN_TOKEN>.partial`, beside it."
    path = Path(path)
    return path.with_name(f".{path.name}.{RUN_TOKEN}{PARTIAL}")


def recorded_runs(folder):
    "The tokens of the runs that `folder`'s run record names (none when it has no record)."
    try:
        return set((Path(folder) / RUN_RECORD).read_text().split())
    except (OSError, UnicodeDecodeError):
        return set()


def is_partial(path, runs):
    "True for a temporary file that one of the runs `runs` (tokens) wrote: `.<name>.<token>.partial`."
    name = Path(path).name
    return name.startswith(".") and any(name.endswith(f".{run}{PARTIAL}") for run in runs)


def remove_partials(folder):
    """Before a run writes under `folder`: delete the temporary files that runs recorded there left (a killed
    run's half-written files), and record this run instead. Only files named with a recorded run's token go,
    so a user's file whose name merely looks temporary stays."""
    folder = Path(folder)
    runs = recorded_runs(folder)
    if runs and folder.is_dir():
        for tmp in folder.rglob(f".*{PARTIAL}"):
            if is_partial(tmp, runs):
                tmp.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_RECORD).write_text(RUN_TOKEN)


def file_stamp(path):
    """[size, modification time, change time] of a file, which tell whether it changed since it was read. The
    change time (ctime) moves whenever the bytes are replaced, also by the tools that keep the modification
    time (cp -p, rsync -a, tar x), and no tool can set it back."""
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def same_file_content(a, b):
    "True when two files hold the same bytes (equal size and time stamps count as equal, as for a copy2)."
    return Path(a).is_file() and Path(b).is_file() and filecmp.cmp(a, b, shallow=True)


def file_sha256(path):
    "SHA-256 of a file's bytes, as hex (hashlib reads it in chunks and releases Python's lock meanwhile)."
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def same_bytes_groups(files, progress=False):
    """{file: SHA-256} of those `files` whose bytes another of them repeats. Only files of a size that occurs
    more than once can be identical, so only those are hashed, by every core."""
    sizes = {f: Path(f).stat().st_size for f in files}
    counts = {}
    for size in sizes.values():
        counts[size] = counts.get(size, 0) + 1
    candidates = [f for f in files if counts[sizes[f]] > 1]
    with ThreadPoolExecutor(available_cpus()) as pool:
        digests = dict(zip(candidates, progress_bar(pool.map(file_sha256, candidates), total=len(candidates),
                                                    desc="compare", unit="img",
                                                    disable=not progress or len(candidates) < 1000), strict=True))
    repeated = {}
    for digest in digests.values():
        repeated[digest] = repeated.get(digest, 0) + 1
    return {f: digest for f, digest in digests.items() if repeated[digest] > 1}


def joined(labels, together):
    """{item: label} of `labels` ({item: label}) where the items of each group in `together` (lists of items) end
    with one label, the smallest of those their groups join, however the groups chain (union-find)."""
    parent = {label: label for label in labels.values()}

    def root(label):
        while parent[label] != label:
            label = parent[label]
        return label
    for group in together:
        first = min(root(labels[item]) for item in group)
        for item in group:
            parent[root(labels[item])] = first
    return {item: root(label) for item, label in labels.items()}


def unreadable(file):
    "The reason `file` cannot be decoded as an image, or None when it can."
    try:
        with Image.open(file) as image:
            image.load()
    except Exception as e:  # PIL raises many kinds for a broken file
        return f"{type(e).__name__}: {e}"
    return None


def unreadable_images(files):
    "{file: reason} for each of `files` that cannot be decoded, decoding them in parallel threads."
    with ThreadPoolExecutor(available_cpus()) as pool:
        return {f: problem for f, problem in zip(files, pool.map(unreadable, files), strict=True) if problem}
