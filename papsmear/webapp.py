"""The local web page for the person at the microscope: upload cell images, see each one's class, top-3
probabilities, abnormal flag and Grad-CAM, correct a prediction, and download the batch's CSV and report.

Built with FastHTML (Starlette underneath) with its default headers off, so the page loads nothing from the
network: its style and script (templates/webpage.css and .js) are inlined. Predictions go through
`papsmear.predict` and Grad-CAM through `papsmear.report`, the functions Inference_FastAI.py uses, with the
model loaded once and one prediction at a time. Uploads live in a temporary folder under names the server
makes; only corrections are written elsewhere, into the corrections folder.
"""
import base64
import csv
import io
import json
import re
import secrets
import tempfile
import threading
import uuid
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from fasthtml.common import (
    H1,
    H2,
    Beforeware,
    Body,
    Button,
    Div,
    FastHTML,
    Head,
    Html,
    Input,
    Label,
    Meta,
    P,
    Script,
    Span,
    Style,
    Title,
    to_xml,
)
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from papsmear.files import atomic_output, copy_atomically, user_path
from papsmear.onnx_model import OnnxClassifier
from papsmear.predict import load_classifier, predict_files
from papsmear.report import SIPAKMED_GROUPS, TEMPLATES, gradcam_maps, write_report

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "dcc_token"
FORMATS = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif", "GIF": "gif", "WEBP": "webp"}


@dataclass
class Limits:
    "What one upload may hold; anything beyond is refused with a message on the page."
    file_mb: float = 25.0        # one image file
    request_mb: float = 200.0    # one request (all its files)
    files: int = 100             # images in one request
    pixels: int = 40_000_000     # width x height of one image (SIPaKMeD's cluster images: 3.1 million)


def safe_name(name):
    """An uploaded file's name made harmless for the corrections folder: its last part only, characters other
    than letters, digits, space, dot, dash and underscore replaced, no leading dots."""
    base = re.split(r"[\\/]", str(name))[-1]
    cleaned = re.sub(r"[^\w .-]", "_", base).lstrip(". ")[:120]
    return cleaned or f"image-{uuid.uuid4().hex[:8]}"


def png_data_url(pixels):
    "A uint8 RGB array as a PNG data: URL, for an <img> on the page."
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def read_upload(data, limits):
    """(format extension, error) of an uploaded file's bytes: refused when too large, not an image Pillow
    opens, or over the pixel limit (Pillow's decompression-bomb guard made an error too)."""
    if len(data) > limits.file_mb * 1e6:
        return None, f"larger than {limits.file_mb:g} MB"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > limits.pixels:
                    return None, f"{image.width}x{image.height} pixels, more than {limits.pixels:,}"
                image.load()
                return FORMATS.get(image.format, "png"), None
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "not an image that Pillow can open"


