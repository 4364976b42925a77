"""The web page: predictions equal an independent forward pass and Grad-CAM pytorch-grad-cam's own, requests are
batched, corrections that the division script accepts, every hostile request an attacker on this machine or a
page of another site could send, and the page in a real browser (Debian's Chromium driven by Playwright)."""
import base64
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from starlette.testclient import TestClient

from conftest import ROOT, last_line, run_script, train
from papsmear import webapp
from papsmear.files import sample_images
from papsmear.onnx_model import square_image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ADDRESS = "http://127.0.0.1:8000"
PAGE = {webapp.PAGE_HEADER: "page"}  # the header the page sends with every POST
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # ImageNet's, as torchvision gives them


def client_of(app):
    "A test client that addresses the app as the page does: by its own name, with the page's header."
    return TestClient(app, base_url=ADDRESS, headers=PAGE)


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    "The web app of the demo model (.pth), with a corrections folder of its own."
    corrections = tmp_path_factory.mktemp("corrections")
    app = webapp.create_app(trained[0] / "models" / "tiny.pth", corrections)
    return client_of(app), corrections


def upload(client, paths, **extra):
    "POST images (path or (name, bytes)) to /predict; the response."
    files = [("files", (p[0], p[1], "application/octet-stream") if isinstance(p, tuple)
              else (p.name, p.read_bytes(), "image/bmp")) for p in paths]
    return client.post("/predict", files=files, data=extra)


def decoded(data_url):
    "The pixels of a PNG data: URL."
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def test_the_page_agrees_with_a_forward_pass_and_grad_cam_computed_here(served, trained, formatted):
    client, _ = served
    page = client.get("/").text
    assert "<script" in page and "src=" not in page and "http" not in page  # no outside address, nothing fetched
    images = sample_images(formatted / "sipakmed" / "test")[::4]
    results = upload(client, images).json()["results"]
    learn = client.app.state.session.classifier.learn
    model = learn.model.eval()
    for image, result in zip(images, results, strict=True):
        # The network's input made here: the cutting rule, ImageNet normalisation, channels first.
        pixels = np.asarray(square_image(Image.open(image).convert("RGB"), 48)) / 255
        tensor = torch.tensor(((pixels - MEAN) / STD).transpose(2, 0, 1)[None], dtype=torch.float32)
        with torch.no_grad():
            expected = torch.softmax(model(tensor), dim=1)[0].numpy()
        classes = client.app.state.session.classifier.classes
        assert result["probabilities"] == pytest.approx(dict(zip(classes, expected.tolist(), strict=True)), abs=1e-5)
        assert result["predicted"] == classes[int(expected.argmax())]
        with GradCAM(model=model, target_layers=[model[0][-1]]) as cam:
            heat = cam(input_tensor=tensor, targets=[ClassifierOutputTarget(int(expected.argmax()))])[0]
        overlay = show_cam_on_image(pixels.astype(np.float32), heat, use_rgb=True)
        assert np.abs(decoded(result["gradcam"]).astype(int) - overlay).max() <= 2
        assert np.abs(decoded(result["seen"]).astype(int) - np.round(pixels * 255)).max() <= 1


def test_concurrent_uploads_are_predicted_together_and_each_gets_its_own_answers(served, formatted):
    client, _ = served
    session, classifier = client.app.state.session, client.app.state.session.classifier
    images = sample_images(formatted / "sipakmed" / "test")[:12]
    named = [(f"{p.parent.name}/{p.name}", p) for p in images]  # names repeat across classes
    alone = {}
    for name, path in named:
        copy = session.workdir / f"alone-{len(alone)}"
        shutil.copy(path, copy)
        alone[name] = session.add([(name, copy)], gradcam=False)[0]["probabilities"]
    sizes, real_run = [], classifier.run

    def counted(jobs):
        sizes.append(len(jobs))
        return real_run(jobs)
    classifier.run = counted
    groups = [named[i::4] for i in range(4)]  # four requests of three images, sent while a prediction runs
    try:
        with ThreadPoolExecutor(4) as pool:
            with classifier.lock:  # a prediction is running: the four requests queue up behind it
                futures = [pool.submit(session.add, [(n, copied(session, p)) for n, p in group], gradcam=k == 0)
                           for k, group in enumerate(groups)]
                while len(classifier.queue) < 4:
                    time.sleep(0.01)
            answers = [f.result() for f in futures]
    finally:
        classifier.run = real_run
    assert sizes == [4]  # all four requests in one prediction, and never an empty one
    for k, (group, results) in enumerate(zip(groups, answers, strict=True)):
        assert [r["name"] for r in results] == [name for name, _ in group]
        for result in results:
            assert result["probabilities"] == pytest.approx(alone[result["name"]], abs=1e-5)
            assert (result["gradcam"] is not None) == (k == 0)


