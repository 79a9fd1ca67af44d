"""Headless Chromium for the tests that look at a page the way a user would (report.html, MLflow UI).

Debian's chromium runs as root in a container only with --no-sandbox; the other flags keep it from
reaching the network on its own (component updates, sync, QUIC) and from sharing a profile with
another test. A missing browser is a failure, not a skip: CI installs it (.ci/run). Set
SUNFISH_NO_BROWSER=1 to skip these tests on purpose.

png_is_blank reads the PNG with zlib only, so the check does not depend on Pillow being installed.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def chromium_binary() -> str:
    """Path of the browser; skips only when SUNFISH_NO_BROWSER=1, else fails naming the fix."""
    if os.environ.get("SUNFISH_NO_BROWSER") == "1":
        pytest.skip("SUNFISH_NO_BROWSER=1: browser tests skipped on request")
    for name in (os.environ.get("SUNFISH_CHROMIUM"), *CANDIDATES):
        if name and (found := shutil.which(name)):
            return found
    pytest.fail("chromium is not installed: apt-get install chromium (or set SUNFISH_NO_BROWSER=1 to skip)")


def _url(url_or_path: str | Path) -> str:
    text = str(url_or_path)
    if "://" in text:
        return text
    return Path(text).resolve().as_uri()


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="sunfish-chromium-") as profile:
        cmd = [chromium_binary(), *FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"chromium failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc


def screenshot(url_or_path: str | Path, png: str | Path, width: int = 1280, height: int = 2400,
               timeout: float = 120.0) -> Path:
    """A PNG of the page at ``width`` x ``height`` CSS pixels."""
    png = Path(png)
    _run([f"--screenshot={png}", f"--window-size={width},{height}", "--virtual-time-budget=5000",
          _url(url_or_path)], timeout)
    if not png.is_file() or png.stat().st_size == 0:
        raise AssertionError(f"chromium wrote no screenshot to {png}")
    return png


def dump_dom(url_or_path: str | Path, timeout: float = 120.0) -> str:
    """The page's DOM after load (scripts run), as HTML text."""
    return _run(["--dump-dom", "--virtual-time-budget=5000", _url(url_or_path)], timeout).stdout


def read_png(png: str | Path) -> tuple[int, int, int, list[bytes]]:
    """(width, height, bytes per pixel, rows of raw pixel bytes) of an 8-bit, non-interlaced PNG."""
    data = Path(png).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{png}: not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"{png}: unsupported PNG (depth {depth}, colour type {colour}, interlace {interlace})")
    raw, bpp, stride = zlib.decompress(idat), channels, width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


def pixels(png: str | Path):
    """The screenshot as a uint8 array (height, width, channels): Pillow when installed, else read_png."""
    import numpy as np

    try:
        from PIL import Image
    except ImportError:
        width, height, bpp, rows = read_png(png)
        return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(height, width, bpp)
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))


def png_stats(png: str | Path, step: int = 2) -> dict:
    """Grey-level variance, share of non-white pixels and distinct colours (every ``step``-th pixel)."""
    import numpy as np

    rgb = pixels(png)[::step, ::step, :3].astype(np.int32)
    grey = rgb.mean(axis=2)
    packed = (rgb[..., 0] << 16) | (rgb[..., min(1, rgb.shape[2] - 1)] << 8) | rgb[..., -1]
    return {"width": int(rgb.shape[1] * step), "height": int(rgb.shape[0] * step), "variance": float(grey.var()),
            "ink": float((grey < 250).mean()), "colours": int(np.unique(packed).size)}


def colour_share(png: str | Path, colour: str, tolerance: int = 40) -> float:
    """Share of pixels within ``tolerance`` (per channel) of ``colour`` ("#rrggbb"): plot lines are visible."""
    import numpy as np

    rgb = pixels(png)[..., :3].astype(np.int32)
    target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return float((np.abs(rgb - target).max(axis=2) <= tolerance).mean())


def png_is_blank(png: str | Path, min_variance: float = 25.0, min_ink: float = 0.005) -> bool:
    """True for an empty-looking screenshot: one flat colour, or almost no pixel that is not white."""
    stats = png_stats(png)
    return stats["variance"] < min_variance or stats["ink"] < min_ink or stats["colours"] < 3
