#!/usr/bin/env python
"""Render an HTML report to a PNG with headless Chromium.

    python scripts/screenshot_report.py REPORT.html OUT.png [--width 1400] [--height 3000]

Needs ``/usr/bin/chromium`` (Debian: ``apt-get install -y chromium``) or ``--chromium PATH`` /
``$CHROMIUM``. A fresh temporary profile is used and removed; nothing is fetched from the network.
Exit status 0 when the PNG was written, 2 when Chromium is missing, 1 when it failed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CHROMIUM = "/usr/bin/chromium"


def find_chromium(explicit: str | None = None) -> str | None:
    for c in (explicit, os.environ.get("CHROMIUM"), DEFAULT_CHROMIUM, shutil.which("chromium"),
              shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def screenshot(html_path, out_png, width: int = 1400, height: int = 3000, chromium: str | None = None,
               timeout: float = 180.0) -> Path:
    """Render ``html_path`` to ``out_png`` (window ``width`` × ``height``); returns the PNG path."""
    exe = find_chromium(chromium)
    if exe is None:
        raise FileNotFoundError(f"chromium not found (looked for {DEFAULT_CHROMIUM}, $CHROMIUM, PATH); "
                                "install it with: apt-get update && apt-get install -y chromium")
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path}: no such file")
    out_png = Path(out_png).resolve()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # Chromium writes the screenshot itself: render to a temp name beside the target, then rename.
    tmp_png = out_png.with_name(f".{out_png.name}.{os.getpid()}.tmp.png")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
           f"--screenshot={tmp_png}", f"--window-size={width},{height}", html_path.as_uri()]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
        if not tmp_png.is_file() or tmp_png.stat().st_size == 0:
            raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}); stderr tail:\n"
                               + "\n".join(proc.stderr.splitlines()[-15:]))
        os.replace(tmp_png, out_png)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
        if tmp_png.exists():
            tmp_png.unlink()
    return out_png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html")
    ap.add_argument("out_png")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--chromium", default=None, help=f"browser executable (default {DEFAULT_CHROMIUM})")
    ap.add_argument("--timeout", type=float, default=180.0)
    a = ap.parse_args(argv)
    try:
        out = screenshot(a.html, a.out_png, a.width, a.height, a.chromium, a.timeout)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
