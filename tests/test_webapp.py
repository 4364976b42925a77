"""The web page: predictions equal Inference_FastAI.py's, limits, token, corrections that the division script
accepts, and the page in a real browser (Debian's Chromium driven by Playwright)."""
import csv
import io
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from conftest import ROOT, run_script
from papsmear import learner, webapp
from papsmear import report as reporting
from papsmear.files import sample_images

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    "The web app of the demo model (.pth), with a corrections folder of its own."
    corrections = tmp_path_factory.mktemp("corrections")
    app = webapp.create_app(trained[0] / "models" / "tiny.pth", corrections)
    return TestClient(app), corrections


def upload(client, paths, **extra):
    "POST images (path or (name, bytes)) to /predict; the response."
    files = [("files", (p[0], p[1], "application/octet-stream") if isinstance(p, tuple)
              else (p.name, p.read_bytes(), "image/bmp")) for p in paths]
    return client.post("/predict", files=files, data=extra)


def test_the_page_predicts_what_inference_predicts_and_loads_nothing_from_elsewhere(served, trained, formatted,
                                                                                   tmp_path):
    client, _ = served
    page = client.get("/").text
    assert "<script" in page and "src=" not in page and "http" not in page  # no outside address, nothing fetched
    test = formatted / "sipakmed" / "test"
    images = sample_images(test)[::3]
    results = upload(client, images).json()["results"]
    evaluation = reporting.evaluate_folder(trained[0] / "models" / "tiny.pth", test, output_dir=tmp_path, gradcam=0,
                                           bootstrap=100)
    table = evaluation["table"].set_index("file")
    for image, result in zip(images, results, strict=True):
        row = table.loc[str(image)]
        assert result["predicted"] == row["predicted_class"]
        assert result["probabilities"] == pytest.approx({c: row[f"p_{c}"] for c in evaluation["classes"]}, abs=1e-5)
        assert result["abnormal"] == (row["predicted_class"] in ("Dyskeratotic", "Koilocytotic"))
        assert result["gradcam"].startswith("data:image/png;base64,")


def test_concurrent_uploads_each_get_their_own_answers(served, formatted):
    client, _ = served
    session = client.app.state.session
    images = sample_images(formatted / "sipakmed" / "test")[:12]
    named = [(f"{p.parent.name}/{p.name}", p.read_bytes()) for p in images]  # names repeat across classes
    alone = {name: session.add([(name, data)], gradcam=False)[0]["probabilities"] for name, data in named}
    groups = [named[i::4] for i in range(4)]  # four requests of three images, sent at once
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda group: session.add(group, gradcam=group is groups[0]), groups))
    for group, results in zip(groups, answers, strict=True):
        assert [r["name"] for r in results] == [name for name, _ in group]
        for result in results:
            assert result["probabilities"] == pytest.approx(alone[result["name"]], abs=1e-5)
            assert (result["gradcam"] is not None) == (group is groups[0])


def test_limits_non_images_and_tokens_are_refused_with_a_message(trained, formatted, tmp_path):
    image = sample_images(formatted / "sipakmed" / "test")[0]
    small = webapp.Limits(file_mb=image.stat().st_size / 2e6, request_mb=1, files=2, pixels=10_000)
    client = TestClient(webapp.create_app(trained[0] / "models" / "tiny.pth", tmp_path / "c", limits=small))
    answers = upload(client, [image, ("notes.png", b"not an image at all")]).json()["results"]
    assert answers[0]["error"] == f"larger than {small.file_mb:g} MB"
    assert answers[1]["error"] == "not an image that Pillow can open"
    big = io.BytesIO()
    Image.new("RGB", (200, 100)).save(big, format="PNG")
    assert upload(client, [("wide.png", big.getvalue())]).json()["results"][0]["error"] == (
        "200x100 pixels, more than 10,000")
    too_many = upload(client, [("a.png", b"1"), ("b.png", b"2"), ("c.png", b"3")])
    assert too_many.status_code == 413 and "more than 2 files" in too_many.json()["error"]
    too_big = upload(client, [("a.png", b"0" * 1_100_000)])
    assert too_big.status_code == 413 and "more than 1 MB per request" in too_big.json()["error"]
    assert not (tmp_path / "c").exists()  # nothing refused was kept
    guarded = TestClient(webapp.create_app(trained[0] / "models" / "tiny.pth", tmp_path / "c", token="s3cret"))
    assert guarded.get("/").status_code == 403 and upload(guarded, [image]).status_code == 403
    assert guarded.get("/?token=s3cret").status_code == 200  # sets the cookie the page's requests then carry
    assert upload(guarded, [image]).status_code == 200
    assert webapp.needs_token("127.0.0.1", None) is None and len(webapp.needs_token("0.0.0.0", None)) >= 24