def copied(session, path):
    "A copy of `path` in the server's folder, as an upload is received."
    target = session.workdir / f"copy-{time.monotonic_ns()}"
    shutil.copy(path, target)
    return target


def test_limits_and_non_images_are_refused_with_a_message_and_nothing_is_kept(trained, formatted, tmp_path):
    image = sample_images(formatted / "sipakmed" / "test")[0]
    small = webapp.Limits(file_mb=image.stat().st_size / 2e6, request_mb=1, files=2, pixels=10_000)
    app = webapp.create_app(trained[0] / "models" / "tiny.pth", tmp_path / "c", limits=small, workdir=tmp_path / "w")
    client = client_of(app)
    answers = upload(client, [image, ("notes.png", b"not an image at all")]).json()["results"]
    assert {a["name"]: a["error"] for a in answers} == {image.name: f"larger than {small.file_mb:g} MB",
                                                        "notes.png": "not an image that Pillow can open"}
    big = io.BytesIO()
    Image.new("RGB", (200, 100)).save(big, format="PNG")
    assert upload(client, [("wide.png", big.getvalue())]).json()["results"][0]["error"] == (
        "200x100 pixels, more than 10,000")
    too_many = upload(client, [("a.png", b"1"), ("b.png", b"2"), ("c.png", b"3")])
    assert too_many.status_code == 413 and "more than 2 files" in too_many.json()["error"]
    too_big = upload(client, [("a.png", b"0" * 1_100_000)])
    assert too_big.status_code == 413 and "larger than 1 MB per request" in too_big.json()["error"]
    # A chunked body has no Content-Length: its bytes are counted as they arrive.
    chunked = client.post("/predict", content=(b"0" * 100_000 for _ in range(30)),
                          headers={"content-type": "multipart/form-data; boundary=x"})
    assert chunked.status_code == 413 and "larger than 1 MB per request" in chunked.json()["error"]
    assert not (tmp_path / "c").exists() and list((tmp_path / "w").iterdir()) == []


TOKEN = "Jeton-42.s3cret"


@pytest.fixture(scope="module")
def guarded(trained, tmp_path_factory):
    "The app with a token, bound to 127.0.0.1."
    return webapp.create_app(trained[0] / "models" / "tiny.pth", tmp_path_factory.mktemp("c"), token=TOKEN)


@pytest.mark.parametrize("request_kind, status", [
    ("no token", 403), ("wrong token", 403), ("token in other case", 403), ("non-ASCII token", 403),
    ("wrong cookie", 403), ("wrong bearer", 403), ("non-ASCII bearer", 403), ("foreign Host", 400),
    ("Host that rebinds a name", 400), ("no page header", 403), ("foreign Origin", 403),
    ("text/plain correction", 415), ("PUT", 405), ("right token", 200), ("right cookie", 200), ("right bearer", 200),
])
def test_hostile_requests_are_refused_before_the_body_is_read(guarded, formatted, request_kind, status):
    image = sample_images(formatted / "sipakmed" / "test")[0]
    client = TestClient(guarded, base_url=ADDRESS)
    headers, params, cookies, url = dict(PAGE), {}, {}, ADDRESS
    token = TOKEN
    if request_kind == "wrong token":
        params["token"] = "Jeton-43.s3cret"
    elif request_kind == "non-ASCII token":
        params["token"] = "Jeton-42.s3crét"
    elif request_kind == "non-ASCII bearer":
        headers["authorization"] = "Bearer Jeton-42.s3crét".encode("latin-1")
    elif request_kind == "token in other case":
        params["token"] = token.upper()
    elif request_kind in ("wrong cookie", "right cookie"):
        cookies[webapp.TOKEN_COOKIE] = token if request_kind == "right cookie" else "Jeton-x"
    elif request_kind in ("wrong bearer", "right bearer"):
        headers["authorization"] = f"Bearer {token if request_kind == 'right bearer' else 'nope'}"
    elif request_kind != "no token":
        params["token"] = token
    if request_kind == "foreign Host":
        url = "http://evil.example"
    elif request_kind == "Host that rebinds a name":
        url = "http://attacker.example:8000"  # a name the attacker's DNS points at 127.0.0.1
    elif request_kind == "no page header":
        headers.pop(webapp.PAGE_HEADER)
    elif request_kind == "foreign Origin":
        headers["origin"] = "http://evil.example"
    client.cookies.update(cookies)
    if request_kind == "text/plain correction":
        answer = client.post(f"{url}/correct", params=params, headers=headers | {"content-type": "text/plain"},
                             content=json.dumps(dict(id="x", corrected="Parabasal")))
    elif request_kind == "PUT":
        answer = client.put(f"{url}/predict", params=params, headers=headers, content=b"")
    else:
        answer = client.post(f"{url}/predict", params=params, headers=headers,
                             files=[("files", (image.name, image.read_bytes(), "image/bmp"))])
    assert answer.status_code == status, answer.text
    if status != 200:
        assert answer.json()["error"]
    assert answer.headers["x-frame-options"] == "DENY" and answer.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]


