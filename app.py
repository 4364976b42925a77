"""A local web page for the person at the microscope: drop cell images (one, many or a folder) and see each
one's class, top-3 probabilities, abnormal flag and Grad-CAM; mark a prediction wrong and save the image under
the right class in a corrections folder (a class-folder dataset that implementation_DatasetDivision.py
divides); download the batch's CSV and its report. An image larger than a cell (or any image, by the page's
toggle) is screened as a field: its nuclei are found, its cells cut out and each shown as a card, beside the
field's overlay.

    python app.py --model-path data/sipakmed_formatted/models/resnet50_ttl_sipakmed.pth

It binds to 127.0.0.1. With --host set to another address, every request needs a token (printed in the
address, or given with --token). The page loads nothing from the network. The options, the address, the port
and the corrections folder are checked before the model loads; uploads are kept in a temporary folder that
goes with the server.
"""
import re
from pathlib import Path

from fastcore.script import call_parse

from papsmear.files import UserError, check_positive, one_line_usage_errors, user_errors

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
keep_uploads = 2000    # uploads kept for corrections and reports (the oldest are forgotten first)
keep_minutes = 240.0   # minutes an upload is kept
nucleus_diameter = 40.0  # fields (images larger than a cell): a typical nucleus in pixels (SIPaKMeD's scale)
# ---------------------------------------------------------------------------------------------------

one_line_usage_errors()


def listening_socket(host, port):
    """A socket bound to (host, port), made before the model loads, so that an address that does not resolve or
    a port in use is refused at once (exit 2), not after the model has loaded."""
    import socket

    if not 1 <= port <= 65535:
        raise UserError(f"port is {port}; it must be between 1 and 65535 — set --port")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"host {host!r} is not an address of this computer ({e}) — set --host to 127.0.0.1, or to "
                        "an address of one of its network interfaces") from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as e:
        listener.close()
        raise UserError(f"cannot listen on {host} port {port} ({e.strerror}) — is another server using it? Choose "
                        "another --port, or --host") from None
    listener.listen(128)
    return listener


@call_parse
def main(model_path: Path = model_path,            # trained model: .pth with its .json, .pkl or .onnx
         corrections_dir: Path = corrections_dir,  # where corrected images and corrections.csv are saved
         host: str = host,                         # address to listen on (127.0.0.1: this computer only)
         port: int = port,                         # port to listen on (1-65535)
         token: str = token,                       # token every request must carry (default: new one off-localhost)
         max_file_mb: float = max_file_mb,         # largest image file, MB
         max_request_mb: float = max_request_mb,   # largest request, MB (counted on the bytes received)
         max_files: int = max_files,               # most images per request
         max_pixels: int = max_pixels,             # most pixels per image
         keep_uploads: int = keep_uploads,         # uploads kept for corrections and reports
         keep_minutes: float = keep_minutes,       # minutes an upload is kept
         nucleus_diameter: float = nucleus_diameter):  # fields: a typical nucleus, pixels (SIPaKMeD's: 40)
    "Serve the web page for a trained Pap-smear classifier on this computer."
    with user_errors():
        from papsmear.nuclei import check_diameter  # scipy: after --help, which answers without it

        check_positive(max_file_mb=max_file_mb, max_request_mb=max_request_mb, max_files=max_files,
                       max_pixels=max_pixels, keep_uploads=keep_uploads, keep_minutes=keep_minutes)
        check_diameter(nucleus_diameter, options="--nucleus-diameter (pixels)")
        if token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{8,200}", token):
            raise UserError("token must be 8 to 200 letters, digits or . _ ~ - (it travels in addresses and "
                            "cookies) — choose another, or leave it out for a new one")
        if not Path(model_path).is_file():
            raise UserError(f"model_path {model_path} does not exist — train with R50.py or R50Herlev.py first")
        listener = listening_socket(host, port)
        import uvicorn  # after --help and the checks: the model loads only for real work

        from papsmear import webapp

        corrections = webapp.checked_corrections_dir(corrections_dir)
        token = webapp.needs_token(host, token)
        limits = webapp.Limits(file_mb=max_file_mb, request_mb=max_request_mb, files=max_files, pixels=max_pixels,
                               keep_uploads=keep_uploads, keep_minutes=keep_minutes)
        app = webapp.create_app(model_path, corrections, token=token, limits=limits, host=host,
                                nucleus_diameter=nucleus_diameter)
        address = f"http://{'[' + host + ']' if ':' in host else host}:{port}/" + (f"?token={token}" if token else "")
        print(f"Serving {model_path} at {address}  (Ctrl+C stops)", flush=True)
        try:
            uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
        finally:
            app.state.session.close()