def test_corrections_are_a_dataset_that_division_and_training_accept(served, formatted, tmp_path):
    client, corrections = served
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
    assert not list(corrections.parent.glob("escape*")) and not list(corrections.parent.parent.glob("escape*"))
    with open(corrections / "corrections.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    assert [r["corrected"] for r in rows] == ["Parabasal"] * 5 + ["Superficial-Intermediate"] * 5
    assert [r["predicted"] for r in rows] == [r["predicted"] for r in results]
    divided = run_script("implementation_DatasetDivision.py", "--path-dir", corrections, "--output-dir",
                         tmp_path / "divided")
    assert divided.returncode == 0, divided.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "divided" / "train").iterdir()) == ["Parabasal",
                                                                                 "Superficial-Intermediate"]
    trained = learner.train_r50(tmp_path / "divided", save_loc="from_corrections", epochs=1, batch_size=2,
                                image_size=32, pretrained=False, onnx=False)
    assert trained["weights"].is_file()
    assert client.post("/correct", json=dict(id="unknown", corrected="Parabasal")).status_code == 400


def free_port():
    "A TCP port nobody listens on now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_in_a_real_browser(trained, formatted, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "Debian's chromium is missing: the README's test command installs it"
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model-path", trained[0] / "models" / "tiny.pth",
                               "--corrections-dir", tmp_path / "corrections", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert f"http://127.0.0.1:{port}/" in server.stdout.readline()
        images = sample_images(formatted / "sipakmed" / "test")[:2]
        (tmp_path / "notes.png").write_text("not an image")
        expected = reporting.evaluate_folder(trained[0] / "models" / "tiny.pth", formatted / "sipakmed" / "test",
                                             output_dir=tmp_path / "inference", gradcam=0, bootstrap=100)["table"]
        expected = dict(zip(expected["file"], expected["predicted_class"], strict=True))
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(accept_downloads=True)
            for _ in range(100):  # the server needs a few seconds to load the model
                try:
                    page.goto(f"http://127.0.0.1:{port}/")
                    break
                except Exception:  # not listening yet
                    time.sleep(0.2)
            page.set_input_files("#pick-files", [*images, tmp_path / "notes.png"])
            page.wait_for_function("document.querySelectorAll('.card').length === 2", timeout=60_000)
            assert "notes.png: not an image that Pillow can open" in page.inner_text("#errors")
            cards = page.query_selector_all(".card")
            shown = {card.query_selector("div").inner_text(): card.query_selector(".predicted").inner_text()
                     for card in cards}
            assert shown == {image.name: expected[str(image)] for image in images}
            widths = page.eval_on_selector_all("img.gradcam", "images => images.map(i => i.naturalWidth)")
            assert len(widths) == 2 and all(np.array(widths) > 0)
            cards[0].query_selector("select").select_option("Metaplastic")
            cards[0].query_selector("button.correct").click()
            page.wait_for_function("document.querySelector('.saved').textContent.startsWith('saved as')")
            saved = page.inner_text(".saved").removeprefix("saved as ")
            assert (tmp_path / "corrections" / saved).is_file() and saved.startswith("Metaplastic/")
            with page.expect_download() as download:
                page.click("#download-csv")
            rows = list(csv.DictReader(open(download.value.path(), newline="")))
            assert sorted((r["file"], r["predicted_class"]) for r in rows) == sorted(shown.items())
            page.screenshot(path=tmp_path / "page.png", full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
