"""Any class set: abnormal classes for Herlev's and made-up names, an operating point chosen on validation cells and
read back by evaluation, the page and the ONNX file, screening figures that a hand computation confirms, and a
report that stays readable with many errors and long class names."""
import json
import shutil

import numpy as np
import onnx
import pandas as pd
import pytest
from starlette.testclient import TestClient

import synthetic_papsmear as demo
from conftest import last_line, run_script
from papsmear import division, screening, webapp
from papsmear import report as reporting
from papsmear.figures import plt
from papsmear.files import UserError, sample_images

LONG = "Negative for intraepithelial lesion or malignancy (NILM cells)"  # 60 characters, with spaces
RENAMED = {"normal_intermediate": LONG, "light_dysplastic": "Low grade", "severe_dysplastic": "High grade"}


def test_herlev_sipakmed_and_named_groupings():
    herlev = ["carcinoma_in_situ", "light_dysplastic", "moderate_dysplastic", "normal_columnar",
              "normal_intermediate", "normal_superficial", "severe_dysplastic"]
    assert screening.abnormal_classes(herlev) == ["carcinoma_in_situ", "light_dysplastic", "moderate_dysplastic",
                                                  "severe_dysplastic"]
    assert screening.abnormal_classes(herlev[:-1] + ["normal_superficiel"]) is None  # six classes: not Herlev's set
    made_up = ["High grade", "Low grade", LONG]
    assert screening.abnormal_classes(made_up) is None
    assert screening.abnormal_classes(made_up, abnormal=["Low grade", "High grade"]) == ["High grade", "Low grade"]
    assert screening.abnormal_classes(made_up, normal=[LONG]) == ["High grade", "Low grade"]
    with pytest.raises(UserError, match="names 'Cancer', which is not a class of the model; its classes are: "
                                        "'High grade', 'Low grade'"):
        screening.abnormal_classes(made_up, abnormal=["Cancer"])
    with pytest.raises(UserError, match="leaves every class abnormal"):
        screening.abnormal_classes(made_up, abnormal=made_up)


@pytest.fixture(scope="module")
def renamed(tmp_path_factory):
    "A three-class set with long names and spaces (Herlev-like cells renamed), divided."
    root = tmp_path_factory.mktemp("renamed")
    demo.generate_herlev(root / "raw", n_images={name: 14 for name in RENAMED}, size=48, seed=7,
                         classes=tuple(RENAMED))
    for old, new in RENAMED.items():
        (root / "raw" / "New database pictures" / old).rename(root / "raw" / "New database pictures" / new)
    division.divide_dataset(root / "raw", root / "divided", progress=False)
    return root / "divided"


@pytest.fixture(scope="module")
def operated(renamed):
    "R50.py on the renamed set, naming the normal class and asking for 90 % sensitivity on val."
    result = run_script("R50.py", "--path-folder", renamed, "--epochs", 3, "--batch-size", 8, "--lr", 0.01,
                        "--image-size", 32, "--no-pretrained", "--normal-classes", LONG, "--target-sensitivity", 0.9)
    assert result.returncode == 0, result.stderr[-3000:]
    return renamed / "models" / "resnet50.pth", result


def test_the_operating_point_is_chosen_on_val_and_stored_with_the_model(operated, renamed):
    weights, result = operated
    record = json.loads(weights.with_suffix(".json").read_text())
    assert record["abnormal_classes"] == ["High grade", "Low grade"]
    point = record["operating_point"]
    assert point["target_sensitivity"] == 0.9 and "validation split" in point["chosen_on"]
    assert f"operating point: p(abnormal) ≥ {point['threshold']:.4f}" in result.stdout
    # The same choice made by hand on the validation predictions of the kept model.
    validation = reporting.evaluate_folder(weights, renamed / "val", output_dir=renamed.parent / "val-report",
                                           gradcam=0, bootstrap=100)["table"]
    abnormal = validation["true_class"] != LONG
    scores = validation["p_abnormal"].to_numpy()
    reaching = [t for t in sorted(set(scores)) if (scores[abnormal] >= t).mean() >= 0.9]
    assert point["threshold"] == pytest.approx(max(reaching), abs=1e-6)
    assert point["sensitivity"] == pytest.approx((scores[abnormal] >= point["threshold"]).mean())
    stored = {p.key: p.value for p in onnx.load(str(weights.with_suffix(".onnx"))).metadata_props}
    assert json.loads(stored["record"])["operating_point"] == point