def test_the_page_sets_its_cookie_and_allows_only_its_own_inline_code(guarded):
    client = TestClient(guarded, base_url=ADDRESS)
    assert client.get("/").status_code == 403
    page = client.get("/", params={"token": TOKEN})
    assert page.status_code == 200 and client.cookies.get(webapp.TOKEN_COOKIE)
    policy = page.headers["content-security-policy"]
    nonce = policy.split("'nonce-", 1)[1].split("'", 1)[0]
    assert f'<script nonce="{nonce}">' in page.text and f'<style nonce="{nonce}">' in page.text
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert client.get("/").status_code == 200  # the cookie now carries the token
    assert client.get("/").headers["content-security-policy"] != policy  # a new nonce every time


def raw_request(port, head, body_chunks=(), timeout=10):
    "Send a raw HTTP request (head, then body chunks while the server lets us) and return the status line."
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(head.encode())
        try:
            for chunk in body_chunks:
                connection.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: it read no more than it had to
        return connection.makefile("rb").readline().decode()


def free_port():
    "A TCP port nobody listens on now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, tmp_path, *args, port=None, env=None):
    "app.py serving `model` on a free port; (process, port) once it answers."
    port = port or free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model-path", model, "--corrections-dir",
                               tmp_path / "corrections", "--port", str(port), *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert f"http://127.0.0.1:{port}/" in server.stdout.readline()
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return server, port


def test_a_real_server_refuses_before_reading_and_counts_chunked_bytes_and_cleans_up(trained, tmp_path):
    temp = tmp_path / "temp"
    temp.mkdir()
    server, port = start_server(trained[0] / "models" / "tiny.pth", tmp_path, "--token", TOKEN,
                                "--max-request-mb", 1, env=os.environ | {"TMPDIR": str(temp)})
    try:
        host = f"Host: 127.0.0.1:{port}\r\n{webapp.PAGE_HEADER}: page\r\n"
        # 20 MB announced, none sent: a wrong token is answered from the headers alone.
        start = time.monotonic()
        assert raw_request(port, f"POST /predict?token=wrong HTTP/1.1\r\n{host}Content-Length: 20000000\r\n"
                                 "Content-Type: multipart/form-data; boundary=x\r\n\r\n").startswith("HTTP/1.1 403")
        assert time.monotonic() - start < 5
        chunk = b"186a0\r\n" + b"0" * 100_000 + b"\r\n"  # 100 000 bytes a chunk, no Content-Length at all
        status = raw_request(port, f"POST /predict?token={TOKEN} HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n"
                                   "Content-Type: multipart/form-data; boundary=x\r\n\r\n", [chunk] * 40)
        assert status.startswith("HTTP/1.1 413"), status
        assert len(list(temp.iterdir())) == 1  # the server's own temporary folder
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    assert list(temp.iterdir()) == []  # removed with everything in it when the server stopped


