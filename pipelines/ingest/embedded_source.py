"""The embedded data source: LAION-like metadata plus a loopback HTTP server that serves its images.

The metadata has the real LAION-Aesthetic V2 schema, and its URLs point at the server, which renders
procedural images (infgen.substitutes.synthetic) at the advertised sizes. A configurable share of rows
misbehaves the
ways real LAION rows do, so the ingest stage meets every failure path without the internet:

    ok          the advertised size, a valid JPEG
    small       honest metadata below the pixel threshold (filtered before download)
    lie         metadata claims > 2 MP, the image is much smaller (caught by verification)
    missing     HTTP 404
    truncated   a JPEG cut off half way
    corrupt     bytes that are not an image
    slow        answers after `slow_seconds` (longer than the downloader's timeout in tests)
    redirect    302 to an `ok` image
    bounce      302 to the cloud metadata address (refused by the guard where the connection is made)
    duplicate   the URL of an earlier ok row again
    bad_url     not an http(s) URL
    private     an http URL on a private address (refused by the address guard; never requested)
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
from PIL import Image

from infgen.substitutes.synthetic import make_image

KINDS = (
    "ok",
    "small",
    "lie",
    "missing",
    "truncated",
    "corrupt",
    "slow",
    "redirect",
    "bounce",
    "duplicate",
    "bad_url",
    "private",
)
LIE_SIDE = 640  # what a lying row really serves: well under 2 MP
RENDER_SIDE = 512
RENDER_CACHE = 1024  # rendered JPEGs kept (≤ ~0.5 GB at 2–3 MP): reruns and benchmarks serve from memory


@dataclass(frozen=True)
class SourceMix:
    """Share of each kind of row; the rest are `ok`."""

    small: float = 0.1
    lie: float = 0.05
    missing: float = 0.05
    truncated: float = 0.03
    corrupt: float = 0.03
    slow: float = 0.02
    redirect: float = 0.04
    bounce: float = 0.02
    duplicate: float = 0.04
    bad_url: float = 0.02
    private: float = 0.02


def row_kinds(count: int, mix: SourceMix, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    names = [name for name in KINDS if name != "ok"]
    shares = np.array([getattr(mix, name) for name in names])
    if shares.sum() >= 1:
        raise ValueError(f"SourceMix shares add up to {shares.sum():.2f}; they must leave room for ok rows")
    return rng.choice(["ok", *names], size=count, p=[1 - shares.sum(), *shares])


def make_metadata(count: int, base_url: str, seed: int = 0, mix: SourceMix | None = None) -> pd.DataFrame:
    """`count` rows with the LAION-Aesthetic V2 columns; URLs on `base_url` (e.g. http://127.0.0.1:PORT)."""
    mix = mix or SourceMix()
    rng = np.random.default_rng(seed + 1)
    kinds = row_kinds(count, mix, seed)
    rows, originals = [], []
    for index, kind in enumerate(kinds):
        # > 2 MP sizes with varied aspect ratios; small rows are honest sub-threshold sizes
        if kind == "small":
            width, height = int(rng.integers(400, 1200)), int(rng.integers(400, 1200))
        else:
            short = int(rng.integers(1300, 1700))
            long = int(rng.integers(max(short, 2_000_000 // short + 1), 2 * short))  # over 2 MP
            width, height = (long, short) if rng.random() < 0.6 else (short, long)
        image_seed = seed * 1_000_003 + index
        path = f"{image_seed}_{width}x{height}.jpg"
        if kind == "duplicate" and originals:
            # A repeat of a good row, as LAION repeats popular images: only deduplication can catch it.
            url = originals[int(rng.integers(0, len(originals)))]
        elif kind == "bad_url":
            url = f"ftp://example.invalid/{path}" if index % 2 else ""
        elif kind == "private":
            url = f"http://10.{index % 256}.0.1/{path}"
        else:
            route = "img" if kind in ("ok", "small", "duplicate") else kind
            url = f"{base_url}/{route}/{path}"
            if kind == "ok":
                originals.append(url)
        rows.append(
            {
                "URL": url,
                "TEXT": f"synthetic scene {image_seed}",
                "WIDTH": float(width),
                "HEIGHT": float(height),
                "similarity": float(rng.uniform(0.25, 0.4)),
                "punsafe": float(rng.uniform(0, 0.2)),
                "pwatermark": float(rng.uniform(0, 0.4)),
                "AESTHETIC_SCORE": float(rng.uniform(5.5, 7.5)),
                "hash": int(rng.integers(-(2**62), 2**62)),
            }
        )
    frame = pd.DataFrame(rows)
    frame["__index_level_0__"] = np.arange(count, dtype=np.int64)
    frame.attrs["kinds"] = list(kinds)
    return frame


@lru_cache(maxsize=RENDER_CACHE)
def _jpeg(seed: int, width: int, height: int) -> bytes:
    # Render at most RENDER_SIDE px and upscale: 10× cheaper at 2–3 MP, and the test server shares the CPU.
    scale = min(1.0, RENDER_SIDE / max(width, height))
    small = make_image(seed, max(8, round(height * scale)), max(8, round(width * scale)))
    buffer = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: EmbeddedImageServer

    def log_message(self, *args):  # keep test output clean; errors still surface as failed rows
        pass

    def do_GET(self):
        try:
            _, route, name = self.path.split("/", 2)
            seed_text, size_text = name.removesuffix(".jpg").split("_")
            width, height = (int(v) for v in size_text.split("x"))
            seed = int(seed_text)
        except ValueError:
            return self._reply(404, b"not found", "text/plain")
        if route == "missing":
            return self._reply(404, b"not found", "text/plain")
        if route == "redirect":
            self.send_response(302)
            self.send_header("Location", f"/img/{name}")
            self.end_headers()
            return None
        if route == "bounce":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/iam/security-credentials/")
            self.end_headers()
            return None
        if route == "corrupt":
            return self._reply(200, b"this is not a jpeg " * 64, "image/jpeg")
        if route == "slow":
            time.sleep(self.server.slow_seconds)  # the behaviour under test, not synchronisation
        if route == "lie":
            width, height = LIE_SIDE, LIE_SIDE * height // width
        body = _jpeg(seed, width, height)
        if route == "truncated":
            body = body[: len(body) // 2]
        return self._reply(200, body, "image/jpeg")

    def _reply(self, status: int, body: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout on a slow row): expected


class EmbeddedImageServer(ThreadingHTTPServer):
    """Serves the embedded source on 127.0.0.1 only. Use as a context manager; `base_url` once started."""

    daemon_threads = True

    def __init__(self, port: int = 0, slow_seconds: float = 3.0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.slow_seconds = slow_seconds
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> EmbeddedImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
