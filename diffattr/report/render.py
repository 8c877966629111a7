"""HTML and PDF rendering of a report (and of the demo's quick report).

One jinja2 environment (autoescape on: a file or class name such as ``<script>`` shows as text)
renders every page. Numbers reach the page only through the filters in :data:`FORMATS`, each
applied to a value that is in ``report.json``, so every number on the page can be traced to the
JSON (``tests/test_report.py`` checks this). The HTML is self-contained: images are ``data:`` URIs,
CSS is inline, and a Content-Security-Policy forbids any other load. The PDF is that same HTML
printed by headless Chromium.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffattr.errors import UserError
from diffattr.resources import resource

log = logging.getLogger(__name__)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_TIMEOUT_S = 180


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_num(x: Any) -> str:
    """A score, distance or correlation: 4 significant digits; '-' when missing."""
    if not _finite(x):
        return "-"
    return str(x) if isinstance(x, int) else f"{x:.4g}"


def fmt_pct(x: Any) -> str:
    """A fraction in [0, 1] as a percentage with one decimal ('12.5%')."""
    return f"{100 * x:.1f}%" if _finite(x) else "-"


def fmt_ratio(x: Any) -> str:
    """A multiple ('4.0x')."""
    return f"{x:.1f}x" if _finite(x) else "-"


def fmt_sec(x: Any) -> str:
    """Seconds ('12.3 s')."""
    return f"{x:.1f} s" if _finite(x) else "-"


FORMATS: dict[str, Callable[[Any], str]] = {
    "num": fmt_num,
    "pct": fmt_pct,
    "ratio": fmt_ratio,
    "sec": fmt_sec,
}


def png_base64(image: torch.Tensor) -> str:
    """A ``(C, H, W)`` image in ``[-1, 1]`` as base64 PNG (for a self-contained HTML page)."""
    from PIL import Image

    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr_np = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr_np).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(template: str, context: dict[str, Any]) -> str:
    """Render ``assets/templates/<template>`` with autoescaping and the number filters."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=FileSystemLoader(str(resource("assets", "templates"))),
        autoescape=select_autoescape(["html", "j2"], default_for_string=True, default=True),
        undefined=StrictUndefined,
    )
    env.filters.update(FORMATS)
    return env.get_template(template).render(**context)


def find_chromium() -> str | None:
    """Path of a Chromium / Chrome binary (``DIFFATTR_CHROMIUM`` wins), or None."""
    explicit = os.environ.get("DIFFATTR_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def run_chromium(
    args: Sequence[str], chromium: str | None = None, timeout: float = CHROMIUM_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Run headless Chromium with ``args`` (a throw-away profile; no sandbox when root, which
    Chromium otherwise refuses). Raises UserError when it is missing, fails or hangs."""
    exe = chromium or find_chromium()
    if exe is None:
        raise UserError(
            "Chromium not found (install it: apt-get install chromium), or set DIFFATTR_CHROMIUM"
        )
    with tempfile.TemporaryDirectory(prefix="diffattr-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            f"--user-data-dir={profile}",
            *(["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
            *args,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"Chromium did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no message"]
        raise UserError(f"Chromium failed (exit {proc.returncode}): {tail[0]}")
    return proc


def write_pdf(html_path: Path, pdf_path: Path, chromium: str | None = None) -> Path:
    """Print ``html_path`` to ``pdf_path`` with headless Chromium (CSS page breaks apply)."""
    pdf_path.unlink(missing_ok=True)
    run_chromium(
        [
            "--no-pdf-header-footer",
            f"--print-to-pdf={pdf_path.resolve()}",
            html_path.resolve().as_uri(),
        ],
        chromium,
    )
    if not pdf_path.is_file() or pdf_path.stat().st_size == 0:
        raise UserError(f"Chromium wrote no PDF to {pdf_path}")
    return pdf_path
