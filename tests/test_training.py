"""R50.py, TTLR50.py and R50Herlev.py: training that learns, head swaps that train, weights that load."""
import hashlib
import json
import shutil
from urllib.error import URLError

import pandas as pd
import pytest
import torch
from fastai.learner import load_learner

import TTLR50
from conftest import IMAGE_SIZE, run_script, train
from papsmear import data, learner
from papsmear import files as papfiles


def tiny_learner(path, batch_size=10, **kwargs):
    "A random-init learner on a formatted demo dataset, loading in the main process."
    return learner.pap_learner(data.pap_dls(path, IMAGE_SIZE, batch_size, workers=0), path=path, **kwargs)


def body_state(learn):
    return {k: v.clone() for k, v in learn.model[0].state_dict().items()}


def test_r50_writes_weights_classes_export_log_and_curves(trained):
    path, result = trained
    models = path / "models"
    assert result["weights"] == models / "tiny.pth" and result["export"] == models / "tiny.pkl"
    record = json.loads((models / "tiny.json").read_text())
    assert {k: record[k] for k in ("classes", "image_size", "arch", "recipe", "abnormal_classes")} == {
        "classes": ["Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate"],
        "image_size": IMAGE_SIZE, "arch": "resnet50", "recipe": "original",
        "abnormal_classes": ["Dyskeratotic", "Koilocytotic"]}
    assert {k: record["training"][k] for k in ("epochs", "batch_size", "lr", "save_loc", "seed")} == dict(
        epochs=4, batch_size=16, lr=0.01, save_loc="tiny", seed=42)
    # Every training image's bytes, an Extended DA output counting as its source: the sources of train/.
    sources = [f for f in (path / "train").rglob("*.bmp") if "_aug" not in f.stem]
    assert record["trained_on"] == sorted({hashlib.sha256(f.read_bytes()).hexdigest() for f in sources})
    log = pd.read_csv(models / "tiny_log.csv")
    assert list(log.columns[:8]) == ["epoch", "train_loss", "valid_loss", "accuracy", "balanced_accuracy", "macro_f1",
                                     "f2_weighted", "f1_weighted"]
    assert len(log) == 4
    assert (models / "tiny_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_learns_the_demo_classes(trained):
    path, result = trained
    log = pd.read_csv(path / "models" / "tiny_log.csv")
    assert log["accuracy"].max() >= 0.5  # chance is 0.2
    # The saved weights are the best epoch's: their validation accuracy is the log's best.
    assert result["scores"].loc["validation", "accuracy"] == pytest.approx(log["accuracy"].max(), abs=1e-6)


def test_export_loads_and_predicts_class_names(trained, formatted):
    path, _ = trained
    learn = load_learner(path / "models" / "tiny.pkl")
    image = next((formatted / "sipakmed" / "test" / "Parabasal").iterdir())
    predicted, index, probabilities = learn.predict(image)
    assert predicted in learn.dls.vocab and list(learn.dls.vocab)[int(index)] == predicted
    assert float(probabilities.sum()) == pytest.approx(1, abs=1e-5)


def test_resuming_from_model_path_starts_from_the_saved_weights(trained):
    path, _ = trained
    learn = tiny_learner(path)
    learner.load_weights(learn, path / "models" / "tiny.pth")
    saved = torch.load(path / "models" / "tiny.pth", weights_only=True)
    state = learn.model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)


def test_swap_head_keeps_the_body_and_the_new_layer_trains(formatted):
    learn = tiny_learner(formatted / "sipakmed")
    learn.unfreeze()
    learn.fit(1, 1e-3)  # an optimiser exists now: swap_head must not let fastai reuse it
    body = body_state(learn)
    TTLR50.swap_head(learn, 7)
    assert learn.model[1][-1].out_features == 7 and learn.model[1][-1].in_features == 512
    assert learn.model(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)).shape == (2, 7)
    TTLR50.swap_head(learn, 5)
    assert all(torch.equal(body[k], v) for k, v in learn.model[0].state_dict().items())
    new_layer = learn.model[1][-1].weight.detach().clone()
    learn.fit(1, 1e-3)
    assert not torch.equal(new_layer, learn.model[1][-1].weight.detach())


