"""The smoke run's Snakemake report opened in headless Chromium. Snakemake 9 reports are a
single-page React app that embeds every result, so the HTML containing a figure's name does
not show that a reader sees it: tests/report_probe.js, appended to a copy of the report,
clicks through the report's menu and view buttons and records each image as it is shown.
One Chromium run (a few seconds) dumps the DOM with that record and takes a screenshot.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
PROBE = Path(__file__).with_name("report_probe.js")
WINDOW = (1600, 1000)
# headless, as root, offline; a fresh profile per run
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
    # virtual time runs ahead while the page is idle: the probe's waits cost no wall time
    "--virtual-time-budget=120000",
]
# installed before the report's scripts, so that errors they throw are recorded too
CATCH_ERRORS = """<script>
window.reportProbeErrors = [];
window.addEventListener("error", (event) => reportProbeErrors.push(String(event.message)));
window.addEventListener("unhandledrejection", (event) => reportProbeErrors.push(String(event.reason)));
</script>"""

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def probe_report(report: Path, workdir: Path, screenshot: Path) -> dict:
    """What report_probe.js saw in ``report`` in Chromium; a screenshot of the final view."""
    text = report.read_text()
    head = text.index("<head>") + len("<head>")
    body = text.rindex("</body>")
    page = workdir / "probed_report.html"
    page.write_text(text[:head] + CATCH_ERRORS + text[head:body] + f"<script>{PROBE.read_text()}</script>" + text[body:])
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={workdir / 'profile'}", "--dump-dom", f"--screenshot={screenshot}", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    found = re.findall(r'<pre id="report-probe"[^>]*>(.*?)</pre>', proc.stdout, flags=re.S)
    assert found, f"the probe wrote no record (chromium exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(html.unescape(found[-1]))


def test_report_shows_every_figure_under_its_protocol_in_chromium(smoke_report, tmp_path):
    screenshot = tmp_path / "report.png"
    record = probe_report(smoke_report, tmp_path, screenshot)
    assert record["errors"] == [], record
    shown = {entry["label"]: entry for entry in record["shown"]}
    # the report(...) outputs of workflow/rules/figures.smk: Figures by protocol, then Protocols
    drawn = sorted(p.relative_to(smoke_report.parent).as_posix()
                   for p in (smoke_report.parent / "results/figures").glob("*/*.png"))
    assert {path.split("/")[2] for path in drawn} == {"paper", "reference"}
    assert sorted(shown) == sorted(drawn + ["results/protocol_comparison.png"])
    for path in drawn:
        assert (shown[path]["category"], shown[path]["subcategory"]) == ("Figures", path.split("/")[2])
    for path in shown:
        entry = shown[path]
        # loaded (naturalWidth > 0) and the figure's own pixels, not a stale or broken image
        assert (entry["width"], entry["height"]) == png_size(smoke_report.parent / path), entry
        assert entry["visible"], f"{path} loaded but is not visible (see {screenshot})"
    assert png_size(screenshot) == WINDOW
