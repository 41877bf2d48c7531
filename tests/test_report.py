"""The sweep report opened in real headless Chromium: no console errors, one row per trial, every figure loaded,
a run name with <script> shown as text. A screenshot is written next to the page and to tests/output/."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.sweeplib import overtok, sweep_runs, wait_for

pytestmark = pytest.mark.slow

EVIL = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'

# injected into a copy of the page only: records errors and the checks into the DOM for --dump-dom
PROBE_HEAD = """<script>window.__errors=[];window.addEventListener('error',function(e){__errors.push(String(e.message||e))},true);
var __ce=console.error;console.error=function(){__errors.push(Array.prototype.join.call(arguments,' '));__ce.apply(console,arguments)};</script>"""
PROBE_TAIL = """<script>window.addEventListener('load',function(){setTimeout(function(){
var imgs=Array.prototype.slice.call(document.images);
var out={errors:__errors,title:document.title,rows:document.querySelectorAll('#runs tbody tr').length,
images:imgs.length,loaded:imgs.filter(function(i){return i.complete&&i.naturalWidth>0}).length,
evil_text:Array.prototype.some.call(document.querySelectorAll('#runs td'),function(td){return td.textContent.indexOf('<script>')>=0}),
scripts:document.scripts.length,headline:document.querySelectorAll('#headline tbody tr').length,
headline_text:(document.querySelector('#headline')||{textContent:''}).textContent};
var pre=document.createElement('pre');pre.id='__check';pre.textContent=JSON.stringify(out);document.body.appendChild(pre);},300)});</script>"""

CHROME = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--disable-quic"]


def test_report_in_headless_chromium(quickstart, tmp_path):
    assert shutil.which("chromium"), "Debian's chromium is installed by the Makefile's test target"
    work, res, _ = quickstart
    assert res.returncode == 0
    c, _, children = sweep_runs(f"sqlite:///{work}/results/mlflow.db", "quickstart")
    victim = children[0].info.run_id
    c.set_tag(victim, "mlflow.runName", EVIL)
    out = overtok(work, "report", "quickstart")
    assert out.returncode == 0, out.stderr[-3000:]
    page = work / "dashboards" / "quickstart" / "index.html"
    text = page.read_text()
    assert EVIL not in text and "&lt;script&gt;" in text
    assert "CFG generation accuracy" in text and "samples)" in text  # accuracy with its interval in the fits table
    assert "log10(V+m)" in text and "no verdict: one seed" in text  # each log-linear fit with its verdict
    assert not re.search(r"""(src|href)=["']?(https?:)?//(?!127\.0\.0\.1)""", text.replace('href="http://127.0.0.1', ""))
    assert not re.search(r"""<(img|script|link)[^>]+(src|href)=["']?https?:""", text)  # nothing fetched

    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_TAIL + "</body>"))
    profile = tmp_path / "profile"
    dom = subprocess.run(CHROME + [f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
                                   probe.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="__check">(.*?)</pre>', dom.stdout)
    assert m, dom.stderr[-2000:]
    check = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert check["errors"] == [], check
    assert check["rows"] == len(children) == 12
    assert check["images"] >= 5 and check["loaded"] == check["images"]
    assert check["evil_text"] and check["title"] != "pwned"
    # the headline: the quickstart's 5 variants at each of its 2 sizes against their baselines, one seed each
    assert check["headline"] == 10 and "n/a, 1 seed" in check["headline_text"], check

    shot = page.with_name("screenshot.png")
    subprocess.run(CHROME + [f"--user-data-dir={profile}2", "--window-size=1400,2400", f"--screenshot={shot}",
                             page.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000
    keep = ROOT / "tests" / "output"
    keep.mkdir(exist_ok=True)
    shutil.copy(shot, keep / "report_screenshot.png")
    print(f"screenshot: {keep / 'report_screenshot.png'}")


def test_report_from_a_copied_results_directory(quickstart, tmp_path):
    """An export copied from another machine (no MLflow store here) still makes a page, without MLflow links."""
    work, res, _ = quickstart
    assert res.returncode == 0
    assert overtok(work, "export", "quickstart").returncode == 0
    copy = tmp_path / "copied"
    copy.mkdir()
    for f in ("runs.parquet", "curves.parquet"):
        shutil.copy(work / "results" / "quickstart" / f, copy / f)
    out = overtok(tmp_path, "report", str(copy))
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "dashboards" / "quickstart" / "index.html").read_text()
    assert "no MLflow store here" in text and "#/experiments/" not in text
    assert text.count("<tr>") >= 12 and (copy / "fits.json").exists() and list((copy / "figures").glob("*.png"))


def test_headline_pairs_variants_with_their_baseline_and_plots_drop_stale_figures(tmp_path):
    """The page's headline: each OE variant of the committed vocab_scaling export against its size's baseline (one
    seed there: 'n/a, 1 seed') and the definition of train loss stated;
    a figure the export no longer makes is removed by plots."""
    import re
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    shutil.copytree(ROOT / "results" / "vocab_scaling", tmp_path / "vs")
    (tmp_path / "vs" / "figures" / "fig2_cfg_accuracy.png").write_bytes(b"stale")
    res = subprocess.run([sys.executable, "-m", "overtok", "report", "vs"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Warning" not in res.stderr, res.stderr[-2000:]  # e.g. matplotlib's empty-legend warning
    page = (tmp_path / "dashboards" / "vocab_scaling" / "index.html").read_text()
    head = page[page.index("<h2>Headline"):page.index("<h2>Runs")]
    assert "mean of a run&#x27;s last 10 logged training losses" in head
    assert head.count(">n/a, 1 seed<") == 16  # 8 variants x (train, held-out)
    first = re.search(r'data-v="(-?[0-9.]+)">[-0-9.]+</td><td class=l data-v="n/a, 1 seed"', head)
    assert first is not None
    assert not (tmp_path / "vs" / "figures" / "fig2_cfg_accuracy.png").exists()
    fits = page[page.index("<h2>Fitted laws"):]
    assert "(CI includes 0)" in fits  # the committed vocab_scaling slopes' CIs include zero


def test_report_of_a_fit_through_two_sizes_says_it_has_no_interval(tmp_path):
    """The committed oe_sharded export has one seed at two input vocabularies: the line through them has no
    interval (none, not a zero-width one), and the page and Fig. 5 say so instead of failing."""
    shutil.copytree(ROOT / "results" / "oe_sharded", tmp_path / "sh")
    res = subprocess.run([sys.executable, "-m", "overtok", "report", "sh", "--bootstrap", "50"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    fit = json.loads((tmp_path / "sh" / "fits.json").read_text())["loglinear"]["final_train_loss"]
    (only,) = fit.values()
    assert only["ci"]["slope"] == [None, None] and only["notes"]["interval"].startswith("none")
    page = (tmp_path / "dashboards" / "oe_sharded" / "index.html").read_text()
    assert "(only 2 points, no CI)" in page
    assert (tmp_path / "sh" / "figures" / "fig5_loss_vs_vocab.png").stat().st_size > 10_000


def test_mlflow_links_open_runs_and_curves_in_the_mlflow_ui(quickstart, tmp_path):
    """The dashboard's MLflow links, opened in headless Chromium against `overtok ui` on the sweep's store: a run
    link shows the run in the model-training view, and a size's curves link shows MLflow's metric page with
    train/loss for the runs it compares."""
    import html as html_lib
    import re

    from tests.sweeplib import free_port, kill_group

    work, res, _ = quickstart
    assert res.returncode == 0
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    out = overtok(work, "report", "quickstart", "--ui", ui)
    assert out.returncode == 0, out.stderr[-2000:]
    page = (work / "dashboards" / "quickstart" / "index.html").read_text()
    curves = [html_lib.unescape(u) for u in re.findall(r'<a class=curves href="([^"]+)"', page)]
    runs = [html_lib.unescape(u) for u in re.findall(r'href="([^"]+/runs/[^"]+)"', page)]
    assert curves and runs and all("workflowType=machine_learning" in u for u in curves + runs)
    assert "Warning" not in out.stderr, out.stderr[-2000:]  # e.g. matplotlib's empty-legend warning
    ui_log = open(tmp_path / "ui.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "overtok", "ui", "--port", str(port)], cwd=work,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=ui_log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_for(lambda: _answers(ui), 180, what="overtok ui")

        def dom(url: str) -> str:
            profile = tmp_path / f"profile{abs(hash(url))}"
            return subprocess.run(CHROME + [f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom",
                                            url], capture_output=True, text=True, timeout=180).stdout

        metric = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom(curves[0])))
        assert "Metric Details" in metric and "train/loss" in metric and "Latest" in metric, metric[-3000:]
        run = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom(runs[0])))
        assert "train/loss" in run and "Parameters" in run, run[-3000:]
        log = (tmp_path / "ui.log").read_text()  # the server's own deprecation warnings are not the user's
        assert "DeprecationWarning" not in log and "FutureWarning" not in log, log[-3000:]
    finally:
        kill_group(server)
        ui_log.close()


def _answers(url: str) -> bool:
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def test_report_of_a_partial_sweep_lists_its_pending_trials(quickstart):
    """The quickstart's grid with one more OD depth: the page lists the 6 trials that have no run yet, and states the
    data and budget."""
    from tests.sweeplib import SMALL

    work, res, _ = quickstart
    assert res.returncode == 0
    sets = [f"--set={s}" for s in SMALL] + ["--set=grid.model.od_depth=[1, 2, 3]"]
    out = overtok(work, "report", "quickstart.yaml", *sets)
    assert out.returncode == 0, out.stderr[-2000:]
    page = (work / "dashboards" / "quickstart" / "index.html").read_text()
    data = page[page.index("<h2>Data and budget"):page.index("<h2>Runs")]
    assert "pending (no run yet): 6 trial(s)" in data and "od_depth=3" in data
    assert "CFG grammar" in data and "budget per trial" in data and "hardware: CPU (" in data
