"""The library under the Deep Cervical Cancer scripts: one job a module, imports running one way.

files, leaks, division, augment, figures → presize → launch → data → learner → predict → report.
"""
import warnings

# fastai 2.8 still calls torch.jit.script at import, which this torch announces as deprecated on every run.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
