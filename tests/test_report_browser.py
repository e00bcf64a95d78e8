"""The HTML report in a real headless Chromium at 1400 and 800 px: nothing overflows its container, every image
loads, and the verdict opens the page.

A small script appended to a copy of the report measures the laid-out page after the load event and writes its
findings into the DOM as JSON; ``chromium --dump-dom`` returns that DOM.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_profile_graphs import pair  # noqa: F401  (fixture)

from edgefuse.config.profile import ProfileConfig
from edgefuse.profile.api import profile_onnx
from edgefuse.report.api import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (.ci/system-deps.sh installs it)")]

# Every element must stay inside its parent's box (1 px of rounding allowed) and the page must not scroll
# sideways; every <img> must have decoded (naturalWidth > 0).
CHECK_JS = """
<script>
window.addEventListener('load', () => {
  const bad = [];
  const pageWidth = document.documentElement.clientWidth;
  if (document.documentElement.scrollWidth > pageWidth + 1)
    bad.push({what: 'page scrolls sideways', scrollWidth: document.documentElement.scrollWidth, pageWidth});
  for (const el of document.body.querySelectorAll('*')) {
    const parent = el.parentElement;
    if (!parent || el.tagName === 'SCRIPT' || el.tagName === 'PRE') continue;
    const r = el.getBoundingClientRect(), p = parent.getBoundingClientRect();
    if (r.width === 0) continue;
    if (r.right > p.right + 1 || r.left < p.left - 1)
      bad.push({what: 'overflows its container', tag: el.tagName, text: (el.textContent || '').slice(0, 60),
                right: r.right, parentRight: p.right});
    if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX === 'visible'
        && el.tagName !== 'TABLE' && el.clientWidth > 0)
      bad.push({what: 'content wider than its box', tag: el.tagName, text: (el.textContent || '').slice(0, 60)});
  }
  const images = [...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,
                                                  width: i.getBoundingClientRect().width}));
  const out = document.createElement('pre');
  out.id = 'edgefuse-check';
  out.textContent = JSON.stringify({bad, images, first: document.querySelector('h2') &&
                                    document.querySelector('h2').textContent});
  document.body.appendChild(out);
});
</script>
"""


def _layout(html: Path, width: int, tmp_path: Path) -> dict:
    page = tmp_path / f"checked-{width}.html"
    page.write_text(html.read_text(encoding="utf-8").replace("</body>", CHECK_JS + "</body>"), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--virtual-time-budget=10000", f"--window-size={width},3000",
             f"--user-data-dir={tmp_path / 'chrome-profile'}"]
    dom = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", page.resolve().as_uri()], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="edgefuse-check">(.*?)</pre>', dom, re.S)
    assert found, "the layout check did not run (no load event?)"
    import html as html_lib

    return json.loads(html_lib.unescape(found.group(1)))


def _emulated(profile: dict) -> dict:
    d = json.loads(json.dumps(profile))
    d["environment"] = {**d["environment"], "emulated": True, "target": "arm64-emulated (neoverse-n1)",
                        "machine": "aarch64", "emulated_cpu": "neoverse-n1"}
    for g in d["graphs"]:  # emulated timings are much slower: the plots must not share an axis with native ones
        for p in g["latency"]:
            p["latency_ms_p50"] *= 40
            p["samples_ms"] = [v * 40 for v in p["samples_ms"]]
    return d


@pytest.fixture(scope="module")
def report_html(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    cfg = ProfileConfig(threads=[1], sequence_lengths=[8], warmup_runs=1, runs=4, op_profile_runs=2,
                        memory_runs=1)
    prof = profile_onnx(list(pair), cfg).to_dict()
    verdict = {"kind": "verdict", "shipped": "final quantized (dynamic int8): quantize/quantized/model.onnx",
               "size_mib": 18.5, "reference_size_mib": 86.2, "latency_ms": 12.7, "reference_latency_ms": 36.0,
               "latency_ratio": 0.358, "latency_point": "threads 1, batch 1, sequence 128", "target": "local",
               "teacher_cosine": 0.88, "budgets": [
                   {"budget": "max_size_mib", "op": "<=", "limit": 30.0, "measured": 18.5, "unit": "MiB",
                    "passed": True, "detail": "model.onnx + external data"}]}
    long_node = {"title": "Generic result", "data": {"nodes": [
        {"node": "/encoder/layer.3/attention/self/query/MatMul_quant_with_a_very_long_name_" + "x" * 80,
         "time_us": 12.5, "nested": {"a": 1}}], "hash": "f" * 120}}
    training = {"title": "Recovery", "stage": "recover", "data": {"finetune": {
        "objective_weights": {"task": 0.0, "distill_hidden": 1.0}, "steps_run": 30, "total_steps": 30,
        "stopped_by": "max_steps", "final_train_loss": 0.2, "best_metric_name": "embedding_cosine",
        "best_metric": 0.9, "best_step": 30, "train_seconds": 10.0, "examples_per_second": 40.0,
        "trainable_params": 1000, "loss_curve": [[10, 1.0], [20, 0.5], [30, 0.2]],
        "initial_metrics": {"embedding_cosine": 0.4},
        "eval_history": [{"step": 15, "embedding_cosine": 0.8}, {"step": 30, "embedding_cosine": 0.9}]}}}
    out = tmp_path_factory.mktemp("browser-report")
    return write_report([verdict, prof, _emulated(prof), long_node, training], out, formats=("html",))["html"]


@pytest.mark.parametrize("width", [1400, 800])
def test_nothing_overflows_and_every_image_loads(report_html: Path, width: int, tmp_path: Path) -> None:
    found = _layout(report_html, width, tmp_path)
    assert found["bad"] == [], found["bad"][:5]
    assert len(found["images"]) >= 8 and all(i["ok"] for i in found["images"]), found["images"]
    assert all(0 < i["width"] <= width for i in found["images"])
    assert found["first"] == "Verdict"  # the page opens with the verdict


def test_emulated_title_is_not_clipped(report_html: Path) -> None:
    html = report_html.read_text()
    # the full warning is in every emulated plot title (the PNG keeps the whole title: bbox "tight")
    assert html.count("[EMULATED, not device latency]") >= 1
    assert 'Latency against accuracy / cosine [EMULATED, not device latency]' in html
