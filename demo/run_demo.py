"""The whole procedure on synthetic demo data, with settings small enough for a 2-core CPU in minutes:
generate raw SIPaKMeD + Herlev (and smear fields) → divide → Extended DA → R50 → Triple Transfer Learning →
inference → every cell of the smear fields, with the nucleus detection scored against the generator's own
boundaries.

Each step runs the project's script from the command line, exactly as a user would (the commands are
printed), so the demo doubles as a worked example.
"""
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fastcore.script import call_parse

ROOT = Path(__file__).resolve().parent.parent


def run_step(title, script, **options):
    """Run one project script with `options` as its command-line flags, from the working directory and with
    paths as given (relative ones stay relative, as a user types them); stop the demo if it fails."""
    command = [sys.executable, os.path.relpath(ROOT / script)]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-').lower()}"
        if value is True:
            command.append(flag)
        elif value is False:
            command.append(flag.replace("--", "--no-", 1))
        else:
            command += [flag, str(value)]
    print(f"\n=== {title}\n$ {shlex.join([Path(command[0]).name, *command[1:]])}", flush=True)
    start = time.perf_counter()
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"demo stopped: {script} failed (see above)")
    print(f"--- {title}: {time.perf_counter() - start:.0f} s", flush=True)


@call_parse
def main(out: Path = Path("demo_output"),  # everything the demo makes goes here
         n_sipakmed: int = 20,             # synthetic cluster images per SIPaKMeD class
         n_herlev: int = 15,               # synthetic single-cell images per Herlev class
         image_size: int = 64,             # training image side (224 on real data)
         epochs: int = 4,                  # R50 epochs on Extended DA (50 on real data)
         ttl_epochs: int = 10,             # epochs of each TTL stage (10 Herlev / 50 SIPaKMeD on real data)
         lr: float = 0.01,                 # R50 from random weights takes a higher rate than the usual 0.001
         ttl_lr: float = 0.001,            # TTL stages fine-tune trained weights: the usual rate
         n_fields: int = 3,                # synthetic smear fields screened cell by cell
         seed: int = 0):                   # demo data seed
    "Run the whole Deep Cervical Cancer procedure on synthetic Pap-smear data."
    raw, sipakmed, herlev, extended = out / "raw", out / "sipakmed", out / "herlev", out / "sipakmed_extended"
    run_step("1. synthetic raw datasets", "demo/synthetic_papsmear.py", out=raw, n_sipakmed=n_sipakmed,
             n_herlev=n_herlev, n_fields=n_fields, seed=seed)
    run_step("2a. divide SIPaKMeD 60/20/20", "implementation_DatasetDivision.py", path_dir=raw / "sipakmed",
             output_dir=sipakmed)
    run_step("2b. divide Herlev 60/20/20", "implementation_DatasetDivision.py", path_dir=raw / "herlev",
             output_dir=herlev)
    run_step("3. Extended DA (14 augmentations per training image)", "implementation_DataAugmentation_Extension.py",
             target_directory=sipakmed, output_directory=extended)
    run_step("4. R50 on Extended DA", "R50.py", path_folder=extended, epochs=epochs, batch_size=16, lr=lr,
             image_size=image_size, pretrained=False)
    run_step("5. Triple Transfer Learning: Herlev, then SIPaKMeD", "R50Herlev.py",
             previous_model_DA=extended / "models" / "resnet50.pth", herlev_path=herlev, sipakmed_path=sipakmed,
             herlev_epochs=ttl_epochs, epochs=ttl_epochs, lr=ttl_lr, image_size=image_size)
    run_step("6. inference on the SIPaKMeD test split", "Inference_FastAI.py",
             model_path=sipakmed / "models" / "resnet50_ttl_sipakmed.pkl", test_dataset_path=sipakmed / "test")
    final = sipakmed / "models" / "resnet50_ttl_sipakmed.pth"
    run_step("7. every cell of the smear fields", "Inference_Fields.py", model_path=final, path_dir=raw / "fields",
             nucleus_diameter=24)
    run_step("8. nucleus detection against the generator's boundaries", "benchmarks/detection.py",
             fields=raw / "fields", nucleus_diameter=24)
    print(f"\nDone. Everything is under {out}; open the evaluation report "
          f"{sipakmed / 'models' / 'resnet50_ttl_sipakmed_inference' / 'report.html'} and the fields' report "
          f"{sipakmed / 'models' / 'resnet50_ttl_sipakmed_fields' / 'report.html'} in a browser")
