"""Generate synthetic Pap-smear images laid out exactly like the raw SIPaKMeD and Herlev downloads.

The real datasets cannot be shipped, so the demo and the tests run on cells drawn here. Each class is drawn
the way its real cells look (size, shape, stain, nucleus/cytoplasm ratio, halo), with stain, size, rotation
and noise varied per image so that no single pixel statistic gives the class away. Everything is
deterministic: the same seed gives byte-identical files.
"""
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from fastcore.script import call_parse
from PIL import Image, ImageDraw, ImageFilter

SIPAKMED_CLASSES = ("Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate")
HERLEV_CLASSES = ("carcinoma_in_situ", "light_dysplastic", "moderate_dysplastic", "normal_columnar",
                  "normal_intermediate", "normal_superficiel", "severe_dysplastic")
HERLEV_SUBFOLDER = "New database pictures"
BACKGROUND = (226, 222, 232)


@dataclass(frozen=True)
class CellStyle:
    "How one class of cell looks: sizes are fractions of the drawing radius, colours RGB."
    size: float                 # cytoplasm radius
    elongation: float           # long/short axis ratio of the cytoplasm
    vertices: int               # polygon corners (many = round)
    irregularity: float         # radial jitter of the outline
    cytoplasm: tuple            # one or more stain colours to choose from
    nucleus_ratio: float        # nucleus radius / cytoplasm radius
    nucleus: tuple              # nucleus colour
    nucleus_irregularity: float = 0.05
    nucleus_offset: float = 0.0  # 0 = central, towards 1 = basal (columnar cells)
    halo: bool = False          # clear perinuclear zone (koilocytes)
    two_nuclei: float = 0.0     # probability of a second nucleus
    border: int = 0             # width of a dark, well defined border
    clustered: bool = False     # cells drawn close together, overlapping


SIPAKMED_STYLES = {
    "Dyskeratotic": CellStyle(0.42, 1.3, 9, 0.12, ((226, 128, 64), (214, 112, 70)), 0.22, (38, 18, 24),
                              clustered=True),
    "Koilocytotic": CellStyle(0.72, 1.25, 7, 0.10, ((196, 170, 204), (176, 196, 214)), 0.32, (52, 30, 78),
                              nucleus_irregularity=0.15, halo=True, two_nuclei=0.3),
    "Metaplastic": CellStyle(0.58, 1.1, 24, 0.03, ((112, 146, 172), (150, 140, 178)), 0.30, (72, 52, 112),
                             border=2),
    "Parabasal": CellStyle(0.40, 1.05, 24, 0.02, ((76, 118, 186), (92, 108, 176)), 0.50, (48, 38, 104)),
    "Superficial-Intermediate": CellStyle(0.95, 1.2, 6, 0.18, ((236, 172, 192), (170, 204, 226)), 0.11,
                                          (58, 38, 86)),
}

HERLEV_STYLES = {
    "normal_superficiel": CellStyle(0.92, 1.2, 6, 0.15, ((236, 170, 190),), 0.10, (70, 44, 92)),
    "normal_intermediate": CellStyle(0.88, 1.2, 7, 0.12, ((168, 200, 226),), 0.15, (72, 56, 116)),
    "normal_columnar": CellStyle(0.50, 2.4, 14, 0.05, ((150, 170, 200),), 0.34, (64, 48, 110),
                                 nucleus_offset=0.55),
    "light_dysplastic": CellStyle(0.78, 1.2, 8, 0.10, ((176, 196, 220),), 0.30, (66, 46, 104),
                                  nucleus_irregularity=0.10),
    "moderate_dysplastic": CellStyle(0.68, 1.15, 10, 0.10, ((160, 176, 212),), 0.45, (54, 36, 92),
                                     nucleus_irregularity=0.18),
    "severe_dysplastic": CellStyle(0.56, 1.1, 12, 0.10, ((146, 160, 204),), 0.60, (42, 26, 76),
                                   nucleus_irregularity=0.26),
    "carcinoma_in_situ": CellStyle(0.46, 1.1, 14, 0.08, ((128, 146, 196),), 0.76, (30, 16, 58),
                                   nucleus_irregularity=0.34),
}


