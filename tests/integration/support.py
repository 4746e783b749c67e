"""Helpers the integration tests share: read a self-contained page's images, check PNGs, render a page in headless
Chromium to count the images it decoded (run, diagnose and study reports); and a free local port (torchrun
rendezvous, a generation server, an address nothing listens on).

The browser check needs Debian's `chromium` (`apt-get install chromium`; .ci/run installs it). Without it a test
fails and says so, unless POSTTRAIN_SKIP_BROWSER=1 is set."""

import base64
import io
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from PIL import Image

# Appended to a copy of the page (the reports have no script): once the page has loaded, it writes how many
# images decoded (naturalWidth > 0) out of how many there are onto <html>, where --dump-dom shows it.
CHECK = ("<script>addEventListener('load', () => { const all = [...document.images]; document.documentElement"
         ".setAttribute('data-loaded', all.filter(i => i.complete && i.naturalWidth > 0).length + '/' + all.length);"
         " });</script>")  # fmt: skip


def images(page: str) -> list[tuple[bytes, int, int]]:
    """Every <img> of a page: its decoded PNG (the page must hold nothing but data: URIs) and declared size."""
    out = []
    for tag in re.findall(r"<img [^>]*>", page):
        src = re.search(r'src="([^"]*)"', tag).group(1)
        assert src.startswith("data:image/png;base64,"), src[:60]
        w, h = (int(re.search(rf'{a}="(\d+)"', tag).group(1)) for a in ("width", "height"))
        out.append((base64.b64decode(src.split(",", 1)[1], validate=True), w, h))
    return out


def valid_png(data: bytes, size: tuple[int, int] | None = None) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        assert size is None or img.size == size


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("POSTTRAIN_SKIP_BROWSER") == "1":
        pytest.skip("POSTTRAIN_SKIP_BROWSER=1: the report is not rendered in a browser")
    pytest.fail("the report's browser test needs Chromium: `apt-get install chromium` (Debian; .ci/run does it), "
                "or set POSTTRAIN_SKIP_BROWSER=1 to skip this one test knowingly")  # fmt: skip


def browser(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def loaded_in_browser(binary: str, page: str, tmp_path: Path) -> tuple[int, int]:
    """(images decoded, images on the page) once headless Chromium has loaded a copy of `page` with CHECK added."""
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK + "\n</body>"), encoding="utf-8")
    done = browser(binary, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", checked.as_uri())
    loaded = re.search(r'<html[^>]*data-loaded="(\d+)/(\d+)"', done.stdout)
    assert loaded, f"no load result in the DOM Chromium dumped (exit {done.returncode}): {done.stderr[-2000:]}"
    return int(loaded.group(1)), int(loaded.group(2))


def free_port() -> int:
    """A local TCP port nothing listens on now (a fixed one collides with another suite's run on the same
    machine: EADDRINUSE)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
