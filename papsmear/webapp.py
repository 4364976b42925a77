"""The local web page for the person at the microscope: upload cell images, see each one's class, top-3
probabilities, abnormal flag and Grad-CAM, correct a prediction, and download the batch's CSV and report.

The page is built with FastHTML (Starlette underneath) with its default headers off, so it loads nothing from
the network: its style and script (templates/webpage.css and .js) are inlined, allowed by a per-page nonce in
its Content-Security-Policy. The JSON endpoints are plain Starlette routes, so that each reads its body itself,
after `Guard` has checked the request: the Host, the token and the page's own header, all before any byte of the
body is read, and then the body's size as it arrives. Predictions go through `papsmear.predict` and Grad-CAM
through `papsmear.report`, the functions Inference_FastAI.py uses, with the model loaded once and one prediction
at a time. Uploads live in a temporary folder under names the server makes, expire, and go with the server;
only corrections are written elsewhere, into the corrections folder.
"""
import base64
import csv
import io
import json
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from fasthtml.common import (
    H1,
    H2,
    Body,
    Button,
    Div,
    FastHTML,
    Head,
    Html,
    Input,
    Label,
    Meta,
    Option,
    P,
    Script,
    Select,
    Span,
    Style,
    Title,
    to_xml,
)
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from papsmear.fields import CELL_SIDE, SIPAKMED_NUCLEUS_DIAMETER, cut_cells, overlay_image
from papsmear.files import (
    NAME_BYTES,
    atomic_output,
    copy_atomically,
    shorten_to_bytes,
    spreadsheet_safe,
    user_path,
)
from papsmear.nuclei import find_nuclei
from papsmear.onnx_model import OnnxClassifier
from papsmear.predict import load_classifier, predict_files
from papsmear.report import TEMPLATES, gradcam_maps, write_report
from papsmear.screening import abnormal_probability, called_abnormal, rule_text

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
TOKEN_COOKIE = "dcc_token"
# Sent by the page with every POST. A page of another origin cannot add it without a CORS preflight, which this
# server never grants, so it keeps out cross-site requests (a plain form post, a text/plain fetch) too.
PAGE_HEADER = "x-deep-cervical-cancer"
# Image formats the division reads (`papsmear.files.IMAGE_EXTENSIONS`), with their extensions (the first is the
# one written); other formats become PNG.
READABLE_FORMATS = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "BMP": (".bmp",), "TIFF": (".tif", ".tiff")}
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer",
                    "cache-control": "no-store"}
API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


@dataclass
class Limits:
    "What one upload may hold and how long uploads are kept; anything beyond is refused with a message."
    file_mb: float = 25.0        # one image file
    request_mb: float = 200.0    # one request (all its files), counted on the bytes received
    files: int = 100             # images in one request
    pixels: int = 40_000_000     # width x height of one image (SIPaKMeD's cluster images: 3.1 million)
    keep_uploads: int = 2000     # uploads kept for corrections and reports; older ones are forgotten
    keep_minutes: float = 240.0  # an upload older than this is forgotten


class RequestTooLarge(Exception):
    "The body of a request grew past the request limit while it was being received."


def refuse(status, message):
    "A JSON answer that says what went wrong and what to do, with an HTTP error status."
    return JSONResponse(dict(error=message), status_code=status)


def allowed_hosts(host):
    """The names a request's Host header may carry for a server bound to `host`: that address, and on this
    computer its other local names; None (any) for a wildcard address, which only a token guards. A page of
    another site that points its own name at this computer (DNS rebinding) is refused by this."""
    if host in WILDCARD_HOSTS:
        return None
    return {host.lower()} | (set(LOCAL_HOSTS) if host in LOCAL_HOSTS else set())


def host_name(value):
    "The name part of a Host header (`[::1]:8000` → `::1`, `localhost:8000` → `localhost`)."
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def presented_token(request):
    "The token a request carries, from the address, the page's cookie or an Authorization header."
    bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
    return request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or bearer or ""


def same_token(presented, token):
    "Whether two tokens are equal, compared as UTF-8 bytes in constant time (any text, ASCII or not)."
    return secrets.compare_digest(presented.encode("utf-8", "replace"), token.encode("utf-8", "replace"))


