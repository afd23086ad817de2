"""A real headless browser for page tests: the system Chromium, driven from the command line
(``--dump-dom`` after the page's timers ran for ``--virtual-time-budget`` ms, ``--screenshot``),
with console messages taken from its log. No Python package needed; ``find_chromium`` says
why a browser is not usable so tests can skip with that reason."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
         "--disable-extensions", "--mute-audio"]
_STATUS: dict = {}


def find_chromium() -> tuple[Optional[str], str]:
    """``(executable, "")`` for a working Chromium (``TDLM_CHROMIUM`` or one on PATH), else
    ``(None, reason)``."""
    if "result" in _STATUS:
        return _STATUS["result"]
    exe = os.environ.get("TDLM_CHROMIUM") or next(filter(None, map(shutil.which, NAMES)), None)
    if exe is None:
        res = (None, "no Chromium on PATH (apt-get install chromium, or set TDLM_CHROMIUM)")
    else:
        try:
            with tempfile.TemporaryDirectory() as d:
                page = Path(d) / "probe.html"
                page.write_text("<!DOCTYPE html><p id=x>ok</p>")
                out = _run(exe, ["--dump-dom", page.as_uri()], d, timeout=60).stdout
            res = (exe, "") if 'id="x">ok' in out else (None, f"{exe} could not render a page")
        except (OSError, subprocess.SubprocessError) as e:
            res = (None, f"{exe} does not run here: {type(e).__name__}: {e}")
    _STATUS["result"] = res
    return res


def _run(exe: str, args: list, profile: str, timeout: float = 90):
    return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def dump_dom(url: str, budget_ms: int = 0) -> tuple[str, list[str]]:
    """The DOM after load (and ``budget_ms`` of virtual time for timers) and the page's
    console messages (Chromium's ``CONSOLE`` log lines)."""
    exe, why = find_chromium()
    assert exe, why
    args = ["--enable-logging=stderr", "--v=0", "--dump-dom", url]
    if budget_ms:
        args.insert(0, f"--virtual-time-budget={budget_ms}")
    with tempfile.TemporaryDirectory() as d:
        p = _run(exe, args, d)
    console = [line for line in p.stderr.splitlines() if ":CONSOLE" in line]
    return p.stdout, console


def screenshot(url: str, path: Path, width: int = 1000, height: int = 560) -> Path:
    exe, why = find_chromium()
    assert exe, why
    with tempfile.TemporaryDirectory() as d:
        _run(exe, [f"--window-size={width},{height}", f"--screenshot={path}", url], d)
    return Path(path)


class _Text(HTMLParser):
    def __init__(self, ident: str):
        super().__init__(convert_charrefs=True)
        self.ident, self.depth, self.parts = ident, 0, []

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += 1
        elif dict(attrs).get("id") == self.ident:
            self.depth = 1

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.parts.append(data)


def text_of(dom: str, ident: str) -> str:
    """The text content of the element with id ``ident``."""
    p = _Text(ident)
    p.feed(dom)
    return "".join(p.parts)


def attr_of(dom: str, tag: str, name: str) -> Optional[str]:
    """The value of attribute ``name`` on the first ``<tag ...>`` of the DOM (None if absent)."""
    m = re.search(rf"<{tag}\b[^>]*>", dom)
    if not m:
        return None
    a = re.search(rf'\s{re.escape(name)}="([^"]*)"', m.group(0))
    return None if a is None else a.group(1)
