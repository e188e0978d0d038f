"""The page at / in headless Chromium: it loads the model, generates one image through its form (streaming, with
the progress bar) and shows it, pixel for pixel the API's PNG of the same class and seed.

Chromium is required (Debian's `chromium`; `.ci/run` installs it): without it this test fails, naming the fix.
The session's server asks for a bearer token, which a page loaded by URL cannot send, so Chromium talks to it
through a loopback forwarder that adds the token (`TokenForwarder`).
"""
from __future__ import annotations

import http.client
import io
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from tests.d2c_export.serve.conftest import CLASS_NAMES

SCALE = 16  # the page draws the 16 px image at 256 px, nearest neighbour (image-rendering: pixelated)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class TokenForwarder:
    """A loopback HTTP server that forwards every request to `url` with `Authorization: Bearer <token>` added."""

    def __init__(self, url: str, token: str):
        target = urlsplit(url)

        class Forward(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
                try:
                    upstream.request(self.command, self.path, body=body,
                                     headers={**headers, "Authorization": f"Bearer {token}"})
                    reply = upstream.getresponse()
                    data = reply.read()
                finally:
                    upstream.close()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

            def log_message(self, *args) -> None:  # quiet
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "TokenForwarder":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def chromium() -> str:
    """The Chromium binary; a missing one fails the test (it is required, in CI too)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "the page test needs Chromium: install it (`apt-get install -y chromium` on Debian, as .ci/run does)"
    return found


def screenshot(url: str, path) -> np.ndarray:
    """`url` rendered by headless Chromium, once its scripts and requests are done (at most 60 s of virtual time)."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--force-device-scale-factor=1", "--window-size=800,900", "--virtual-time-budget=60000",
               f"--screenshot={path}", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and path.exists(), done.stderr[-2000:]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def find_scaled(shot: np.ndarray, image: np.ndarray, scale: int) -> tuple[int, int] | None:
    """Where `image` appears in `shot` drawn `scale` times larger: the top-left corner whose every block centre
    matches its pixel (within 2 of 255), or None."""
    size_y, size_x = image.shape[0] * scale, image.shape[1] * scale
    centre = scale // 2
    close = np.abs(shot - image[0, 0]).max(axis=-1) <= 2  # candidates: the first block's centre matches
    for y, x in zip(*np.nonzero(close)):
        top, left = y - centre, x - centre
        if top < 0 or left < 0 or top + size_y > shot.shape[0] or left + size_x > shot.shape[1]:
            continue
        centres = shot[top + centre:top + size_y:scale, left + centre:left + size_x:scale]
        if np.abs(centres - image).max() <= 2:
            return int(top), int(left)
    return None


def test_the_page_generates_and_shows_the_image_in_a_browser(served, tmp_path):
    status, raw, headers = served.request("POST", "/v1/images", {"class": 3, "seed": 7, "format": "png"})
    assert status == 200 and headers["content-type"] == "image/png"
    expected = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int16)
    blank = screenshot("data:text/html,<body></body>", tmp_path / "blank.png")
    assert find_scaled(blank, expected, SCALE) is None  # the search finds nothing where the image is not
    with TokenForwarder(served.url, served.token) as forwarder:
        shot = screenshot(f"{forwarder.url}/?class=3&seed=7", tmp_path / "page.png")
    assert find_scaled(shot, expected, SCALE) is not None, f"the image is not on the page: see {tmp_path / 'page.png'}"


def test_the_page_before_any_image_names_the_classes_and_shows_no_image(served):
    with TokenForwarder(served.url, served.token) as forwarder:
        command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000",
                   "--dump-dom", f"{forwarder.url}/"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert "d2c-tiny: 10 classes" in dom  # the model was loaded
    assert all(f'<option value="{c}">{c}: {name}</option>' in dom for c, name in enumerate(CLASS_NAMES))  # by name
    image = dom[dom.index('<img id="image"'):]
    assert " hidden" in image[:image.index(">")]  # no empty (broken-image) frame before the first image


def test_the_page_has_an_icon_without_a_token(served):
    status, raw, headers = served.request("GET", "/favicon.ico", token=None)
    assert status == 200 and headers["content-type"].startswith("image/svg+xml") and raw.startswith(b"<svg")
    status, page, _ = served.request("GET", "/", token=None)
    assert b'rel="icon" href="/favicon.ico"' in page