def test_uploads_expire_and_reports_name_the_uploads_not_server_files(trained, formatted, tmp_path):
    limits = webapp.Limits(keep_uploads=2)
    app = webapp.create_app(trained[0] / "models" / "tiny.pth", tmp_path / "c", limits=limits, workdir=tmp_path / "w")
    client = client_of(app)
    images = sample_images(formatted / "sipakmed" / "test")[:3]
    named = [(f"=HYPERLINK(\"http://x\")-{i}-{p.name}", p.read_bytes()) for i, p in enumerate(images)]
    results = [upload(client, [item]).json()["results"][0] for item in named]
    ids = [r["id"] for r in results]
    kept = client.app.state.session.batch(ids)
    assert [u["id"] for u in kept] == ids[1:]  # the oldest went
    assert len(list((tmp_path / "w").iterdir())) == 2
    rows = list(csv.reader(io.StringIO(client.post("/batch.csv", json=dict(ids=ids)).text)))
    assert [row[0] for row in rows[1:]] == [f"'{r['name']}" for r in results[1:]]  # never a formula
    assert all(r["name"].startswith("=HYPERLINK(") for r in results)
    report = client.post("/report", json=dict(ids=ids))
    assert report.status_code == 200 and results[2]["name"].replace('"', "&#34;") in report.text
    assert str(tmp_path / "w") not in report.text
    assert sorted(p.name for p in (tmp_path / "w").iterdir() if p.is_dir()) == []  # the report's folder is gone
    for body, status in ((dict(ids=["unknown"]), 400), (dict(ids=[]), 400), (dict(ids="x"), 400), ([], 400),
                         (dict(), 400)):
        answer = client.post("/report", json=body)
        assert answer.status_code == status and answer.json()["error"], body
    for path in ("/report", "/batch.csv", "/correct"):
        broken = client.post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 400 and broken.json()["error"]


def test_corrections_keep_names_convert_what_the_division_skips_and_move_when_corrected_again(served, formatted):
    client, corrections = served
    image = sample_images(formatted / "sipakmed" / "test")[0]
    jpeg, gif, cjk = io.BytesIO(), io.BytesIO(), io.BytesIO()
    with Image.open(image) as cell:
        cell.convert("RGB").save(jpeg, format="JPEG")
        cell.convert("P").save(gif, format="GIF")
        cell.convert("RGB").save(cjk, format="PNG")
    long_name = "細胞" * 100 + ".png"  # 200 characters, 600 bytes in UTF-8
    results = upload(client, [("patient A/cell.jpeg", jpeg.getvalue()), ("cell.gif", gif.getvalue()),
                              (long_name, cjk.getvalue())]).json()["results"]
    assert results[0]["name"] == "patient A/cell.jpeg"  # a folder upload keeps its relative path
    saved = [client.post("/correct", json=dict(id=r["id"], corrected="Parabasal")).json() for r in results]
    assert saved[0] == dict(saved="Parabasal/cell.jpeg", note=None)
    assert saved[1]["saved"] == "Parabasal/cell.png" and "converted from GIF to PNG" in saved[1]["note"]
    assert Image.open(corrections / saved[1]["saved"]).format == "PNG"
    assert len(saved[2]["saved"].split("/")[1].encode()) <= 200 and (corrections / saved[2]["saved"]).is_file()
    moved = client.post("/correct", json=dict(id=results[0]["id"], corrected="Metaplastic")).json()
    assert moved["saved"] == "Metaplastic/cell.jpeg" and not (corrections / "Parabasal" / "cell.jpeg").exists()
    assert (corrections / "Metaplastic" / "cell.jpeg").read_bytes() == jpeg.getvalue()
    rows = list(csv.DictReader(open(corrections / "corrections.csv", newline="", encoding="utf-8")))
    mine = [r for r in rows if r["uploaded_as"] == "patient A/cell.jpeg"]
    assert [(r["file"], r["corrected"]) for r in mine] == [("Metaplastic/cell.jpeg", "Metaplastic")]
    assert client.post("/correct", json=dict(id="unknown", corrected="Parabasal")).status_code == 404
    assert client.post("/correct", json=dict(id=results[0]["id"], corrected="../../x")).status_code == 400


def test_a_correction_that_cannot_be_recorded_leaves_neither_image_nor_row(trained, formatted, tmp_path, monkeypatch):
    client = client_of(webapp.create_app(trained[0] / "models" / "tiny.pth", tmp_path / "c"))
    image = sample_images(formatted / "sipakmed" / "test")[0]
    first, second = (r["id"] for r in upload(client, [image, ("other.bmp", image.read_bytes())]).json()["results"])
    assert client.post("/correct", json=dict(id=first, corrected="Parabasal")).status_code == 200
    table = (tmp_path / "c" / "corrections.csv").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(webapp.csv, "DictWriter", full_disk)
    answer = client.post("/correct", json=dict(id=second, corrected="Metaplastic"))
    assert answer.status_code == 500 and "could not be saved" in answer.json()["error"]
    assert not (tmp_path / "c" / "Metaplastic").exists() or not list((tmp_path / "c" / "Metaplastic").iterdir())
    assert (tmp_path / "c" / "corrections.csv").read_bytes() == table


