"""Screening: which classes are abnormal, p(abnormal), and the operating point (a threshold on p(abnormal)).

One definition serves the evaluation report, the predictions CSVs, the web page and the field reports. Known
class sets are grouped as their datasets' papers group them; any other class set is grouped by the abnormal (or
the normal) classes a user names, stored with the model. Nothing here imports torch; scikit-learn is imported
only where a threshold is chosen.
"""
import math

import numpy as np

from papsmear.files import UserError

# The grouping of SIPaKMeD's classes in its own paper (Plissiti et al., ICIP 2018, section 2): superficial-
# intermediate and parabasal cells are normal, koilocytotic and dyskeratotic cells abnormal, metaplastic
# cells benign. Screening asks "abnormal or not", so benign cells count with the normal ones as negatives.
SIPAKMED_GROUPS = {"Dyskeratotic": "abnormal", "Koilocytotic": "abnormal", "Metaplastic": "benign",
                   "Parabasal": "normal", "Superficial-Intermediate": "normal"}
# Herlev (Jantzen et al., NiSIS 2005): the three normal_* classes are normal; the dysplastic classes and
# carcinoma in situ are abnormal. The download spells one folder normal_superficiel, copies of it often
# normal_superficial: both are Herlev's.
HERLEV_NORMAL = ("normal_columnar", "normal_intermediate", "normal_superficiel")
HERLEV_ABNORMAL = ("light_dysplastic", "moderate_dysplastic", "severe_dysplastic", "carcinoma_in_situ")
HERLEV_SPELLINGS = {"normal_superficial": "normal_superficiel"}

ARGMAX_RULE = "the most probable class is abnormal"


def known_abnormal(classes):
    "The abnormal classes of a known class set (SIPaKMeD, Herlev), in the model's order; None for any other."
    if sorted(classes) == sorted(SIPAKMED_GROUPS):
        return [c for c in classes if SIPAKMED_GROUPS[c] == "abnormal"]
    herlev = [HERLEV_SPELLINGS.get(c, c) for c in classes]
    if sorted(herlev) == sorted(HERLEV_NORMAL + HERLEV_ABNORMAL):
        return [c for c, name in zip(classes, herlev, strict=True) if name in HERLEV_ABNORMAL]
    return None


def unknown_class_error(names, classes, option):
    "The error for class names that are not classes of the model, listing the model's classes."
    return UserError(f"{option} names {', '.join(map(repr, names))}, which {'is' if len(names) == 1 else 'are'} not "
                     f"a class of the model; its classes are: {', '.join(map(repr, classes))}")


def abnormal_classes(classes, abnormal=None, normal=None):
    """The abnormal classes of a model with `classes`: those named in `abnormal`, or all but those named in
    `normal` (whichever is shorter to type), else the known grouping of the class set, else None (no grouping
    known: screening figures are left out). A name that is not a class is refused, listing the classes."""
    if abnormal and normal:
        raise UserError("give abnormal_classes or normal_classes, not both — the other group is the rest")
    named, option = (abnormal, "abnormal_classes") if abnormal else (normal, "normal_classes")
    if not named:
        return known_abnormal(classes)
    unknown = [name for name in named if name not in classes]
    if unknown:
        raise unknown_class_error(unknown, classes, option)
    chosen = [c for c in classes if (c in named) == (option == "abnormal_classes")]
    if not chosen or len(chosen) == len(classes):
        raise UserError(f"{option} {', '.join(named)} leaves {'no' if not chosen else 'every'} class abnormal — "
                        "screening needs abnormal classes and others")
    return chosen


def check_abnormal(abnormal, classes, where):
    "Refuse a stored list of abnormal classes that is not a proper part of the model's classes."
    if abnormal is None:
        return None
    if not isinstance(abnormal, list) or not abnormal or len(abnormal) >= len(classes) or \
            any(name not in classes for name in abnormal):
        raise UserError(f"{where} stores abnormal classes {abnormal!r} that are not a part of its classes "
                        f"{classes} — set them again with operating_point.py or --abnormal-classes")
    return abnormal


def abnormal_mask(classes, abnormal):
    "A boolean array over `classes`: True for the abnormal ones."
    return np.array([c in abnormal for c in classes])


def abnormal_probability(probabilities, classes, abnormal):
    "p(abnormal) of each row of class probabilities: the sum over the abnormal classes."
    return np.asarray(probabilities)[:, abnormal_mask(classes, abnormal)].sum(1)


def called_abnormal(probabilities, classes, abnormal, operating_point=None):
    """Whether each cell is flagged abnormal: p(abnormal) at or above the stored threshold when the model has an
    operating point, otherwise when its most probable class is abnormal."""
    probabilities = np.asarray(probabilities)
    if operating_point:
        return abnormal_probability(probabilities, classes, abnormal) >= operating_point["threshold"]
    return abnormal_mask(classes, abnormal)[probabilities.argmax(1)]


def rule_text(operating_point):
    "The flagging rule in words, for CSVs, reports and the page."
    if not operating_point:
        return ARGMAX_RULE
    return (f"p(abnormal) ≥ {operating_point['threshold']:.4f} (the threshold that reached "
            f"{operating_point['target_sensitivity']:.0%} sensitivity on {operating_point['chosen_on']})")


def check_target_sensitivity(target_sensitivity):
    "Refuse a target sensitivity outside (0, 1]."
    if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
        raise UserError(f"target_sensitivity is {target_sensitivity}; it must lie in (0, 1], e.g. 0.95 — set "
                        "--target-sensitivity")


def choose_operating_point(truth_abnormal, scores, target_sensitivity, chosen_on):
    """The operating point reaching `target_sensitivity` on labelled cells: the highest threshold on p(abnormal)
    (`scores`) at which that share of the abnormal cells (`truth_abnormal`) is flagged, so that as few others
    as possible are (scikit-learn's ROC curve gives every candidate). Refused when the cells hold no abnormal
    cell or no other cell."""
    from sklearn.metrics import roc_curve

    truth_abnormal, scores = np.asarray(truth_abnormal, bool), np.asarray(scores, float)
    if truth_abnormal.all() or not truth_abnormal.any():
        raise UserError(f"{chosen_on} holds {'no abnormal cell' if not truth_abnormal.any() else 'only abnormal cells'}"
                        " — an operating point needs abnormal and other labelled cells; name another folder")
    false_positive_rate, sensitivity, thresholds = roc_curve(truth_abnormal, scores, drop_intermediate=False)
    reached = int(np.flatnonzero(sensitivity >= target_sensitivity - 1e-12)[0])
    threshold = float(min(thresholds[reached], 1.0))
    return dict(threshold=threshold, target_sensitivity=float(target_sensitivity), chosen_on=str(chosen_on),
                sensitivity=float(sensitivity[reached]), specificity=float(1 - false_positive_rate[reached]),
                abnormal_cells=int(truth_abnormal.sum()), other_cells=int((~truth_abnormal).sum()))


def check_operating_point(operating_point, where):
    "Refuse a stored operating point that is not one `choose_operating_point` makes."
    if operating_point is None:
        return None
    try:
        usable = 0 <= float(operating_point["threshold"]) <= 1 and 0 < float(operating_point["target_sensitivity"]) <= 1
        usable = usable and math.isfinite(float(operating_point["threshold"]))
        str(operating_point["chosen_on"])
    except (KeyError, TypeError, ValueError):
        usable = False
    if not usable:
        raise UserError(f"{where} stores an operating point that is not a threshold in [0, 1] with its target "
                        "sensitivity — set it again with operating_point.py")
    return operating_point