def test_a_7_class_checkpoint_loads_into_a_5_class_learner_through_the_helper(formatted, tmp_path):
    herlev = tiny_learner(formatted / "herlev")
    with torch.no_grad():  # a body unlike any fresh learner's, as after training on Herlev
        for tensor in herlev.model.state_dict().values():
            tensor.add_(torch.rand_like(tensor.float()).to(tensor.dtype) + 1)
    herlev.save(tmp_path / "herlev7", with_opt=False)
    sipakmed = tiny_learner(formatted / "sipakmed")
    expected = herlev.model[0].state_dict()
    assert not any(torch.equal(expected[k], v) for k, v in sipakmed.model[0].state_dict().items())
    with pytest.raises(papfiles.UserError, match="has a 7-class head but the data has 5 classes"):
        learner.load_weights(sipakmed, tmp_path / "herlev7.pth")
    TTLR50.load_weights_across_heads(sipakmed, tmp_path / "herlev7.pth")
    assert sipakmed.model[1][-1].out_features == 5
    assert all(torch.equal(expected[k], v) for k, v in sipakmed.model[0].state_dict().items())
    # The head below the new last layer comes from the checkpoint too; the last layer is new.
    assert torch.equal(sipakmed.model[1][4].weight, herlev.model[1][4].weight)
    assert not torch.equal(sipakmed.model[1][-1].weight[:5], herlev.model[1][-1].weight[:5])


def test_the_swapped_head_is_initialised_as_fastai_does_and_differs_from_the_old_one(formatted):
    learn = tiny_learner(formatted / "sipakmed")
    learn.unfreeze()
    learn.fit(1, 1e-2)
    old = learn.model[1][-1]
    torch.manual_seed(0)
    TTLR50.swap_head(learn, 5)
    new = learn.model[1][-1]
    assert new is not old and new.weight.shape == old.weight.shape and new.bias is old.bias is None
    assert not torch.equal(new.weight, old.weight)
    # Kaiming-normal (fan-in, gain √2): the weights' standard deviation is √(2 / 512) ≈ 0.0625.
    assert float(new.weight.detach().std()) == pytest.approx((2 / 512) ** 0.5, rel=0.05)
    assert float(new.weight.detach().mean()) == pytest.approx(0, abs=0.01)
    learn.model[1][-1] = torch.nn.Linear(512, 5)  # a head with a bias (PyTorch draws it uniformly, not 0)
    assert learn.model[1][-1].bias.abs().sum() > 0
    TTLR50.swap_head(learn, 7)
    assert torch.equal(learn.model[1][-1].bias, torch.zeros(7))  # fastai's init_default: zero bias


def test_r50_refuses_a_model_path_with_another_head_from_the_command_line(trained, formatted, tmp_path):
    shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    result = run_script("R50.py", "--no-onnx", "--path-folder", tmp_path / "herlev", "--model-path",
                        trained[0] / "models" / "tiny.pth", "--epochs", 1, "--image-size", IMAGE_SIZE)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "has a 5-class head but the data has 7 classes" in result.stderr
    assert not list((tmp_path / "herlev" / "models").iterdir())


def test_triple_transfer_learning_ends_with_a_5_class_model(trained, formatted, tmp_path):
    for name in ("herlev", "sipakmed"):
        shutil.copytree(formatted / name, tmp_path / name)
    results = TTLR50.triple_transfer(trained[0] / "models" / "tiny.pth", tmp_path / "herlev",
                                     tmp_path / "sipakmed", herlev_epochs=1, epochs=1, image_size=IMAGE_SIZE,
                                     workers=0, onnx=False)
    herlev_classes = json.loads((tmp_path / "herlev" / "models" / "resnet50_ttl_herlev.json").read_text())
    assert len(herlev_classes["classes"]) == 7
    final = load_learner(tmp_path / "sipakmed" / "models" / f"{TTLR50.save_loc}.pkl")
    assert list(final.dls.vocab) == json.loads(results["sipakmed"]["classes"].read_text())["classes"]
    assert final.model[1][-1].out_features == 5
    # Stage 2 alone restarts from the Herlev weights on disk.
    again = TTLR50.triple_transfer(None, tmp_path / "herlev", tmp_path / "sipakmed", onnx=False, epochs=1,
                                      image_size=IMAGE_SIZE, start_stage=2, save_loc="again", workers=0)
    assert list(again) == ["sipakmed"] and (tmp_path / "sipakmed" / "models" / "again.pth").exists()


