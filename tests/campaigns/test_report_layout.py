"""The campaign's HTML report, rendered by a real browser at real viewport sizes: nothing runs
off the page horizontally (tables scroll in their own box, plots shrink to the page, long words
and tracebacks wrap).

The browser is a headless Chromium (``scripts/install-system.sh`` installs Debian's
``chromium-headless-shell``; any ``chromium`` on PATH does). It loads a copy of the page with
a small script that, once the page has loaded, writes the measurements into the DOM, which
``--dump-dom`` prints.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from twinloop.campaigns.campaign import run_campaign
from twinloop.campaigns.spec import load_spec

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")

#: Desktop, laptop, a narrow window or tablet, and a phone held upright (CSS pixels).
VIEWPORTS = ((1280, 800), (1024, 768), (800, 900), (390, 844))

#: A scenario name as long as a spec allows (64 characters) and without a place to break.
LONG_NAME = "a-scenario-name-as-long-as-a-campaign-spec-allows-without-spaces"

MEASURE = """<script>
window.addEventListener("load", function () {
  var doc = document.documentElement, out = [];
  document.querySelectorAll("body *").forEach(function (e) {
    var box = e.getBoundingClientRect();
    // what lies beyond the viewport's right edge, outside a box that scrolls on its own
    if (box.right > window.innerWidth + 0.5 && !(e.closest(".scroll"))) {
      out.push(e.tagName + " " + Math.round(box.right));
    }
  });
  var images = Array.prototype.map.call(document.images, function (i) {
    return [i.complete, i.naturalWidth, Math.round(i.getBoundingClientRect().width)];
  });
  var pre = document.createElement("pre");
  pre.id = "twinloop-measure";
  pre.textContent = JSON.stringify({
    scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth, innerWidth: window.innerWidth,
    overflowing: out, images: images,
    scrollers: document.querySelectorAll(".scroll").length,
  });
  document.body.appendChild(pre);
});
</script>"""


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "no headless Chromium on PATH (" + ", ".join(BROWSERS) + "): scripts/install-system.sh "
        "installs chromium-headless-shell with apt-get; it could not be installed here"
    )


def render(page: Path, width: int, height: int, profile: Path) -> dict[str, Any]:
    """Load ``page`` in the headless browser at ``width`` × ``height``; its measurements."""
    copy = page.with_name("measured-" + page.name)
    copy.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    done = subprocess.run(
        [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={profile}", f"--window-size={width},{height}", "--dump-dom",
         copy.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    found = re.search(r'<pre id="twinloop-measure">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the browser measured nothing (exit {done.returncode}): {done.stderr[-2000:]}"
    measured: dict[str, Any] = json.loads(found.group(1))
    return measured


@pytest.fixture(scope="module")
def campaign_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real campaign's report with what overflowed: many scenarios (a wide table), a long
    unbreakable name, every plot, the worst runs' traces."""
    tmp = tmp_path_factory.mktemp("layout")
    faults = ["occlusion", "over_delivery", "bias", "compression_low"]
    spec = {
        "name": "layout-check-with-a-long-campaign-name-that-must-wrap-somewhere",
        "therapy": "glucose",
        "patients": ["adult#001"],
        "controller": "basal-bolus",
        "days": 1,
        "seeds": [0],
        "sweep": faults,
        "scenarios": [
            {
                "name": LONG_NAME,
                "faults": [{"fault": "false_bolus", "start": 700, "duration": 5,
                            "params": {"units": 8}}],
            },
        ],
        "requirements": [{"id": "G1", "rule": "glucose_min", "threshold_mg_dl": 54}],
    }  # fmt: skip
    path = tmp / "layout.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp / "out"
    run_campaign(load_spec(path), out, inline=True, progress=False)
    return out / "report.html"


@pytest.mark.parametrize(("width", "height"), VIEWPORTS)
def test_the_campaign_report_never_overflows_the_viewport(campaign_report, width, height, tmp_path):
    page = campaign_report.read_text()
    assert LONG_NAME in page
    m = render(campaign_report, width, height, tmp_path / "profile")
    assert m["innerWidth"] == width  # the viewport asked for
    assert m["scrollWidth"] <= m["innerWidth"], m  # no horizontal scrolling of the page
    assert m["overflowing"] == [], m
    # the plots are there, decoded, and no wider than the page
    assert len(m["images"]) >= 3
    assert all(ok and natural > 0 and shown <= width for ok, natural, shown in m["images"]), m
    assert m["scrollers"] >= 3  # every table in its own scrolling box


def test_the_measurement_sees_an_overflowing_page(tmp_path):
    # the check itself: a page with a table wider than the viewport is caught
    page = tmp_path / "wide.html"
    page.write_text(
        "<!doctype html><html><body><table><tr>"
        + "".join(f"<td>column-{i}-with-some-width</td>" for i in range(40))
        + "</tr></table></body></html>"
    )
    m = render(page, 800, 600, tmp_path / "profile")
    assert m["scrollWidth"] > m["innerWidth"] == 800 and m["overflowing"]


def test_the_insulin_trace_is_drawn_strong_enough_to_see_at_the_reports_size(
    campaign_report, tmp_path
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pyarrow.parquet as pq
    from matplotlib.colors import to_rgb
    from PIL import Image

    from twinloop.campaigns.glucose.therapy import INSULIN_COLOUR, PART

    trace = pq.read_table(campaign_report.parent / "traces" / "baseline.adult-001.s0.parquet")
    columns = trace.to_pydict()
    fig, ax = plt.subplots(figsize=(9, 3.2))  # as the report draws it, at its 90 dpi
    PART.plot_trace(ax, columns)
    labels = [text.get_text() for text in ax.legend().get_texts()]
    assert any("insulin" in label for label in labels)  # named in the trace's legend
    (twin,) = [a for a in fig.axes if a is not ax]
    (line,) = twin.get_lines()
    delivered = np.cumsum(columns["insulin_u"])
    assert np.allclose(line.get_ydata(), delivered) and delivered[-1] > 10  # U over the day
    path = tmp_path / "trace.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    near = np.linalg.norm(pixels - np.array(to_rgb(INSULIN_COLOUR)), axis=2) < 0.15
    # a solid line across the plot's ~600 px width, about 2 px thick, and its axis labels
    assert near.sum() > 1000, int(near.sum())
    assert np.count_nonzero(near.any(axis=0)) > 500  # it spans the day