def test_corrections_are_a_dataset_that_division_and_training_accept(trained, formatted, tmp_path):
    corrections = tmp_path / "corrections"
    client = client_of(webapp.create_app(trained[0] / "models" / "tiny.pth", corrections))
    parabasal = sample_images(formatted / "sipakmed" / "train" / "Parabasal")[:5]
    superficial = sample_images(formatted / "sipakmed" / "train" / "Superficial-Intermediate")[:5]
    # A name that looks like a path must not become one.
    named = [("../../escape.bmp", parabasal[0].read_bytes()), *[(p.name, p.read_bytes()) for p in parabasal[1:]],
             *[(f"s{i}.bmp", p.read_bytes()) for i, p in enumerate(superficial)]]
    results = upload(client, named).json()["results"]
    for result, corrected in zip(results, ["Parabasal"] * 5 + ["Superficial-Intermediate"] * 5, strict=True):
        answer = client.post("/correct", json=dict(id=result["id"], corrected=corrected)).json()
        assert (corrections / answer["saved"]).is_file()
    assert (corrections / "Parabasal" / "escape.bmp").read_bytes() == parabasal[0].read_bytes()
    assert set(tmp_path.parent.rglob("escape*")) == {corrections / "Parabasal" / "escape.bmp"}
    divided = run_script("implementation_DatasetDivision.py", "--path-dir", corrections, "--output-dir",
                         tmp_path / "divided")
    assert divided.returncode == 0, divided.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "divided" / "train").iterdir()) == ["Parabasal",
                                                                                 "Superficial-Intermediate"]
    result = train(tmp_path / "divided", save_loc="from_corrections", epochs=1, batch_size=2, image_size=32,
                   pretrained=False, onnx=False)
    assert result["weights"].is_file()


@pytest.mark.parametrize("case, message", [
    ("busy port", "cannot listen on 127.0.0.1 port"),
    ("port out of range", "port is 70000; it must be between 1 and 65535"),
    ("unknown host", "is not an address of this computer"),
    ("corrections path is a file", "a file stands where a folder is needed"),
    ("unsafe class name", "names a class '../../../x' that is not a plain folder name"),
    ("unknown option", "error: unrecognized arguments: --colour"),
    ("token that cannot travel", "token must be 8 to 200 letters, digits"),
    ("number that is not one", "error: argument --port: invalid int value: 'eighty'"),
])
def test_server_options_are_checked_before_the_model_loads(trained, tmp_path, case, message):
    model = trained[0] / "models" / "tiny.pth"
    args = ["--corrections-dir", tmp_path / "corrections"]
    blocker = socket.socket()
    if case == "busy port":
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        args += ["--port", blocker.getsockname()[1]]
    elif case == "port out of range":
        args += ["--port", 70000]
    elif case == "unknown host":
        args += ["--host", "no-such-host.invalid", "--port", free_port()]
    elif case == "corrections path is a file":
        (tmp_path / "corrections").write_text("a file")
        args += ["--port", free_port()]
    elif case == "unsafe class name":
        shutil.copy(model, tmp_path / "hostile.pth")
        record = json.loads(model.with_suffix(".json").read_text())
        (tmp_path / "hostile.json").write_text(json.dumps(record | dict(classes=["../../../x", *record["classes"][1:]],
                                                                       abnormal_classes=None)))
        model, args = tmp_path / "hostile.pth", [*args, "--port", free_port()]
    elif case == "unknown option":
        args += ["--colour", "red"]
    elif case == "token that cannot travel":
        args += ["--token", "jeton é", "--port", free_port()]
    else:
        args += ["--port", "eighty"]
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model-path", model, *map(str, args)],
                            capture_output=True, text=True, timeout=120)
    blocker.close()
    assert result.returncode == 2 and "Serving" not in result.stdout and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and message in last_line(result.stderr), result.stderr
    if case not in ("unsafe class name",):
        assert time.monotonic() - start < 10  # refused before the model (and torch) loaded
    assert not list(tmp_path.rglob("../x")) and not (tmp_path.parent.parent / "x").exists()


