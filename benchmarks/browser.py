"""Opening an HTML report in headless Chromium and reading what the page says about itself.

The report checks itself as it loads (`optiscope.dashboards.html`): it counts the figures drawn
and the script errors, and writes them into a hidden status element. `open_in_chromium` opens a
report in a fresh headless Chromium, dumps the DOM once the page is done, and returns that
element as a `PageStatus`: the tests assert on it, the report benchmark times with it.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PageStatus", "find_chromium", "open_in_chromium"]

# A fresh, quiet browser: no sandbox (containers, root), no GPU, no network of its own, no
# first-run work, no /dev/shm (small in containers).
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-dev-shm-usage", "--hide-scrollbars")


@dataclass
class PageStatus:
    """What a report page said about itself in Chromium.

    Attributes:
        state: ``"done"`` once the page finished drawing, else ``"loading"``.
        expected: figures the report holds.
        figures: figure elements the page found.
        rendered: figures with an SVG drawn in them.
        errors: script errors and failed loads the page recorded.
        resources: resources the page fetched (0 for a self-contained page).
        first_ms: milliseconds from navigation start to the first figure drawn.
        ms: milliseconds from navigation start to the last figure drawn.
        open_s: seconds from launching Chromium to the last figure drawn.
        process_s: seconds the Chromium process ran (also dumping the DOM and exiting).
        detail: the page's error messages, one a line.
        dom: the DOM Chromium dumped.
    """

    state: str
    expected: int
    figures: int
    rendered: int
    errors: int
    resources: int
    first_ms: float | None
    ms: float | None
    open_s: float | None
    process_s: float
    detail: str = ""
    dom: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        """Every figure drawn, no script error, nothing fetched."""
        return (self.state == "done" and self.figures == self.expected == self.rendered
                and self.errors == 0 and self.resources == 0)


def find_chromium() -> str | None:
    """The Chromium executable: ``chromium`` on PATH, else Debian's ``/usr/bin/chromium``."""
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    return next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")
                 if os.access(p, os.X_OK)), None)


def open_in_chromium(path: str | os.PathLike, *, chromium: str | None = None,
                     budget_ms: int = 30_000, timeout_s: float = 180.0) -> PageStatus:
    """Opens a report in a fresh headless Chromium and returns its status element.

    Args:
        path: the report's HTML file.
        chromium: the browser executable (default: `find_chromium`).
        budget_ms: Chromium's ``--virtual-time-budget`` (default 30,000): the page draws its
            figures after load, one timer task each, and virtual time runs those tasks before the
            DOM is dumped; idle time is skipped, so a generous budget costs nothing.
        timeout_s: wall-clock limit of the browser process (default 180).

    Raises:
        FileNotFoundError: no Chromium, or no such report.
        RuntimeError: the dumped DOM has no status element (not a report, or Chromium failed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"open_in_chromium: no report at {str(path)!r}")
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("open_in_chromium: no Chromium found (chromium on PATH or "
                                "/usr/bin/chromium); install it, e.g. apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="optiscope-chromium-") as profile:
        launched = time.time()
        proc = subprocess.run(
            [chromium, *_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
             "--dump-dom", path.resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout_s)
        process_s = time.time() - launched
    match = re.search(r'<div id="optiscope-status"([^>]*)>(.*?)</div>', proc.stdout, flags=re.S)
    if match is None:
        raise RuntimeError(f"open_in_chromium: no status element in the DOM of {str(path)!r} "
                           f"(Chromium exited {proc.returncode}): {proc.stderr[-2000:]}")
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', match.group(1)))

    def number(key: str, kind=float):
        value = attrs.get(key, "")
        return kind(value) if value else None

    done_at = number("data-done-at")
    return PageStatus(
        state=attrs.get("data-state", ""), expected=number("data-expected", int) or 0,
        figures=number("data-figures", int) or 0, rendered=number("data-rendered", int) or 0,
        errors=number("data-errors", int) or 0, resources=number("data-resources", int) or 0,
        first_ms=number("data-first-ms"), ms=number("data-ms"),
        open_s=None if done_at is None else done_at / 1000 - launched, process_s=process_s,
        detail=html.unescape(match.group(2)).strip(), dom=proc.stdout)