class Classifier:
    """The model, loaded once, and its classes. Requests that arrive while a prediction runs wait in a queue;
    the next one to hold the lock predicts every waiting request's images in one batch (and their Grad-CAM in
    another), so concurrent uploads share the batched speed and each gets exactly its own answers."""
    MAX_BATCH = 64  # images predicted together at most

    def __init__(self, model_path, workdir):
        placeholder = Path(workdir) / "placeholder.png"
        Image.new("RGB", (64, 64), (200, 200, 200)).save(placeholder)
        self.model_path = user_path(model_path)
        self.learn, self.classes = load_classifier(self.model_path, [placeholder])
        self.lock, self.queue_lock, self.queue = threading.Lock(), threading.Lock(), []

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
        files = [f for job in jobs for f in job["files"]]
        with self.learn.no_bar() if hasattr(self.learn, "no_bar") else nullcontext():
            # Decoded in this process: forking decoder processes from a server's threads is not safe.
            probabilities = predict_files(self.learn, files, batch_size=len(files), decoders=0)
            asked = [i for i, job in enumerate(jobs) for _ in job["files"] if job["gradcam"]]
            wanted = [f for job in jobs if job["gradcam"] for f in job["files"]]
            start = [sum(len(j["files"]) for j in jobs[:k]) for k in range(len(jobs))]
            classes = [int(c) for k in sorted(set(asked)) for c in
                       probabilities[start[k]:start[k] + len(jobs[k]["files"])].argmax(1)]
            maps = gradcam_maps(self.learn, wanted, classes) if wanted else None
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
    "The uploads of the page's users: each under a random id, in a temporary folder of the server's own."
    def __init__(self, classifier, corrections_dir, workdir, limits):
        self.classifier, self.limits = classifier, limits
        self.corrections_dir, self.workdir = user_path(corrections_dir), Path(workdir)
        self.uploads, self.lock = {}, threading.Lock()

    def add(self, uploads, gradcam=True):
        """Predict uploaded files, given as (name, bytes), in one batch; per file the result the page shows, or
        an error saying why it was refused."""
        results, accepted = [], []
        for name, data in uploads:
            extension, error = read_upload(data, self.limits)
            if error:
                results.append(dict(name=name, error=error))
                continue
            upload_id = uuid.uuid4().hex
            file = self.workdir / f"{upload_id}.{extension}"
            file.write_bytes(data)
            results.append(dict(id=upload_id, name=name))
            accepted.append((results[-1], file))
        if accepted:
            probabilities, seen, overlays = self.classifier.predict([file for _, file in accepted], gradcam=gradcam)
            for (result, file), p, view, overlay in zip(accepted, probabilities, seen, overlays, strict=True):
                result.update(self.describe(p, view, overlay))
                with self.lock:
                    self.uploads[result["id"]] = dict(result, file=file)
        return results

    def describe(self, probabilities, seen, overlay):
        "What the page shows of one prediction: class, probabilities, top 3, abnormal flag and the pictures."
        classes = self.classifier.classes
        order = np.argsort(-probabilities)
        return dict(predicted=classes[order[0]],
                    probabilities={c: float(p) for c, p in zip(classes, probabilities, strict=True)},
                    top3=[[classes[i], float(probabilities[i])] for i in order[:3]],
                    abnormal=(SIPAKMED_GROUPS.get(classes[order[0]]) == "abnormal"
                              if set(classes) == set(SIPAKMED_GROUPS) else None),
                    seen=None if seen is None else png_data_url(seen),
                    gradcam=None if overlay is None else png_data_url(overlay))

    def batch(self, ids):
        "The uploads of `ids` that exist, in order (unknown ids are left out)."
        with self.lock:
            return [self.uploads[i] for i in ids if i in self.uploads]

    def correct(self, upload_id, corrected):
        """Save an upload as <corrections>/<class>/<its name> and add a row to corrections.csv (both atomically);
        returns the image's path."""
        upload = self.batch([upload_id])
        if not upload or corrected not in self.classifier.classes:
            raise ValueError("unknown image or class")
        upload = upload[0]
        with self.lock:
            target = self.free_name(self.corrections_dir / corrected, safe_name(upload["name"]), upload["file"].suffix)
            copy_atomically(upload["file"], target)
            self.append_correction(dict(file=target.relative_to(self.corrections_dir).as_posix(),
                                        predicted=upload["predicted"], corrected=corrected,
                                        **{f"p_{c}": upload["probabilities"][c] for c in self.classifier.classes},
                                        time=datetime.now(timezone.utc).isoformat(timespec="seconds")))
        return target

    @staticmethod
    def free_name(folder, name, suffix):
        "`folder/name` with the upload's format suffix, numbered when that name is taken."
        stem = Path(name).stem if Path(name).suffix.lower() == suffix.lower() else name
        target, n = folder / f"{stem}{suffix}", 1
        while target.exists():
            target, n = folder / f"{stem}-{n}{suffix}", n + 1
        return target

    def append_correction(self, row):
        "Rewrite corrections.csv with one more row, atomically."
        table = self.corrections_dir / "corrections.csv"
        rows = list(csv.DictReader(table.open(newline=""))) if table.exists() else []
        with atomic_output(table) as tmp, tmp.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(row))
            writer.writeheader()
            writer.writerows([*rows, row])

    def csv_text(self, ids):
        "The batch as CSV: file, predicted class, the probability of each class."
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["file", "predicted_class", *[f"p_{c}" for c in self.classifier.classes]])
        for upload in self.batch(ids):
            writer.writerow([upload["name"], upload["predicted"],
                             *[f"{upload['probabilities'][c]:.6f}" for c in self.classifier.classes]])
        return out.getvalue()

    def report(self, ids):
        "The batch's report.html, the page Inference_FastAI.py writes for unlabelled images."
        uploads = self.batch(ids)
        folder = Path(tempfile.mkdtemp(dir=self.workdir))
        files = [u["file"] for u in uploads]
        probabilities = np.array([[u["probabilities"][c] for c in self.classifier.classes] for u in uploads])
        summary = dict(model_path=str(self.classifier.model_path), test_dataset_path="images uploaded on the web page",
                       classes=self.classifier.classes, n_images=len(files), skipped=[], left_out=[],
                       leak_check="leak check: not run (uploaded images)")
        with self.classifier.lock:
            html, _ = write_report(self.classifier.learn, files, truth=None, probabilities=probabilities,
                                   classes=self.classifier.classes, summary=summary, output_dir=folder)
        return html.read_text(encoding="utf-8")


def needs_token(host, token):
    "The token requests must carry: the one given, a new one when bound beyond this computer, else None."
    if token:
        return token
    return None if host in LOCAL_HOSTS else secrets.token_urlsafe(24)


