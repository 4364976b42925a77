"""A local web page for the person at the microscope: drop cell images (one, many or a folder) and see each
one's class, top-3 probabilities, abnormal flag (SIPaKMeD's classes) and Grad-CAM; mark a prediction wrong
and save the image under the right class in a corrections folder (a class-folder dataset that
implementation_DatasetDivision.py divides); download the batch's CSV and its report.

    python app.py --model-path data/sipakmed_formatted/models/resnet50_ttl_sipakmed.pth

It binds to 127.0.0.1. With --host set to another address, every request needs a token (printed in the
address, or given with --token). The page loads nothing from the network.
"""
from pathlib import Path

from fastcore.script import call_parse

from papsmear.files import check_positive, user_errors

# --- edit these -----------------------------------------------------------------------------------
model_path = Path("data/sipakmed_formatted/models/resnet50_ttl_sipakmed.pth")  # .pth (+ .json), .pkl or .onnx
corrections_dir = Path("corrections")  # corrected images go to <this>/<class>/, with corrections.csv
host = "127.0.0.1"     # the address to listen on; any other than this computer's needs a token
port = 8000
token = None           # the token requests must carry (default: none on 127.0.0.1, a new one otherwise)
max_file_mb = 25.0     # largest image file accepted
max_request_mb = 200.0  # largest upload in one request
max_files = 100        # most images in one request
max_pixels = 40_000_000  # most pixels (width x height) of one image
# ---------------------------------------------------------------------------------------------------


@call_parse
def main(model_path: Path = model_path,            # trained model: .pth with its .json, .pkl or .onnx
         corrections_dir: Path = corrections_dir,  # where corrected images and corrections.csv are saved
         host: str = host,                         # address to listen on (127.0.0.1: this computer only)
         port: int = port,                         # port to listen on
         token: str = token,                       # token every request must carry (default: new one off-localhost)
         max_file_mb: float = max_file_mb,         # largest image file, MB
         max_request_mb: float = max_request_mb,   # largest request, MB
         max_files: int = max_files,               # most images per request
         max_pixels: int = max_pixels):            # most pixels per image
    "Serve the web page for a trained Pap-smear classifier on this computer."
    with user_errors():
        check_positive(port=port, max_file_mb=max_file_mb, max_request_mb=max_request_mb, max_files=max_files,
                       max_pixels=max_pixels)
        import uvicorn  # after --help and the checks: the model loads only for real work

        from papsmear import webapp

        token = webapp.needs_token(host, token)
        limits = webapp.Limits(file_mb=max_file_mb, request_mb=max_request_mb, files=max_files, pixels=max_pixels)
        app = webapp.create_app(model_path, corrections_dir, token=token, limits=limits)
        address = f"http://{'[' + host + ']' if ':' in host else host}:{port}/" + (f"?token={token}" if token else "")
        print(f"Serving {model_path} at {address}  (Ctrl+C stops)", flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")