class Guard:
    """ASGI middleware in front of the whole app. Before any byte of a request's body is read it refuses a Host
    that is not the server's (400), a missing or wrong token (403), and a POST without the page's header or from
    another origin (403); then it counts the body's bytes as they arrive, whatever the Content-Length says or
    when there is none (chunked), and answers 413 once they pass the request limit. Every answer gets the
    security headers."""
    def __init__(self, app, token=None, hosts=None, request_bytes=200e6):
        self.app, self.token, self.hosts, self.request_bytes = app, token, hosts, request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def secured_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = Headers(raw=message["headers"])
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k not in headers]
                if "content-security-policy" not in headers:
                    extra.append((b"content-security-policy", API_POLICY.encode()))
                message = dict(message, headers=[*message["headers"], *extra])
            await send(message)
        refusal = self.refusal(Request(scope))
        if refusal is not None:
            return await refusal(scope, receive, secured_send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.request_bytes:
                raise RequestTooLarge
            return message
        try:
            await self.app(scope, counted_receive, secured_send)
        except RequestTooLarge:
            if not started:
                await self.too_large()(scope, receive, secured_send)

    def too_large(self):
        "The answer to a request over the request limit."
        return refuse(413, f"the upload is larger than {self.request_bytes / 1e6:g} MB per request — send fewer "
                           "images at a time")

    def refusal(self, request):
        "The answer refusing a request from its headers alone, or None when it may go on."
        if self.hosts is not None and host_name(request.headers.get("host", "")) not in self.hosts:
            return refuse(400, "this server answers only requests addressed to it by its own name — open the "
                               "address it printed")
        if self.token and not same_token(presented_token(request), self.token):
            return refuse(403, "this server needs its token: open the address it printed")
        if request.method not in ("GET", "HEAD", "POST"):
            return refuse(405, "only GET and POST are served")
        if request.method == "POST":
            origin = request.headers.get("origin")
            if request.headers.get(PAGE_HEADER) != "page" or (
                    origin is not None and origin.lower() != f"http://{request.headers.get('host', '').lower()}"):
                return refuse(403, "requests must come from this server's own page")
        size = request.headers.get("content-length", "0")
        if not size.isdigit() or int(size) > self.request_bytes:
            return self.too_large()
        return None


def safe_name(name):
    """An uploaded file's name made harmless for the corrections folder: its last part only, characters other
    than letters, digits, space, dot, dash and underscore replaced, no leading dots, short enough in UTF-8 bytes
    for any file system once numbered."""
    base = re.split(r"[\\/]", str(name))[-1]
    cleaned = shorten_to_bytes(re.sub(r"[^\w .-]", "_", base).lstrip(". "), NAME_BYTES - 40).strip()
    return cleaned or f"image-{uuid.uuid4().hex[:8]}"


def png_data_url(pixels):
    "A uint8 RGB array as a PNG data: URL, for an <img> on the page."
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def read_upload(path, limits):
    """(Pillow's format name, error) of an uploaded file: refused when it is not an image Pillow opens, or over
    the pixel limit (Pillow's decompression-bomb guard made an error too)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > limits.pixels:
                    return None, f"{image.width}x{image.height} pixels, more than {limits.pixels:,}"
                image.load()
                return image.format or "PNG", None
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "not an image that Pillow can open"


def correction_name(name, image_format):
    """(file name, note) for a corrected image: the upload's own name and extension when its format is one the
    division reads (cell.jpeg stays cell.jpeg), that format's extension when the name has another; an image in
    any other format (GIF, WEBP, …) becomes a PNG, and the note says so."""
    stem, suffix = safe_name(Path(safe_name(name)).stem), Path(safe_name(name)).suffix
    extensions = READABLE_FORMATS.get(image_format)
    if extensions is None:
        return f"{stem}.png", f"converted from {image_format} to PNG, which the division reads"
    return f"{stem}{suffix if suffix.lower() in extensions else extensions[0]}", None


class Classifier:
    """The model, loaded once, with its record (classes, abnormal classes, operating point). Requests that
    arrive while a prediction runs wait in a queue; the next one to hold the lock predicts every waiting
    request's images in one batch (and their Grad-CAM in another), so concurrent uploads share the batched
    speed and each gets exactly its own answers."""
    MAX_BATCH = 64  # images predicted together at most

    def __init__(self, model_path):
        self.model_path = user_path(model_path)
        self.learn, self.record = load_classifier(self.model_path, [])
        self.classes = self.record.classes
        self.lock, self.queue_lock, self.queue = threading.Lock(), threading.Lock(), []
        self.batches = []  # how many requests each prediction served (the newest last), for a look at the load

    def predict(self, files, gradcam=True):
        """(probabilities [n, classes], the images as the network saw them, their Grad-CAM overlays) of image
        files; the last two are Nones without Grad-CAM (turned off, or an ONNX model)."""
        job = dict(files=list(files), gradcam=gradcam and not isinstance(self.learn, OnnxClassifier),
                   done=threading.Event())
        with self.queue_lock:
            self.queue.append(job)
        while not job["done"].is_set():
            with self.lock:
                with self.queue_lock:
                    batch, size = [], 0
                    while self.queue and (not batch or size + len(self.queue[0]["files"]) <= self.MAX_BATCH):
                        batch.append(self.queue.pop(0))
                        size += len(batch[-1]["files"])
                if not batch:  # another request's prediction served this one while it waited for the lock
                    continue
                try:
                    self.run(batch)
                except Exception as error:  # every waiting request hears of it, not only the one that ran it
                    for waiting in batch:
                        waiting.setdefault("error", error)
                        waiting["done"].set()
        if "error" in job:
            raise job["error"]
        return job["result"]

    def run(self, jobs):
        "Predict the files of `jobs` in one batch, their Grad-CAM in another, and hand each job its part."
        self.batches = [*self.batches[-99:], len(jobs)]
        files = [f for job in jobs for f in job["files"]]
        with self.learn.no_bar() if hasattr(self.learn, "no_bar") else nullcontext():
            # Decoded in this process: forking decoder processes from a server's threads is not safe.
            probabilities = predict_files(self.learn, files, batch_size=len(files), decoders=0)
            start = [sum(len(j["files"]) for j in jobs[:k]) for k in range(len(jobs))]
            wanted = [(f, int(c)) for k, job in enumerate(jobs) if job["gradcam"]
                      for f, c in zip(job["files"], probabilities[start[k]:start[k] + len(job["files"])].argmax(1),
                                      strict=True)]
            maps = gradcam_maps(self.learn, *map(list, zip(*wanted, strict=True))) if wanted else None
        pictures = iter([] if maps is None else zip(*maps, strict=True))
        for k, job in enumerate(jobs):
            mine = probabilities[start[k]:start[k] + len(job["files"])]
            if job["gradcam"] and maps is not None:
                drawn = [next(pictures) for _ in job["files"]]
                seen = [(image * 255).astype(np.uint8) for _, image in drawn]
                overlays = [show_cam_on_image(image, heat, use_rgb=True) for heat, image in drawn]
            else:
                seen = overlays = [None] * len(job["files"])
            job["result"] = (mine, seen, overlays)
            job["done"].set()


class Session:
    """The uploads of the page's users: each under a random id, in a temporary folder of the server's own, kept
    for `Limits.keep_minutes` and at most `Limits.keep_uploads` of them (the oldest go first); the folder goes
    with the server (`close`)."""
    def __init__(self, classifier, corrections_dir, workdir, limits, nucleus_diameter=SIPAKMED_NUCLEUS_DIAMETER):
        self.classifier, self.limits, self.nucleus_diameter = classifier, limits, nucleus_diameter
        self.corrections_dir, self.workdir = user_path(corrections_dir), Path(workdir)
        self.uploads, self.lock = OrderedDict(), threading.RLock()

    def add(self, uploads, gradcam=True, as_field="auto"):
        """Predict uploaded files, given as (name, path of the received bytes), in one batch; per file the result
        the page shows, or an error saying why it was refused. Refused files are deleted at once. An image larger
        than a cell (`is_field`; `as_field` "yes" or "no" decides instead) is a field: its cells are cut out and
        predicted as uploads of their own, and a result for the field itself carries its overlay."""
        results, accepted, fields = [], [], []
        for name, received in uploads:
            image_format, error = read_upload(received, self.limits)
            if error:
                Path(received).unlink(missing_ok=True)
                results.append(dict(name=name, error=error))
            elif self.is_field(received, as_field):
                fields.append(self.cut_field(name, received, results, accepted))
            else:
                results.append(dict(id=received.stem, name=name))
                accepted.append((results[-1], received, image_format))
        if accepted:
            probabilities, seen, overlays = self.classifier.predict([file for _, file, _ in accepted],
                                                                    gradcam=gradcam)
            for (result, file, image_format), p, view, overlay in zip(accepted, probabilities, seen, overlays,
                                                                      strict=True):
                result.update(self.describe(p, view, overlay))
                with self.lock:
                    self.uploads[result["id"]] = dict(result, file=file, format=image_format, added=time.monotonic())
        for field in fields:
            self.draw_field(field)
        self.expire()
        return results

    def is_field(self, path, as_field):
        "Whether an upload is a field: asked for, or (auto) an image at least three cells across its shorter side."
        if as_field in ("yes", "no"):
            return as_field == "yes"
        with Image.open(path) as image:
            return min(image.size) >= 3 * CELL_SIDE * self.nucleus_diameter

    def cut_field(self, name, path, results, accepted):
        """Find the nuclei of an uploaded field and cut its cells (the rule of Inference_Fields.py), each saved as
        an upload of its own (PNG) and queued for prediction; the field's own result goes first. Returns what its
        overlay needs."""
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        nuclei = find_nuclei(image, self.nucleus_diameter)
        field = dict(kind="field", name=name, cells=len(nuclei.table))
        results.append(field)
        boxes, crops = cut_cells(image, zip(nuclei.table["x"], nuclei.table["y"], strict=True), self.nucleus_diameter)
        cells = []
        for k, (nucleus, picture) in enumerate(zip(nuclei.table.itertuples(), crops, strict=True), start=1):
            crop = self.workdir / uuid.uuid4().hex
            picture.save(crop, format="PNG")
            cells.append(dict(id=crop.stem, name=f"{Path(safe_name(name)).stem}_cell{k:03d}.png", field=name, cell=k,
                              x=round(float(nucleus.x), 1), y=round(float(nucleus.y), 1)))
            results.append(cells[-1])
            accepted.append((cells[-1], crop, "PNG"))
        Path(path).unlink(missing_ok=True)  # the field itself is not kept: its cells are
        return dict(result=field, image=image, nuclei=nuclei, cells=cells, boxes=boxes)

    def draw_field(self, field):
        "The overlay of a predicted field (nuclei outlined in their cell's class, abnormal ones ringed), on its result."
        table = field["nuclei"].table.assign(
            cell=[c["cell"] for c in field["cells"]], predicted_class=[c["predicted"] for c in field["cells"]],
            abnormal=[bool(c["abnormal"]) for c in field["cells"]], left=[b[0] for b in field["boxes"]],
            right=[b[2] for b in field["boxes"]])
        picture = overlay_image(field["image"], field["nuclei"], table, self.classifier.classes)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        field["result"]["overlay"] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()

    def expire(self):
        "Forget (and delete) the uploads older than the limit, and the oldest beyond the count limit."
        with self.lock:
            deadline = time.monotonic() - 60 * self.limits.keep_minutes
            while self.uploads and (len(self.uploads) > self.limits.keep_uploads
                                    or next(iter(self.uploads.values()))["added"] < deadline):
                _, upload = self.uploads.popitem(last=False)
                Path(upload["file"]).unlink(missing_ok=True)

    def describe(self, probabilities, seen, overlay):
        """What the page shows of one prediction: class, probabilities, top 3, the abnormal flag (by the model's
        operating point when it has one, else by its most probable class) and the pictures."""
        record, classes = self.classifier.record, self.classifier.classes
        order = np.argsort(-probabilities)
        screened = record.abnormal_classes is not None
        return dict(predicted=classes[order[0]],
                    probabilities={c: float(p) for c, p in zip(classes, probabilities, strict=True)},
                    top3=[[classes[i], float(probabilities[i])] for i in order[:3]],
                    p_abnormal=float(abnormal_probability(probabilities[None], classes, record.abnormal_classes)[0])
                    if screened else None,
                    abnormal=bool(called_abnormal(probabilities[None], classes, record.abnormal_classes,
                                                  record.operating_point)[0]) if screened else None,
                    seen=None if seen is None else png_data_url(seen),
                    gradcam=None if overlay is None else png_data_url(overlay))

    def batch(self, ids):
        "The uploads of `ids` that are still kept, in order (unknown ids are left out)."
        with self.lock:
            return [self.uploads[i] for i in ids if i in self.uploads]

    def correct(self, upload_id, corrected):
        """Save an upload as <corrections>/<class>/<its name> and record it in corrections.csv, so that a failure
        leaves neither; a second correction of the same upload moves the image and replaces its row. Returns
        (the image's path relative to the corrections folder, a note or None)."""
        with self.lock:
            upload = self.uploads.get(upload_id)
            if upload is None:
                raise KeyError("unknown image: it may have expired — upload it again")
            if corrected not in self.classifier.classes:
                raise ValueError(f"unknown class {corrected!r} — choose one of the model's classes")
            previous = upload.get("saved")
            if previous is not None and previous.parent.name == corrected:
                return previous.as_posix(), upload.get("note")
            name, note = correction_name(upload["name"], upload["format"])
            target = self.free_name(self.corrections_dir / corrected, name)
            self.save_image(upload, target, converted=note is not None)
            try:
                self.record_correction(upload, target, corrected, previous)
            except BaseException:
                target.unlink(missing_ok=True)
                raise
            if previous is not None:
                (self.corrections_dir / previous).unlink(missing_ok=True)
            upload["saved"], upload["note"] = target.relative_to(self.corrections_dir), note
            return upload["saved"].as_posix(), note

    @staticmethod
    def save_image(upload, target, converted):
        "Write an upload to `target` atomically: its own bytes, or converted to PNG."
        target.parent.mkdir(parents=True, exist_ok=True)
        if not converted:
            copy_atomically(upload["file"], target)
            return
        with atomic_output(target) as tmp, Image.open(upload["file"]) as image:
            image.convert("RGBA" if "A" in image.getbands() else "RGB").save(tmp, format="PNG")

    @staticmethod
    def free_name(folder, name):
        "`folder/name`, numbered when that name is taken."
        stem, suffix = Path(name).stem, Path(name).suffix
        target, n = folder / name, 1
        while target.exists():
            target, n = folder / f"{stem}-{n}{suffix}", n + 1
        return target

    def record_correction(self, upload, target, corrected, previous):
        "Rewrite corrections.csv atomically with this correction's row (replacing the previous one's)."
        table = self.corrections_dir / "corrections.csv"
        rows = list(csv.DictReader(table.open(newline="", encoding="utf-8"))) if table.exists() else []
        if previous is not None:
            rows = [row for row in rows if row.get("file") != previous.as_posix()]
        classes = self.classifier.classes
        row = dict(file=target.relative_to(self.corrections_dir).as_posix(),
                   uploaded_as=spreadsheet_safe(upload["name"]), predicted=upload["predicted"], corrected=corrected,
                   **{f"p_{c}": upload["probabilities"][c] for c in classes},
                   time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with atomic_output(table) as tmp, tmp.open("w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=list(row), extrasaction="ignore")
            writer.writeheader()
            writer.writerows([*rows, row])

    def csv_text(self, ids):
        """The batch as CSV: file, predicted class, the probability of each class and, when the model has abnormal
        classes, p(abnormal), the flag and its rule; names that a spreadsheet would run as formulas are quoted."""
        record, classes = self.classifier.record, self.classifier.classes
        screened = record.abnormal_classes is not None
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["file", "predicted_class", *[f"p_{c}" for c in classes],
                         *(["p_abnormal", "abnormal", "abnormal_rule"] if screened else [])])
        for upload in self.batch(ids):
            writer.writerow([spreadsheet_safe(upload["name"]), upload["predicted"],
                             *[f"{upload['probabilities'][c]:.6f}" for c in classes],
                             *([f"{upload['p_abnormal']:.6f}", upload["abnormal"], rule_text(record.operating_point)]
                               if screened else [])])
        return out.getvalue()

    def report(self, ids):
        """The batch's report.html, the page Inference_FastAI.py writes for unlabelled images, naming each image
        as it was uploaded; written in a folder of its own that is removed once it has been read."""
        uploads = self.batch(ids)
        record, classes = self.classifier.record, self.classifier.classes
        files = [u["file"] for u in uploads]
        probabilities = np.array([[u["probabilities"][c] for c in classes] for u in uploads])
        summary = dict(model_path=str(self.classifier.model_path), test_dataset_path="images uploaded on the web page",
                       classes=classes, n_images=len(files), skipped=[], left_out=[],
                       abnormal_classes=record.abnormal_classes, abnormal_rule=rule_text(record.operating_point),
                       leak_check="leak check: not run (uploaded images)",
                       model_check="model check: not run (no labels: nothing is scored)",
                       flagged=[u["abnormal"] for u in uploads] if record.abnormal_classes else None)
        with tempfile.TemporaryDirectory(dir=self.workdir) as folder, self.classifier.lock:
            html, _ = write_report(self.classifier.learn, files, truth=None, probabilities=probabilities,
                                   classes=classes, summary=summary, output_dir=folder,
                                   names=[u["name"] for u in uploads])
            return html.read_text(encoding="utf-8")

    def close(self):
        "Delete the server's temporary folder: every upload and report with it."
        shutil.rmtree(self.workdir, ignore_errors=True)


def needs_token(host, token):
    "The token requests must carry: the one given, a new one when bound beyond this computer, else None."
    if token:
        return token
    return None if host in LOCAL_HOSTS else secrets.token_urlsafe(24)


async def json_body(request, *keys):
    """The JSON object a request carries, with `keys` present; an HTTP 400 with a message when the body is not
    JSON (by its Content-Type too: a cross-site text/plain body never passes) or lacks them."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send the body as application/json")
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        body = None
    if not isinstance(body, dict) or any(key not in body for key in keys):
        raise HTTPException(400, f"the body must be a JSON object with {', '.join(keys)}")
    return body


def id_list(body):
    "The list of upload ids of a JSON body; an HTTP 400 when it is not a list of texts."
    ids = body["ids"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise HTTPException(400, "ids must be a list of upload ids")
    return ids


def receive_uploads(session, form, limits):
    """(name, path) of each uploaded file of a parsed form, copied from Starlette's spooled files into the
    server's folder in chunks; a file over the per-file limit is refused by its size before any copy, with
    its message in `refused`."""
    kept, refused = [], []
    for upload in form.getlist("files"):
        if isinstance(upload, str):
            continue
        name = upload.filename or "image"
        if upload.size is not None and upload.size > limits.file_mb * 1e6:
            refused.append(dict(name=name, error=f"larger than {limits.file_mb:g} MB"))
            continue
        target = session.workdir / uuid.uuid4().hex
        upload.file.seek(0)
        with target.open("wb") as out:
            shutil.copyfileobj(upload.file, out, 1 << 20)
        kept.append((name, target))
    return kept, refused


def create_app(model_path, corrections_dir, token=None, limits=None, workdir=None, host="127.0.0.1",
               nucleus_diameter=SIPAKMED_NUCLEUS_DIAMETER):
    """The FastHTML app (a Starlette app) serving the page for `model_path`, wrapped in `Guard`. With a `token`,
    every request must carry it (?token=, the cookie the page sets, or an Authorization: Bearer header); the
    Host header must name `host` (see `allowed_hosts`). The session (uploads, corrections) is `app.state.session`;
    its `close()` removes the server's temporary folder."""
    limits = limits or Limits()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="deep-cervical-cancer-"))
    workdir.mkdir(parents=True, exist_ok=True)
    session = Session(Classifier(model_path), corrections_dir, workdir, limits, nucleus_diameter=nucleus_diameter)
    # A random secret: FastHTML would otherwise write one into a .sesskey file in the working directory.
    app = FastHTML(default_hdrs=False, secret_key=secrets.token_hex(32), title="Deep Cervical Cancer")
    app.state.session = session

    @app.get("/")
    def page(req):
        nonce = secrets.token_urlsafe(16)
        policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self' data: "
                  "blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
        response = HTMLResponse(to_xml(page_html(session.classifier, limits, nonce)),
                                headers={"content-security-policy": policy})
        if token:  # the address with ?token= is opened once; the page's own requests then carry the cookie
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    async def upload(req):
        try:
            form = await req.form(max_files=limits.files, max_fields=10)
        except HTTPException:
            return refuse(413, f"more than {limits.files} files in one request — send fewer at a time")
        kept, refused = await run_in_threadpool(receive_uploads, session, form, limits)
        await form.close()
        # Starlette runs this in a worker thread: other requests are served meanwhile, and the model's lock
        # lets one prediction run at a time.
        results = await run_in_threadpool(session.add, kept, gradcam=form.get("gradcam", "true") != "false",
                                          as_field=form.get("field", "auto"))
        return JSONResponse(dict(results=refused + results))

    async def correct(req):
        body = await json_body(req, "id", "corrected")
        try:
            saved, note = await run_in_threadpool(session.correct, str(body["id"]), str(body["corrected"]))
        except KeyError as e:
            return refuse(404, e.args[0])
        except ValueError as e:
            return refuse(400, str(e))
        except OSError as e:
            return refuse(500, f"the correction could not be saved ({e.strerror or e}) — check the corrections "
                               "folder, then try again")
        return JSONResponse(dict(saved=saved, note=note))

    async def batch_csv(req):
        ids = id_list(await json_body(req, "ids"))
        return Response(session.csv_text(ids), media_type="text/csv",
                        headers={"Content-Disposition": "attachment; filename=predictions.csv"})

    async def batch_report(req):
        ids = id_list(await json_body(req, "ids"))
        if not session.batch(ids):
            return refuse(400, "none of these images is known (they may have expired) — upload them again")
        return HTMLResponse(await run_in_threadpool(session.report, ids),
                            headers={"Content-Disposition": "attachment; filename=report.html"})

    for path, endpoint in (("/predict", upload), ("/correct", correct), ("/batch.csv", batch_csv),
                           ("/report", batch_report)):
        app.router.add_route(path, endpoint, methods=["POST"])

    async def http_error(req, exc):
        return refuse(exc.status_code, exc.detail)
    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(Guard, token=token, hosts=allowed_hosts(host), request_bytes=limits.request_mb * 1e6)
    return app


def page_html(classifier, limits, nonce):
    "The whole page: inline style and script (allowed by `nonce`), nothing loaded from elsewhere."
    record = classifier.record
    rule = (f"Abnormal ({', '.join(record.abnormal_classes)}) is flagged when {rule_text(record.operating_point)}."
            if record.abnormal_classes else "This model has no abnormal classes, so nothing is flagged.")
    return Html(
        Head(Meta(charset="utf-8"), Title("Deep Cervical Cancer — cell images"),
             Style((TEMPLATES / "webpage.css").read_text(), nonce=nonce)),
        Body(
            H1("Deep Cervical Cancer"),
            P("Drop Pap-smear cell images here, or choose files or a whole folder. Each image gets its class, the "
              "three most likely classes, and the Grad-CAM map of where the network looked.", cls="muted"),
            Div(P("Drop images here"),
                Label("Choose images ", Input(type="file", id="pick-files", multiple=True, accept="image/*")),
                Label("Choose a folder ", Input(type="file", id="pick-folder", webkitdirectory=True, multiple=True)),
                id="drop", cls="drop"),
            P(f"Limits: {limits.file_mb:g} MB per image, {limits.request_mb:g} MB and {limits.files} images per "
              f"request, {limits.pixels:,} pixels per image. Uploads are kept {limits.keep_minutes:g} minutes.",
              cls="muted"),
            P(rule, id="rule", cls="muted"),
            Label("Images larger than a cell are ", Select(Option("screened as fields (auto)", value="auto"),
                                                          Option("always fields", value="yes"),
                                                          Option("never fields: one cell each", value="no"),
                                                          id="as-field")),
            Div(H2("This batch"), Div(id="counts"),
                Label(Input(type="checkbox", id="abnormal-first"), " abnormal first (otherwise: least confident "
                      "first)"),
                Button("Download CSV", id="download-csv"), Button("Download report", id="download-report"),
                Span(id="status"), cls="batch"),
            Div(id="errors"), Div(id="fields"), Div(id="results"),
            Script(f"const CLASSES = {script_json(classifier.classes)};\n"
                   f"const PAGE_HEADER = {script_json(PAGE_HEADER)};\n" + (TEMPLATES / "webpage.js").read_text(),
                   nonce=nonce)))


def script_json(value):
    "A value as JSON that is safe inside a <script> element (no `<` that could end it)."
    return json.dumps(value).replace("<", "\\u003c")


def checked_corrections_dir(corrections_dir):
    """The corrections folder, made if needed and tried with a temporary file, so that a folder that cannot take
    corrections (a file stands there, read-only) is refused when the server starts, not at the first correction."""
    folder = user_path(corrections_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
        pass
    return folder
