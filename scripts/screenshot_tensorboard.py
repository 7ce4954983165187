#!/usr/bin/env python
"""Screenshots of the live per-position metrics in TensorBoard (docs/integrations.md "Per-position metrics, live").

Trains a short bundled-trainer run with ``--log.tensorboard true``, starts TensorBoard on it, and photographs
the ``pos/`` scalars and the ``pos/divergence_by_position`` image with headless Chromium (Playwright driving
/usr/bin/chromium, as tests/app/test_browser.py does). W&B has no local UI for an offline run, so it is not shown.

    python scripts/screenshot_tensorboard.py --out docs/img
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--run", default=None, help="an existing run directory with RUN/tensorboard/ (skips training)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.run:
        run = Path(args.run)
    else:
        from cppo_diag.cli.main import main as cli

        root = Path(tempfile.mkdtemp(prefix="tb_shot_"))
        cli(["train", "--preset", "tiny", "--steps", str(args.steps), "--threads", "1", "--log.out_dir", str(root),
             "--log.name", "pos-live", "--log.progress", "false", "--log.tensorboard", "true",
             "--log.position_figure_every", "3"])
        run = root / "pos-live"
    port = _free_port()
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run / "tensorboard"), "--port",
                           str(port), "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from playwright.sync_api import sync_playwright

        url = f"http://127.0.0.1:{port}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 1300})
            for _ in range(60):
                try:
                    page.goto(url + "/#timeseries", timeout=5000)
                    break
                except Exception:  # noqa: BLE001 - the server is starting
                    time.sleep(1)
            page.wait_for_timeout(4000)
            page.get_by_role("combobox", name="Filter tags (regex)").fill("^pos/")
            page.keyboard.press("Escape")  # the tag autocomplete list
            try:  # the settings pane, open by default
                page.get_by_role("button", name="Settings").first.click(timeout=3000)
            except Exception:  # noqa: BLE001 - another TensorBoard layout: keep the pane
                pass
            page.wait_for_timeout(5000)
            page.screenshot(path=str(out / "tensorboard_pos.png"), full_page=True)
            browser.close()
    finally:
        tb.terminate()
        tb.wait(timeout=30)
    print(out / "tensorboard_pos.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