def _outline(rng, cx, cy, radius, elongation, vertices, irregularity, angle):
    "Points of an irregular polygon around (cx, cy): an ellipse of the given elongation, rotated by angle."
    theta = np.linspace(0, 2 * np.pi, max(vertices, 3), endpoint=False) + rng.uniform(0, 2 * np.pi)
    r = radius * (1 + rng.uniform(-irregularity, irregularity, theta.size))
    x, y = r * np.cos(theta) * elongation ** 0.5, r * np.sin(theta) / elongation ** 0.5
    ca, sa = np.cos(angle), np.sin(angle)
    return [(float(cx + ca * a - sa * b), float(cy + sa * a + ca * b)) for a, b in zip(x, y, strict=True)]


def _jitter(colour, factors):
    return tuple(int(np.clip(c * f, 0, 255)) for c, f in zip(colour, factors, strict=True))


def draw_cell(rng, draw, mask, cx, cy, radius, style, stain):
    """Draw one cell of `style` centred at (cx, cy) on `draw` (and its segmentation on `mask`, if any).

    Returns the cytoplasm and nucleus outlines, as lists of (x, y) points.
    """
    angle = rng.uniform(0, np.pi)
    cyt_radius = radius * style.size * rng.uniform(0.85, 1.15)
    cytoplasm = _outline(rng, cx, cy, cyt_radius, style.elongation, style.vertices, style.irregularity, angle)
    colour = style.cytoplasm[rng.integers(len(style.cytoplasm))]
    cyt_colour = _jitter(colour, stain * rng.uniform(0.93, 1.07, 3))
    border = _jitter(cyt_colour, (0.55, 0.55, 0.6)) if style.border else None
    draw.polygon(cytoplasm, fill=cyt_colour, outline=border, width=max(style.border, 1))
    # Columnar nuclei sit towards one end of the long axis.
    shift = style.nucleus_offset * cyt_radius * style.elongation ** 0.5
    nx, ny = cx + np.cos(angle) * shift, cy + np.sin(angle) * shift
    nuc_radius = cyt_radius * style.nucleus_ratio * rng.uniform(0.85, 1.15)
    if style.halo:
        halo = _outline(rng, nx, ny, nuc_radius * 1.9, 1.2, 12, 0.15, angle)
        draw.polygon(halo, fill=_jitter(BACKGROUND, stain * 0.98))
    centres = [(nx, ny)]
    if rng.random() < style.two_nuclei:
        centres = [(nx - nuc_radius * 0.7, ny), (nx + nuc_radius * 0.7, ny)]
    nuc_colour = _jitter(style.nucleus, stain * rng.uniform(0.85, 1.15, 3))
    nuclei = [_outline(rng, x, y, nuc_radius, 1.15, 16, style.nucleus_irregularity, angle) for x, y in centres]
    for nucleus in nuclei:
        draw.polygon(nucleus, fill=nuc_colour)
    if mask is not None:
        mask.polygon(cytoplasm, fill=(0, 0, 255))
        for nucleus in nuclei:
            mask.polygon(nucleus, fill=(255, 0, 0))
    return cytoplasm, nuclei[0]