@pytest.fixture(scope="module")
def halfway(trained, formatted, tmp_path_factory):
    """A copy of the demo model (whose answers vary) with an operating point that flags half the abnormal test
    cells, chosen on the test split: flags by the threshold then differ from flags by the most probable class."""
    weights = tmp_path_factory.mktemp("halfway") / "tiny.pth"
    for suffix in (".pth", ".json", ".onnx"):
        shutil.copy(trained[0] / "models" / f"tiny{suffix}", weights.with_suffix(suffix))
    record, _ = reporting.choose_on_folder(weights, formatted / "sipakmed" / "test", 0.5, batch_size=16)
    return weights, record


def test_evaluation_reports_sensitivity_and_specificity_at_the_threshold(halfway, formatted, tmp_path):
    weights, record = halfway
    point, abnormal, test = record.operating_point, record.abnormal_classes, formatted / "sipakmed" / "test"
    for model in (weights, weights.with_suffix(".onnx")):
        out = tmp_path / model.suffix
        result = run_script("Inference_FastAI.py", "--model-path", model, "--test-dataset-path", test,
                            "--output-dir", out, "--bootstrap", 200, "--gradcam", 1)
        assert result.returncode == 0, result.stderr[-3000:]
        table = pd.read_csv(out / "predictions.csv")
        actual = table["true_class"].isin(abnormal)
        flagged = table["p_abnormal"] >= point["threshold"]
        assert (flagged != table["predicted_class"].isin(abnormal)).any()  # the threshold, not argmax, decides
        assert list(table["abnormal"]) == list(flagged) and table["abnormal_rule"].iloc[0].startswith("p(abnormal) ≥")
        at = json.loads((out / "metrics.json").read_text())["plain"]["abnormal_vs_normal"]["at_threshold"]
        assert at["sensitivity"] == pytest.approx((flagged & actual).sum() / actual.sum())
        assert at["specificity"] == pytest.approx((~flagged & ~actual).sum() / (~actual).sum())
        assert at["intervals"]["sensitivity"]["low"] <= at["sensitivity"] <= at["intervals"]["sensitivity"]["high"]
        assert "at the operating point p(abnormal) ≥" in result.stdout
        assert "operating point: p(abnormal) ≥" in (out / "report.html").read_text()
        assert (out / "screening_roc.png").is_file()


def test_the_page_flags_by_the_stored_threshold_and_wraps_long_names(halfway, operated, formatted, tmp_path):
    weights, record = halfway
    point = record.operating_point
    client = TestClient(webapp.create_app(weights, tmp_path / "c"), base_url="http://127.0.0.1:8000",
                        headers={webapp.PAGE_HEADER: "page"})
    images = sample_images(formatted / "sipakmed" / "test")
    results = client.post("/predict", files=[("files", (p.name, p.read_bytes(), "image/bmp")) for p in images]).json()
    flags = [result["abnormal"] for result in results["results"]]
    assert flags == [result["p_abnormal"] >= point["threshold"] for result in results["results"]]
    assert flags != [result["predicted"] in record.abnormal_classes for result in results["results"]]
    assert f"flagged when p(abnormal) ≥ {point['threshold']:.4f}" in client.get("/").text
    rows = client.post("/batch.csv", json=dict(ids=[r["id"] for r in results["results"]])).text.splitlines()
    assert rows[0].endswith("p_abnormal,abnormal,abnormal_rule") and "p(abnormal) ≥" in rows[1]
    renamed_page = TestClient(webapp.create_app(operated[0], tmp_path / "d"), base_url="http://127.0.0.1:8000")
    assert LONG in renamed_page.get("/").text


