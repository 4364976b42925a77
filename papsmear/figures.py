"""Figures: matplotlib without a screen, and one way to write a figure to a PNG file."""
import matplotlib

matplotlib.use("Agg")  # scripts run on headless machines; every figure goes to a PNG file
import matplotlib.pyplot as plt  # noqa: E402

from papsmear.files import atomic_output  # noqa: E402


def save_figure(fig, path, format="png", **options):
    """Write a figure to `path` as `format` (png, or jpeg with `pil_kwargs` such as its quality), through a
    temporary name so that a kill never leaves half a picture, and close it."""
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, format=format, **options)
    plt.close(fig)
    return path