def _finish(rng, image, noise):
    "Out-of-focus blur and sensor noise, as on a real microscope image."
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, noise, (image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _canvas(rng, width, height):
    "A light background whose stain differs a little from slide to slide; returns image and stain factors."
    stain = rng.uniform(0.88, 1.12, 3)
    return Image.new("RGB", (width, height), _jitter(BACKGROUND, stain)), stain


def _write_boundary(path, points):
    "SIPaKMeD .dat boundary file: one 'x,y' point per line."
    path.write_text("".join(f"{x:.2f},{y:.2f}\n" for x, y in points))


def _crop_box(points, width, height, margin=4):
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (max(int(min(xs)) - margin, 0), max(int(min(ys)) - margin, 0),
            min(int(max(xs)) + margin, width), min(int(max(ys)) + margin, height))


def generate_cluster_image(rng, style, width, height):
    """One SIPaKMeD-like cluster image: several cells of one class on a light background.

    Returns the image and, per cell, its (cytoplasm, nucleus) outlines.
    """
    image, stain = _canvas(rng, width, height)
    draw = ImageDraw.Draw(image)
    radius = min(width, height) / 4 * rng.uniform(0.85, 1.15)
    n_cells = int(rng.integers(3, 6))
    spread = 0.18 if style.clustered else 0.34
    centre = np.array([width, height]) * rng.uniform(0.4, 0.6, 2)
    cells = []
    for _ in range(n_cells):
        cx, cy = centre + rng.normal(0, spread, 2) * (width, height)
        cx, cy = np.clip(cx, radius, width - radius), np.clip(cy, radius, height - radius)
        cells.append(draw_cell(rng, draw, None, cx, cy, radius, style, stain))
    return _finish(rng, image, rng.uniform(3, 8)), cells


def generate_sipakmed(root, n_images=20, width=160, height=120, seed=0, classes=SIPAKMED_CLASSES):
    """Write a raw SIPaKMeD-shaped folder under `root` with `n_images` cluster images per class.

    Layout, as the real download: im_<Class>/im_<Class>/NNN.bmp, NNN_cyt0K.dat, NNN_nuc0K.dat and
    im_<Class>/im_<Class>/CROPPED/NNN_0K.bmp (one single-cell crop per cell). Returns `root`.
    """
    root = Path(root)
    for class_index, name in enumerate(classes):
        folder = root / f"im_{name}" / f"im_{name}"
        (folder / "CROPPED").mkdir(parents=True, exist_ok=True)
        for i in range(1, n_images + 1):
            rng = np.random.default_rng([seed, 1, class_index, i])
            image, cells = generate_cluster_image(rng, SIPAKMED_STYLES[name], width, height)
            image.save(folder / f"{i:03d}.bmp")
            for k, (cytoplasm, nucleus) in enumerate(cells, start=1):
                _write_boundary(folder / f"{i:03d}_cyt{k:02d}.dat", cytoplasm)
                _write_boundary(folder / f"{i:03d}_nuc{k:02d}.dat", nucleus)
                image.crop(_crop_box(cytoplasm, width, height)).save(folder / "CROPPED" / f"{i:03d}_{k:02d}.bmp")
    return root


def place_cells(rng, width, height, radii, tries=200):
    """Centres for cells of cytoplasm radii `radii` in a field, apart enough that no two cells overlap (drawn with
    their elongation), each inside the field; cells that find no room are left out (None)."""
    placed, centres = [], []
    for radius in radii:
        reach = radius * 1.3  # the longest half-axis of an elongated, jittered outline
        for _ in range(tries):
            x, y = rng.uniform(reach, width - reach), rng.uniform(reach, height - reach)
            if all(np.hypot(x - px, y - py) > reach + other for px, py, other in placed):
                placed.append((x, y, reach))
                centres.append((x, y))
                break
        else:
            centres.append(None)
    return centres


FIELD_NUCLEUS_RATIO = 0.25  # in a field, a nucleus is at most a quarter of its cell across, as in a smear


def field_style(kind):
    """The look of a class's cells in a field: its own, with one nucleus a cell (one boundary to find) and a
    cytoplasm at least four nucleus radii across, as squamous cells spread on a slide are."""
    style = SIPAKMED_STYLES[kind]
    return replace(style, two_nuclei=0.0, nucleus_ratio=min(style.nucleus_ratio, FIELD_NUCLEUS_RATIO))


def generate_field(rng, width=640, height=480, nucleus_diameter=24, n_cells=8, classes=SIPAKMED_CLASSES):
    """One smear field: cells of `classes` (drawn at random) on the glass, apart from each other, each drawn so
    that its nucleus is about `nucleus_diameter` pixels across (±20 %). Returns the image and, per cell, (class,
    cytoplasm outline, nucleus outline)."""
    image, stain = _canvas(rng, width, height)
    draw = ImageDraw.Draw(image)
    styles = [(kind, field_style(kind)) for kind in (classes[int(rng.integers(len(classes)))] for _ in range(n_cells))]
    radii = [nucleus_diameter / 2 / (style.size * style.nucleus_ratio) * rng.uniform(0.8, 1.2) for _, style in styles]
    extents = [r * style.size * 1.15 for (_, style), r in zip(styles, radii, strict=True)]  # jittered cytoplasm
    cells = []
    for (kind, style), radius, centre in zip(styles, radii, place_cells(rng, width, height, extents), strict=True):
        if centre is not None:
            cells.append((kind, *draw_cell(rng, draw, None, centre[0], centre[1], radius, style, stain)))
    return _finish(rng, image, rng.uniform(3, 8)), cells


def generate_fields(root, n_fields=4, width=640, height=480, nucleus_diameter=24, seed=0):
    """Write `n_fields` synthetic smear fields into `root` as field_NNN.png, each with SIPaKMeD-style boundaries
    beside it (field_NNN_cytKK.dat, field_NNN_nucKK.dat) and field_NNN_cells.csv (cell number, class). Returns
    `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, n_fields + 1):
        rng = np.random.default_rng([seed, 3, i])
        image, cells = generate_field(rng, width, height, nucleus_diameter, n_cells=int(rng.integers(5, 10)))
        image.save(root / f"field_{i:03d}.png")
        rows = ["cell,class"]
        for k, (kind, cytoplasm, nucleus) in enumerate(cells, start=1):
            _write_boundary(root / f"field_{i:03d}_cyt{k:02d}.dat", cytoplasm)
            _write_boundary(root / f"field_{i:03d}_nuc{k:02d}.dat", nucleus)
            rows.append(f"{k},{kind}")
        (root / f"field_{i:03d}_cells.csv").write_text("\n".join(rows) + "\n")
    return root


def generate_single_cell(rng, style, size):
    "One Herlev-like single-cell image and its segmentation mask (background black, cytoplasm blue, nucleus red)."
    side = int(size * rng.uniform(0.8, 1.2))
    image, stain = _canvas(rng, side, side)
    mask = Image.new("RGB", (side, side), (0, 0, 0))
    draw_cell(rng, ImageDraw.Draw(image), ImageDraw.Draw(mask), side / 2, side / 2, side / 2, style, stain)
    return _finish(rng, image, rng.uniform(3, 8)), mask


def generate_herlev(root, n_images=15, size=80, seed=0, classes=HERLEV_CLASSES):
    """Write a raw Herlev-shaped folder under `root` with `n_images` single-cell images per class (an int), or
    per named class (a dict: class → images, for imbalanced data).

    Layout, as the real smear2005 download: New database pictures/<class>/<id>.BMP, each with its
    segmentation mask <id>-d.bmp beside it (a mask is not a sample). Returns `root`.
    """
    root = Path(root)
    for class_index, name in enumerate(classes):
        folder = root / HERLEV_SUBFOLDER / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, (n_images[name] if isinstance(n_images, dict) else n_images) + 1):
            rng = np.random.default_rng([seed, 2, class_index, i])
            image, mask = generate_single_cell(rng, HERLEV_STYLES[name], size)
            stem = f"{rng.integers(10**8, 10**9)}-{rng.integers(10**8, 10**9)}-{i:03d}"
            image.save(folder / f"{stem}.BMP", format="BMP")
            mask.save(folder / f"{stem}-d.bmp")
    return root


@call_parse
def main(out: Path = Path("demo_data"),  # folder that receives sipakmed/ and herlev/
         n_sipakmed: int = 20,            # cluster images per SIPaKMeD class
         n_herlev: int = 15,              # single-cell images per Herlev class
         width: int = 160,                # cluster image width in pixels (the real ones are 2048)
         height: int = 120,               # cluster image height in pixels (the real ones are 1536)
         cell_size: int = 80,             # Herlev cell image side in pixels (varies by +-20%)
         n_fields: int = 0,               # smear fields (640x480, nuclei about 24 pixels) with their boundaries
         seed: int = 0):                  # same seed, byte-identical files
    "Generate synthetic raw SIPaKMeD and Herlev folders (and smear fields) for the demo and the tests."
    generate_sipakmed(out / "sipakmed", n_sipakmed, width, height, seed)
    generate_herlev(out / "herlev", n_herlev, cell_size, seed)
    print(f"Synthetic SIPaKMeD in {out / 'sipakmed'}, Herlev in {out / 'herlev' / HERLEV_SUBFOLDER}")
    if n_fields:
        generate_fields(out / "fields", n_fields=n_fields, seed=seed)
        print(f"Synthetic smear fields in {out / 'fields'}")
