"""Screen smear fields: find every cell's nucleus in each field, classify every cell with a trained model, and show
the most suspicious cells first.

path_dir may be one field image, a folder of them, or a folder tree (patient/slide/field); any size, RGB or
grayscale, any format Pillow reads. Each cell is the square of 5 nucleus diameters around its nucleus, classified
by the model as any cell image (.pkl, .pth + .json, or .onnx, INT8 included). Reports go to output_dir:
cells.csv (a row per cell: field, position, box, nucleus area, class, probabilities, abnormal flag), fields.csv
(per field and per folder: cells, cells per class, abnormal cells, highest p(abnormal)), overlays/<field>.png and
report.html, one page that holds them all. Under `accelerate launch` the fields are shared between the processes.
"""
from pathlib import Path

from fastcore.script import call_parse

from papsmear.files import one_line_usage_errors, user_errors

# --- edit these -----------------------------------------------------------------------------------
model_path = Path("data/sipakmed_formatted/models/resnet50_ttl_sipakmed.pth")  # .pth (+ .json), .pkl or .onnx
path_dir = Path("data/fields")  # a field image, a folder of them, or a folder tree (patient/slide/field)
output_dir = None        # where reports go (default: <model folder>/<model name>_fields)
nucleus_diameter = None  # a typical nucleus in pixels (default: SIPaKMeD's scale, 40 pixels; README)
pixel_size_um = None     # or: micrometres per pixel (a typical nucleus being 8 micrometres)
batch_size = 16          # cells per prediction batch
top = 24                 # cells in the report's "most suspicious" gallery
# ---------------------------------------------------------------------------------------------------

one_line_usage_errors()


@call_parse
def main(model_path: Path = model_path,              # trained model: .pth with its .json, .pkl or .onnx
         path_dir: Path = path_dir,                  # a field image, a folder, or a folder tree of fields
         output_dir: Path = output_dir,              # reports folder (default: <model folder>/<model name>_fields)
         nucleus_diameter: float = nucleus_diameter,  # typical nucleus diameter, pixels (default: SIPaKMeD's, 40)
         pixel_size_um: float = pixel_size_um,       # or the pixel size, micrometres (nucleus of 8 micrometres)
         batch_size: int = batch_size,               # cells per prediction batch
         top: int = top):                            # most suspicious cells shown in the report
    "Find and classify every cell of smear fields; write the per-cell and per-field tables, overlays and report."
    with user_errors():
        from papsmear import fields  # after --help: torch loads only for real work

        result = fields.evaluate_fields(model_path, path_dir, output_dir=output_dir,
                                        nucleus_diameter=nucleus_diameter, pixel_size_um=pixel_size_um,
                                        batch_size=batch_size, top=top)
        if result["report"] is None:  # another process under a launcher: process 0 reports
            return
        print(result["fields"].to_string(index=False))
        for problem in result["skipped"]:
            print(f"skipped unreadable field {problem}")
        empty = result["fields"].query("level == 'field' and cells == 0")["path"].tolist()
        if empty:
            print(f"no cell found in {len(empty)} field(s), e.g. {empty[0]} — if they hold cells, check the scale "
                  "(--nucleus-diameter)")
        record = result["record"]
        if record.abnormal_classes:
            flagged = int(result["cells"]["abnormal"].sum()) if len(result["cells"]) else 0
            print(f"abnormal ({', '.join(record.abnormal_classes)}): {flagged} of {len(result['cells'])} cells, "
                  f"flagged when {result['cells']['abnormal_rule'].iloc[0] if len(result['cells']) else 'n/a'}")
        print(f"\n{len(result['cells'])} cells in {int((result['fields']['level'] == 'field').sum())} field(s), "
              f"{len(result['skipped'])} skipped; a typical nucleus {result['nucleus_diameter']:.1f} pixels; "
              f"reports in {result['output_dir']}\nreport: {result['report']}")
        if result["skipped"]:
            raise SystemExit(1)