def create_app(model_path, corrections_dir, token=None, limits=None, workdir=None):
    """The FastHTML app (a Starlette app) serving the page for `model_path`. With a `token`, every request
    must carry it (?token=, the cookie the page sets, or an Authorization: Bearer header)."""
    limits = limits or Limits()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="deep-cervical-cancer-"))
    session = Session(Classifier(model_path, workdir), corrections_dir, workdir, limits)
    # A random secret: FastHTML would otherwise write one into a .sesskey file in the working directory.
    def check_token(req):
        if token and not secrets.compare_digest(presented_token(req), token):
            return JSONResponse(dict(error="this server needs its token: open the address it printed"),
                                status_code=403)

    # A random secret: FastHTML would otherwise write one into a .sesskey file in the working directory.
    app = FastHTML(default_hdrs=False, secret_key=secrets.token_hex(32), title="Deep Cervical Cancer",
                   before=Beforeware(check_token))
    app.state.session = session

    @app.get("/")
    def page(req):
        response = HTMLResponse(to_xml(page_html(session.classifier.classes, limits)))
        if token:  # the address with ?token= is opened once; the page's own requests then carry the cookie
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.post("/predict")
    async def upload(req):
        size = int(req.headers.get("content-length") or 0)
        if size > limits.request_mb * 1e6:
            return JSONResponse(dict(error=f"the upload is {size / 1e6:.0f} MB, more than {limits.request_mb:g} MB "
                                           "per request — send fewer images at a time"), status_code=413)
        try:
            form = await req.form(max_files=limits.files)
        except HTTPException:
            return JSONResponse(dict(error=f"more than {limits.files} files in one request — send fewer at a time"),
                                status_code=413)
        files = [f for f in form.getlist("files") if not isinstance(f, str)]
        if len(files) > limits.files:  # FastHTML may have read the form already, without Starlette's limit
            return JSONResponse(dict(error=f"{len(files)} files, more than {limits.files} files in one request — "
                                           "send fewer at a time"), status_code=413)
        uploads = [(f.filename or "image", await f.read()) for f in files]
        # Starlette runs this in a worker thread: other requests are served meanwhile, and the model's lock
        # lets one prediction run at a time.
        results = await run_in_threadpool(session.add, uploads, gradcam=form.get("gradcam", "true") != "false")
        return JSONResponse(dict(results=results))

    @app.post("/correct")
    async def correct(req):
        body = await req.json()
        try:
            target = session.correct(str(body.get("id")), str(body.get("corrected")))
        except ValueError as e:
            return JSONResponse(dict(error=str(e)), status_code=400)
        return JSONResponse(dict(saved=target.relative_to(session.corrections_dir).as_posix()))

    @app.post("/batch.csv")
    async def batch_csv(req):
        ids = (await req.json()).get("ids", [])
        return Response(session.csv_text(ids), media_type="text/csv",
                        headers={"Content-Disposition": "attachment; filename=predictions.csv"})

    @app.post("/report")
    async def batch_report(req):
        ids = (await req.json()).get("ids", [])
        return HTMLResponse(await run_in_threadpool(session.report, ids),
                            headers={"Content-Disposition": "attachment; filename=report.html"})

    return app


def presented_token(request):
    "The token a request carries, from the address, the page's cookie or an Authorization header."
    bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
    return request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or bearer or ""


def page_html(classes, limits):
    "The whole page: inline style and script, nothing loaded from elsewhere."
    return Html(
        Head(Meta(charset="utf-8"), Title("Deep Cervical Cancer — cell images"),
             Style((TEMPLATES / "webpage.css").read_text())),
        Body(
            H1("Deep Cervical Cancer"),
            P("Drop Pap-smear cell images here, or choose files or a whole folder. Each image gets its class, the "
              "three most likely classes, and the Grad-CAM map of where the network looked.", cls="muted"),
            Div(P("Drop images here"),
                Label("Choose images ", Input(type="file", id="pick-files", multiple=True, accept="image/*")),
                Label("Choose a folder ", Input(type="file", id="pick-folder", webkitdirectory=True, multiple=True)),
                id="drop", cls="drop"),
            P(f"Limits: {limits.file_mb:g} MB per image, {limits.request_mb:g} MB and {limits.files} images per "
              f"request, {limits.pixels:,} pixels per image.", cls="muted"),
            Div(H2("This batch"), Div(id="counts"),
                Label(Input(type="checkbox", id="abnormal-first"), " abnormal first (otherwise: least confident "
                      "first)"),
                Button("Download CSV", id="download-csv"), Button("Download report", id="download-report"),
                Span(id="status"), cls="batch"),
            Div(id="errors"), Div(id="results"),
            Script(f"const CLASSES = {json.dumps(classes)};\n" + (TEMPLATES / "webpage.js").read_text())))
