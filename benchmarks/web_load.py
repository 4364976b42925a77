"""Load on the web page's server: concurrent clients upload cell images to app.py on 127.0.0.1, and every
answer is checked against the batched prediction of the same images made in the same run by a model trained here
for a few epochs, whose answers differ from image to image (so that answers mixed up between clients would show).

Prints the latency of the uploads (p50, p95) and the server's images per second, with Grad-CAM (what the page
asks for) and without, each the median of `repeats` loads after a warm-up, beside the batched prediction of the
same model decoding the images in its own process, as the server does (warm-up, then the median of `repeats`).
    .venv/bin/python benchmarks/web_load.py
"""
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from fastcore.script import call_parse

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "demo")]
import synthetic_papsmear as demo  # noqa: E402
from inference_speed import trained_model  # noqa: E402
from papsmear import predict  # noqa: E402
from papsmear.files import sample_images  # noqa: E402
from papsmear.webapp import PAGE_HEADER  # noqa: E402
from timing import repeated, spread  # noqa: E402


def free_port():
    "A TCP port nobody listens on now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(address, seconds=120):
    "Wait until the server answers (it loads the model first)."
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            return httpx.get(address, timeout=5).status_code
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"no answer from {address} in {seconds} s")


def client(address, uploads, gradcam):
    "One client's uploads, one after the other: (latencies, (file name, predicted class) answers, errors)."
    latencies, answers, errors = [], [], 0
    with httpx.Client(timeout=600) as session:
        for files in uploads:
            start = time.perf_counter()
            response = session.post(f"{address}predict", data={"gradcam": str(gradcam).lower(), "field": "no"},
                                    headers={PAGE_HEADER: "page"},
                                    files=[("files", (str(f), f.read_bytes(), "image/bmp")) for f in files])
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                errors += 1
                continue
            for result in response.json()["results"]:
                errors += "error" in result
                answers.append((result["name"], result.get("predicted")))
    return latencies, answers, errors


def load(address, files, clients, uploads, per_upload, gradcam):
    "(seconds, latencies, answers, errors) of `clients` concurrent clients, each sending `uploads` uploads."
    plans = [[[files[(c * uploads * per_upload + u * per_upload + k) % len(files)] for k in range(per_upload)]
              for u in range(uploads)] for c in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(lambda plan: client(address, plan, gradcam), plans))
    seconds = time.perf_counter() - start
    return (seconds, [t for d in done for t in d[0]], [a for d in done for a in d[1]], sum(d[2] for d in done))


@call_parse
def main(clients: int = 20,       # concurrent clients
         uploads: int = 5,        # uploads per client
         per_upload: int = 4,     # images per upload
         image_size: int = 224,   # model input side
         repeats: int = 3):       # timed runs of the batched prediction, and loads of the server, after a warm-up
    "Load the server with concurrent uploads; check every answer; compare its rate with batched prediction."
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        demo.generate_herlev(folder / "raw", n_images=14, size=200, seed=1, classes=demo.HERLEV_CLASSES[:5])
        for split, part in (("train", slice(0, 6)), ("val", slice(6, 8)), ("test", slice(8, None))):
            for cls in sorted((folder / "raw").glob("*/*")):
                (folder / split / cls.name).mkdir(parents=True)
                for f in sorted(p for p in cls.glob("*.BMP"))[part]:
                    (folder / split / cls.name / f.name).write_bytes(f.read_bytes())
        files = sample_images(folder / "test")
        model = trained_model(folder, image_size)
        learn, record = predict.load_classifier(model, files)
        with learn.no_bar():  # decoded in this process, as the server decodes: like for like
            *timing, probabilities = repeated(predict.predict_files, learn, files, 16, decoders=0, repeats=repeats)
        expected = {str(f): record.classes[i] for f, i in zip(files, probabilities.argmax(1), strict=True)}
        port = free_port()
        server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model-path", str(model),
                                   "--corrections-dir", str(folder / "corrections"), "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            address = f"http://127.0.0.1:{port}/"
            wait_for(address)
            rows = []
            for gradcam in (False, True):
                load(address, files, 1, 1, per_upload, gradcam)  # warm-up
                runs = [load(address, files, clients, uploads, per_upload, gradcam) for _ in range(repeats)]
                seconds, latencies, answers, errors = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
                wrong = sum(expected[name] != predicted for run in runs for name, predicted in run[2])
                rows.append((gradcam, seconds, latencies, len(answers), wrong, sum(run[3] for run in runs)))
        finally:
            server.terminate()
            server.wait(timeout=30)
    batched = len(files) / timing[0]
    print(f"{clients} clients x {uploads} uploads x {per_upload} images, {image_size} px, server on 127.0.0.1; "
          f"batched prediction (batch 16, decoded in process) of the same {len(files)} images: {spread(*timing)} s, "
          f"{batched:.2f} images/s; the model calls them {len(set(expected.values()))} different classes")
    print(f"median of {repeats} loads; wrong and errors counted over all {repeats}")
    print("Grad-CAM | images | wrong | errors | p50 latency s | p95 latency s | server images/s | of batched")
    for gradcam, seconds, latencies, n, wrong, errors in rows:
        p95 = statistics.quantiles(latencies, n=20)[-1]
        print(f"{'yes' if gradcam else 'no':8} | {n:6} | {wrong:5} | {errors:6} | "
              f"{statistics.median(latencies):13.2f} | {p95:13.2f} | {n / seconds:15.2f} | "
              f"{n / seconds / batched:9.0%}")
