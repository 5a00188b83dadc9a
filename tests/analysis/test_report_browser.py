"""report.html in a real browser (headless Chromium): no JavaScript error, every figure drawn, a screenshot."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edgequant.analysis import QuantAnalyzer
from edgequant.analysis.report import FIGURE_IDS
from edgequant.demo.digits import load_digits_tensors, load_pretrained

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium, or "
                             ".ci/install_chromium.sh); the report browser test needs it")

ERROR_PROBE = """<script>window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
window.addEventListener('load', () => setTimeout(() => {
  document.body.setAttribute('data-js-errors', window.__errors.join(' | ') || 'none');
  const drawn = Array.from(document.querySelectorAll('.js-plotly-plot'))
    .filter(div => div.querySelector('svg.main-svg g.trace')).map(div => div.id);
  document.body.setAttribute('data-drawn', drawn.join(','));
}, 500));</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                           *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    images, _ = load_digits_tensors("train")
    analyzer = QuantAnalyzer(load_pretrained("digits_cnn"), images[:1], list(images[:128].split(64)), param_bw=4,
                             progress=False)
    out_dir = tmp_path_factory.mktemp("report")
    analyzer.analyze(out_dir)
    return out_dir / "report.html"


def test_report_draws_every_figure_without_javascript_errors(report, tmp_path) -> None:
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("<head>", "<head>" + ERROR_PROBE, 1))
    dom = _chromium("--dump-dom", probed.as_uri()).stdout
    assert 'data-js-errors="none"' in dom, dom[-2000:]
    drawn = dom.split('data-drawn="', 1)[1].split('"', 1)[0].split(",")
    assert sorted(drawn) == sorted(FIGURE_IDS)
    assert dom.count('class="updatemenu-') > 0  # the layer dropdowns


def test_report_screenshot(report, tmp_path) -> None:
    screenshot = tmp_path / "report.png"
    _chromium("--window-size=1400,3200", f"--screenshot={screenshot}", report.as_uri())
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 50_000
    print(f"report screenshot: {screenshot}")