def test_wrong_class_counts_are_refused_before_training(trained, formatted, tmp_path):
    result = run_script("R50Herlev.py", "--no-onnx", "--previous-model-da", trained[0] / "models" / "tiny.pth",
                        "--herlev-path", formatted / "sipakmed", "--sipakmed-path", formatted / "sipakmed")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {formatted / 'sipakmed'} has 5 classes")
    assert "but 7 were expected" in result.stderr
    assert not (formatted / "sipakmed" / "models" / "resnet50_ttl_herlev.pth").exists()


def test_offline_pretrained_download_fails_fast_with_the_three_ways_out(formatted, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise URLError("simulated: no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    dls = data.pap_dls(formatted / "sipakmed", IMAGE_SIZE, workers=0)
    with pytest.raises(papfiles.UserError) as error:
        learner.pap_learner(dls, pretrained=True)
    message = str(error.value)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert f"put resnet50-11ad3fa6.pth into {checkpoints}" in message
    assert "pretrained_weights" in message and "pretrained = False" in message


def test_local_pretrained_weights_are_loaded_into_the_body(formatted, tmp_path):
    from torchvision.models import resnet18, resnet50
    reference = resnet50()
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    learn = tiny_learner(formatted / "sipakmed", pretrained=True, pretrained_weights=tmp_path / "resnet50.pth")
    assert torch.equal(learn.model[0][0].weight, reference.conv1.weight)
    assert torch.equal(learn.model[0][7][2].conv3.weight, reference.layer4[2].conv3.weight)
    torch.save(resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(papfiles.UserError, match="is not a torchvision ResNet50 state dict"):
        tiny_learner(formatted / "sipakmed", pretrained=True, pretrained_weights=tmp_path / "resnet18.pth")


def test_help_lists_every_variable():
    for script, flags in {"R50.py": ["--path-folder", "--save-loc", "--model-path", "--export-path", "--epochs",
                                     "--batch-size", "--lr", "--image-size", "--no-pretrained",
                                     "--pretrained-weights", "--seed", "--lr-find", "--cache-size",
                                     "--memory-budget"],
                          "R50Herlev.py": ["--previous-model-da", "--herlev-path", "--sipakmed-path",
                                           "--current-classes-of-dataset", "--output-classes-of-next-dataset",
                                           "--herlev-epochs", "--herlev-batch-size", "--save-loc", "--start-stage",
                                           "--memory-budget"]
                          }.items():
        result = run_script(script, "--help")
        assert result.returncode == 0 and all(flag in result.stdout for flag in flags)


def test_lr_find_saves_its_plot_and_leaves_lr_as_set(formatted, tmp_path):
    path = shutil.copytree(formatted / "herlev", tmp_path / "herlev")
    result = run_script("R50.py", "--no-onnx", "--path-folder", path, "--epochs", 1, "--image-size", 32, "--lr", 0.005,
                        "--batch-size", 4, "--no-pretrained", "--lr-find", "--save-loc", "found")  # lr_find: 100 steps
    assert result.returncode == 0, result.stderr
    assert "lr_find suggests lr = " in result.stdout and "training with lr = 0.005" in result.stdout
    assert (path / "models" / "found_lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert pd.read_csv(path / "models" / "found_log.csv").shape[0] == 1


def test_training_is_deterministic_by_seed(formatted, tmp_path):
    states = []
    for run in ("a", "b"):
        path = shutil.copytree(formatted / "herlev", tmp_path / run)
        train(path, onnx=False, save_loc="seeded", epochs=1, batch_size=8, image_size=32,
                          pretrained=False, workers=0)
        states.append(torch.load(path / "models" / "seeded.pth", weights_only=True))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
