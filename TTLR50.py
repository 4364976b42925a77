"""The Triple Transfer Learning helper: swap the ResNet50 head between 7 and 5 classes, load weights saved with
another head, run one TTL stage and the whole Herlev → SIPaKMeD transfer. Data and learners come from the
papsmear package. The final TTL stage's defaults (its `save_loc` among them) are set here, once.

torch, fastai and the package's training modules are imported by the functions that use them, so that
R50Herlev.py, which reads the defaults below, answers --help without loading them.
"""
from dataclasses import replace
from pathlib import Path

from papsmear.files import UserError, check_file_name, user_path
from papsmear.record import TrainingSettings

# --- the final TTL stage's defaults (R50Herlev.py overrides them from its top or the command line) ------
save_loc = "resnet50_ttl_sipakmed"   # final model: sipakmed_path/models/<save_loc>.pth and .pkl
epochs = 50                          # one-cycle epochs of the SIPaKMeD stage
batch_size = 10
lr = 1e-3                            # maximum one-cycle learning rate
image_size = 224                     # training image side in pixels
herlev_save_loc = "resnet50_ttl_herlev"  # Herlev stage weights: herlev_path/models/<this>.pth
# ---------------------------------------------------------------------------------------------------


def swap_head(learn, n_out):
    """Replace the last Linear of the head by a new one with `n_out` outputs (same inputs, bias setting
    and device), and drop the optimiser so that the next fit creates one that trains the new layer."""
    from fastai.torch_core import init_default
    from torch import nn

    from papsmear.learner import head_linear

    index, old = head_linear(learn.model)
    new = nn.Linear(old.in_features, n_out, bias=old.bias is not None).to(old.weight.device)
    init_default(new, nn.init.kaiming_normal_)  # fastai's head init: Kaiming-normal weights, zero bias
    learn.model[1][index] = new
    learn.opt = None  # fastai's fit only makes a new optimiser when there is none
    return learn


def load_weights_across_heads(learn, path, n_out=None):
    """Load a `.pth` saved with any number of classes: set the head to the checkpoint's size, load strictly,
    then swap the head to `n_out` outputs (default: the learner's data classes)."""
    from papsmear.learner import head_classes, head_linear, read_weights

    state = read_weights(path)
    n_saved, n_out = head_classes(state, path), n_out or learn.dls.c
    if n_saved != head_linear(learn.model)[1].out_features:
        swap_head(learn, n_saved)
    learn.model.load_state_dict(state)
    if n_saved != n_out:
        swap_head(learn, n_out)
    return learn


def ttl_stage(settings, start_weights):
    """One Triple Transfer Learning stage, as `settings` (a `papsmear.record.TrainingSettings`) says: start from
    `start_weights` (saved with any number of classes), make the head fit the classes of the settings' dataset,
    train with its recipe (best epoch by its monitor, imbalance made up for by its balance), then save and export
    under its save_loc. With `resume` the stage continues from its last-epoch checkpoint instead
    (`papsmear.checkpoint`)."""
    from papsmear.data import pap_dls
    from papsmear.learner import pap_learner, train_and_save

    dls = pap_dls(settings.path_folder, image_size=settings.image_size, batch_size=settings.batch_size,
                  seed=settings.seed, workers=settings.workers, cache_size=settings.cache_size, recipe=settings.recipe,
                  memory_budget=settings.memory_budget, balance=settings.balance)
    learn = pap_learner(dls, pretrained=False, path=settings.path_folder, recipe=settings.recipe,
                        balance=settings.balance)
    if not settings.resume:  # a resumed stage takes its weights from the checkpoint
        load_weights_across_heads(learn, start_weights)
    return train_and_save(learn, settings, start_weights=start_weights)


