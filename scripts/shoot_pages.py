"""Screenshot MLflow UI pages in Debian's headless Chromium, driven by Playwright (docs only, not CI).

python scripts/shoot_pages.py BASE_URL OUT_DIR NAME=FRAGMENT [NAME=FRAGMENT ...]

Each page is opened in the model-training view, given 12 s to fetch its data and draw (MLflow's auto-refresh
never lets the network go idle), and saved as OUT_DIR/NAME. MLflow's assistant side panel is closed when it shows,
so the page itself fills the picture. Chromium runs with the background-networking flags this closed network
needs (no update checks, no sync).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
VIEW = "workflowType=machine_learning"


def main(argv: list[str]) -> None:
    base, out, pages = argv[0].rstrip("/"), Path(argv[1]), [a.split("=", 1) for a in argv[2:]]
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1600, "height": 1100}
        )
        page = browser.new_page()
        for name, fragment in pages:
            url = f"{base}/#/{fragment}?{VIEW}"
            page.goto(url, timeout=60_000, wait_until="load")
            page.wait_for_timeout(6_000)  # the page fetches its data; auto-refresh never lets the network idle
            close = page.get_by_role("button", name="Close")
            if close.count() and close.first.is_visible():
                close.first.click()
            page.wait_for_timeout(6_000)  # charts draw after their data arrives
            page.screenshot(path=str(out / name))
            print(json.dumps({"screenshot": str(out / name), "url": url}))
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1:])