def test_the_page_in_a_real_browser(trained, formatted, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM, "Debian's chromium is missing: the README's test command installs it"
    server, port = start_server(trained[0] / "models" / "tiny.pth", tmp_path)
    try:
        images = sample_images(formatted / "sipakmed" / "test")[:2]
        (tmp_path / "notes.png").write_text("not an image")
        client = client_of(webapp.create_app(trained[0] / "models" / "tiny.pth", tmp_path / "unused"))
        expected = {r["name"]: r["predicted"] for r in upload(client, images).json()["results"]}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(accept_downloads=True)
            errors = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#pick-files", [*images, tmp_path / "notes.png"])
            expect(page.locator(".card")).to_have_count(2, timeout=60_000)
            assert "notes.png: not an image that Pillow can open" in page.inner_text("#errors")
            cards = page.query_selector_all(".card")
            shown = {card.query_selector(".name").inner_text(): card.query_selector(".predicted").inner_text()
                     for card in cards}
            assert shown == expected
            widths = page.eval_on_selector_all("img.gradcam", "images => images.map(i => i.naturalWidth)")
            assert len(widths) == 2 and all(np.array(widths) > 0)
            select, button = cards[0].query_selector("select"), cards[0].query_selector("button.correct")
            assert select.input_value() == "" and button.is_disabled()  # nothing chosen, nothing to save
            select.select_option("Metaplastic")
            assert not button.is_disabled()
            button.click()
            expect(page.locator(".saved").first).to_contain_text("saved as")
            saved = page.inner_text(".saved").removeprefix("saved as ")
            assert (tmp_path / "corrections" / saved).is_file() and saved.startswith("Metaplastic/")
            with page.expect_download() as download:
                page.click("#download-csv")
            rows = list(csv.DictReader(open(download.value.path(), newline="")))
            assert sorted((r["file"], r["predicted_class"]) for r in rows) == sorted(shown.items())
            with page.expect_download() as download:
                page.click("#download-report")
            report = open(download.value.path(), encoding="utf-8").read()
            assert all(name in report for name in shown) and "deep-cervical-cancer-" not in report
            assert not [e for e in errors if "Content Security Policy" in e], errors
            page.screenshot(path=tmp_path / "page.png", full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_thread_that_finds_its_request_served_runs_no_empty_prediction(served, formatted):
    client, _ = served
    classifier = client.app.state.session.classifier
    sizes, real_run = [], classifier.run

    def counted(jobs):
        sizes.append(len(jobs))
        return real_run(jobs)
    classifier.run = counted
    try:
        image = sample_images(formatted / "sipakmed" / "test")[0]
        with classifier.lock:
            threads = [threading.Thread(target=classifier.predict, args=([image],), kwargs=dict(gradcam=False))
                       for _ in range(3)]
            for thread in threads:
                thread.start()
            while len(classifier.queue) < 3:
                time.sleep(0.01)
        for thread in threads:
            thread.join()
    finally:
        classifier.run = real_run
    assert sizes == [3]  # one prediction served all three; the other two threads ran none


def test_a_field_dropped_on_the_page_shows_its_cells_as_corrections_can_take_them(trained, tmp_path):
    import synthetic_papsmear as demo

    demo.generate_fields(tmp_path / "fields", n_fields=1, nucleus_diameter=24, seed=5)
    client = client_of(webapp.create_app(trained[0] / "models" / "tiny.pth", tmp_path / "c", nucleus_diameter=24))
    field = tmp_path / "fields" / "field_001.png"
    results = upload(client, [field]).json()["results"]
    summary, cells = results[0], results[1:]
    expected = webapp.find_nuclei(Image.open(field).convert("RGB"), 24).table
    assert summary["kind"] == "field" and summary["cells"] == len(cells) == len(expected) > 0
    assert decoded(summary["overlay"]).shape[1] == Image.open(field).width
    assert [(c["x"], c["y"]) for c in cells] == [(round(x, 1), round(y, 1)) for x, y in zip(expected["x"],
                                                                                         expected["y"], strict=True)]
    assert all(c["field"] == "field_001.png" and c["predicted"] in c["probabilities"] for c in cells)
    saved = client.post("/correct", json=dict(id=cells[0]["id"], corrected="Parabasal")).json()
    assert saved["saved"] == "Parabasal/field_001_cell001.png" and (tmp_path / "c" / saved["saved"]).is_file()
    alone = upload(client, [field], field="no").json()["results"]
    assert len(alone) == 1 and "kind" not in alone[0]  # the toggle: one image, one cell