def triple_transfer(previous_model_DA, herlev_path, sipakmed_path, current_classes_of_dataset=7,
                    output_classes_of_next_dataset=5, herlev_epochs=10, herlev_batch_size=5,
                    herlev_save_loc=herlev_save_loc, epochs=epochs, batch_size=batch_size, lr=lr,
                    image_size=image_size, save_loc=save_loc, start_stage=1, seed=42, workers=None,
                    cache_size=None, recipe="original", memory_budget=None, monitor="accuracy", balance="none",
                    resume=False, keep_last=False, onnx=True, int8=False, abnormal_classes=None,
                    normal_classes=None, target_sensitivity=None):
    """Run the Herlev stage (unless start_stage is 2) and the SIPaKMeD stage, each with `recipe`'s
    augmentation, loss and schedule (the numbers given here stay), `monitor` and `balance`; returns each
    stage's summary. With `resume`, a stage that finished (models/<save_loc>.done.json) is not run again and
    the interrupted stage continues from its checkpoint. `abnormal_classes` (or `normal_classes`) and
    `target_sensitivity` are the final stage's: its screening grouping and operating point."""
    from papsmear.balance import check_balance, check_monitor
    from papsmear.checkpoint import checkpoint_path, done_path, stage_finished
    from papsmear.data import check_formatted, recipe_settings
    from papsmear.launch import is_main_process
    from papsmear.learner import check_training_options
    from papsmear.screening import check_target_sensitivity

    recipe_settings(recipe)  # an unknown recipe, monitor or balance is refused before any work
    check_monitor(monitor)
    check_balance(balance)
    check_target_sensitivity(target_sensitivity)
    if start_stage not in (1, 2):
        raise UserError(f"start_stage is {start_stage}; it must be 1 (Herlev, then SIPaKMeD) or 2")
    check_file_name(herlev_save_loc, "herlev_save_loc")
    check_training_options(save_loc, herlev_epochs=herlev_epochs, herlev_batch_size=herlev_batch_size,
                           epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size,
                           current_classes_of_dataset=current_classes_of_dataset,
                           output_classes_of_next_dataset=output_classes_of_next_dataset,
                           workers=workers, cache_size=cache_size, memory_budget=memory_budget)
    check_formatted(herlev_path, current_classes_of_dataset)
    check_formatted(sipakmed_path, output_classes_of_next_dataset)
    herlev_path, sipakmed_path = user_path(herlev_path), user_path(sipakmed_path)
    herlev_weights = herlev_path / "models" / f"{herlev_save_loc}.pth"
    final = TrainingSettings(path_folder=sipakmed_path, save_loc=save_loc, epochs=epochs, batch_size=batch_size,
                             lr=lr, image_size=image_size, pretrained=False, seed=seed, workers=workers,
                             cache_size=cache_size, recipe=recipe, memory_budget=memory_budget, monitor=monitor,
                             balance=balance, keep_last=keep_last, onnx=onnx, int8=int8,
                             abnormal_classes=abnormal_classes, normal_classes=normal_classes,
                             target_sensitivity=target_sensitivity)
    herlev = replace(final, path_folder=herlev_path, save_loc=herlev_save_loc, epochs=herlev_epochs,
                     batch_size=herlev_batch_size, abnormal_classes=None, normal_classes=None, target_sensitivity=None)
    results = {}
    herlev_models, sipakmed_models = herlev_path / "models", sipakmed_path / "models"
    identity = {k: v for k, v in herlev.identity([]).items() if k != "classes"}
    herlev_done = resume and start_stage == 1 and stage_finished(herlev_models, herlev_save_loc, identity)
    if herlev_done and is_main_process():
        print(f"Herlev stage: finished earlier ({done_path(herlev_models, herlev_save_loc)}), not run again")
    if start_stage == 1 and not herlev_done:
        resume_herlev = resume and checkpoint_path(herlev_models, herlev_save_loc).is_file()
        if resume and not resume_herlev:
            raise UserError(f"nothing to resume: the Herlev stage has no checkpoint "
                            f"{checkpoint_path(herlev_models, herlev_save_loc)} and did not finish — run again "
                            "without --resume")
        if not resume_herlev and not Path(previous_model_DA).is_file():
            raise UserError(f"previous_model_DA {previous_model_DA} does not exist — train R50.py on the "
                            "Extended DA dataset first and point previous_model_DA to its .pth")
        results["herlev"] = ttl_stage(replace(herlev, resume=resume_herlev), previous_model_DA)
    elif not herlev_weights.is_file():
        raise UserError(f"start_stage 2 needs the Herlev stage's weights {herlev_weights} — run stage 1 first")
    identity = {k: v for k, v in final.identity([]).items() if k != "classes"}
    if resume and "herlev" not in results and stage_finished(sipakmed_models, save_loc, identity):
        raise UserError(f"nothing to resume: both stages finished ({done_path(sipakmed_models, save_loc)}) — run "
                        "again without --resume to train anew")
    # A SIPaKMeD checkpoint continues only a run whose Herlev stage had finished before this one started.
    resume_sipakmed = resume and "herlev" not in results and checkpoint_path(sipakmed_models, save_loc).is_file()
    results["sipakmed"] = ttl_stage(replace(final, resume=resume_sipakmed), herlev_weights)
    return results