def test_bad_screening_options_are_one_line_errors(operated, renamed, tmp_path):
    weights, _ = operated
    cases = [(("R50.py", "--path-folder", renamed, "--abnormal-classes", "Cancer", "--epochs", 1, "--no-pretrained"),
              "names 'Cancer', which is not a class of the model; its classes are: 'High grade'"),
             (("R50.py", "--path-folder", renamed, "--target-sensitivity", 1.5, "--epochs", 1, "--no-pretrained"),
              "target_sensitivity is 1.5; it must lie in (0, 1]"),
             (("operating_point.py", "--model-path", weights, "--target-sensitivity", 0),
              "target_sensitivity is 0.0; it must lie in (0, 1]")]
    normal_only = tmp_path / "normal only"
    shutil.copytree(renamed / "val" / LONG, normal_only / LONG)
    cases.append((("operating_point.py", "--model-path", weights, "--labelled-folder", normal_only),
                  "holds no abnormal cell"))
    before = weights.with_suffix(".json").read_bytes()
    for args, message in cases:
        result = run_script(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert message in last_line(result.stderr), last_line(result.stderr)
    assert weights.with_suffix(".json").read_bytes() == before  # refused: the stored point is untouched


def test_a_new_operating_point_is_stored_in_every_file_of_the_model(operated, renamed, tmp_path):
    weights, _ = operated
    copy = tmp_path / "model"
    copy.mkdir()
    for suffix in (".pth", ".json", ".onnx"):
        shutil.copy(weights.with_suffix(suffix), copy / f"resnet50{suffix}")
    result = run_script("operating_point.py", "--model-path", copy / "resnet50.pth", "--labelled-folder",
                        renamed / "test", "--target-sensitivity", 1.0, "--abnormal-classes", "High grade")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((copy / "resnet50.json").read_text())
    assert record["abnormal_classes"] == ["High grade"] and record["operating_point"]["sensitivity"] == 1.0
    stored = {p.key: p.value for p in onnx.load(str(copy / "resnet50.onnx")).metadata_props}
    assert json.loads(stored["record"])["operating_point"] == record["operating_point"]


def test_the_gallery_keeps_a_few_overlays_per_confusion_cell_and_says_how_many_more():
    rng = np.random.default_rng(0)
    classes = ["A", "B", "C", "D"]
    truth = rng.integers(0, 4, 400)
    probabilities = rng.dirichlet(np.ones(4), 400)  # a model that errs three times in four
    chosen, more = reporting.gradcam_selection(truth, probabilities, classes, n=3)
    predicted = probabilities.argmax(1)
    wrong = [(t, p) for t, p in zip(truth, predicted, strict=True) if t != p]
    cells = {(classes[t], classes[p]) for t, p in wrong}
    assert sum(why == "misclassified" for _, why in chosen) == 3 * len(cells) == 36
    assert sum(more.values()) == len(wrong) - 36 and all(v > 0 for v in more.values())
    assert len(chosen) <= 36 + 2 * 3 * len(classes) and len({i for i, _ in chosen}) == len(chosen)


def test_a_sixty_character_class_name_is_wrapped_inside_the_overlay_and_the_matrix(tmp_path):
    fig, ax = plt.subplots(figsize=(3.2, 3.4))
    ax.imshow(np.zeros((8, 8)))
    title = reporting.fit_title(ax, f"cell.bmp\npredicted {LONG} (0.91), true {LONG}")
    fig.canvas.draw()
    box = title.get_window_extent(fig.canvas.get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and title.get_text().replace("\n", "").replace(" ", "") == (
        f"cell.bmppredicted{LONG}(0.91),true{LONG}".replace(" ", ""))
    plt.close(fig)
    reporting.plot_confusion([[3, 1, 0], [0, 2, 2], [1, 0, 5]], [LONG, "Low grade", "High grade"],
                             tmp_path / "matrix.png", title=f"a model on {LONG}")
    assert (tmp_path / "matrix.png").stat().st_size > 0


def test_a_long_class_name_wraps_inside_its_card_in_a_browser(operated, renamed, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    from test_webapp import CHROMIUM, start_server

    weights, _ = operated
    server, port = start_server(weights, tmp_path)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#pick-files", sample_images(renamed / "test" / LONG)[:1])
            expect(page.locator(".card")).to_have_count(1, timeout=60_000)
            page.locator(".card select").select_option(LONG)
            overflowing = page.eval_on_selector_all(
                ".card .predicted, .card li, .card .name, #rule", "nodes => nodes.filter(n => n.scrollWidth > "
                "n.clientWidth).map(n => n.textContent)")
            assert overflowing == [] and LONG in page.inner_text(".card")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
