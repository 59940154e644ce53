"""The MLflow UI in a real (headless Chromium) browser: two finished freqexp runs, served with
exactly the command a run's summary prints (`ui_command`), open from `ui_link` on the runs
table (not MLflow 3's GenAI overview) with their names and metric columns, and a run's
artifacts page lists its figures. Needs the Debian package `chromium`; installed when missing
and allowed (root or password-less sudo), skipped otherwise."""
from __future__ import annotations

import html
import os
import re
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from freqexp.tracking import Tracker, run_link, ui_command, ui_link
from tests.conftest import FAST, compose_cfg

SERVER_START_S = 120  # mlflow server imports for ~25 s on 2 busy cores
BROWSER_S = 90
SMALL = ["dataset=synthetic", "dataset.n_train=64", "dataset.n_val=32", "dataset.n_test=32"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip("headless Chromium missing and no apt-get to install it (Debian package `chromium`)")
    if os.geteuid() == 0:
        prefix = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        pytest.skip("headless Chromium missing; `apt-get install -y chromium` needs root (or password-less sudo)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["install", "-y", "-q", "chromium"], ["update", "-q"], ["install", "-y", "-q", "chromium"]):
        try:
            subprocess.run([*prefix, apt, *step], capture_output=True, timeout=600, env=env)
        except (OSError, subprocess.TimeoutExpired):
            break
        found = shutil.which("chromium")
        if found:
            return found
    pytest.skip("headless Chromium missing and `apt-get install -y chromium` did not install it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b[^>]*>.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def title(dom: str) -> str:
    m = re.search(r"<title>(.*?)</title>", dom, flags=re.S)
    return html.unescape(m.group(1)).strip() if m else ""


def js_number(x: float) -> str:
    """How the runs table prints a metric (JavaScript's Number.toString for values in [0, 1])."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def render(browser: str, url: str, profile) -> subprocess.Popen:
    """Headless Chromium dumping the DOM once the single-page app has had its (virtual) time;
    a fresh profile, as a first visit (no saved workflow switch or table columns)."""
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            f"--user-data-dir={profile}", "--window-size=2400,1200", "--virtual-time-budget=15000", "--dump-dom", url]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A sqlite store under the UI server started as `ui_command` prints it, from another
    directory and without the venv on PATH; the server's process group is ended afterwards."""
    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = compose_cfg([]).tracking.experiment
    Tracker(store, experiment)  # the store and experiment as a run makes them, before the server reads them
    port = free_port()
    command = ui_command(store, port)
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    env.pop("VIRTUAL_ENV", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = subprocess.Popen(command, shell=True, cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield store, experiment, port, server, command
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(server.pid, sig)
            except ProcessLookupError:
                break
            try:
                server.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def wait_until_up(server, port, log_path, limit=SERVER_START_S):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"UI server exited ({server.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"UI server did not answer within {limit} s:\n{log_path.read_text()[-3000:]}")


def test_ui_shows_runs_table_with_metrics_and_artifacts(tmp_path, served):
    from mlflow.tracking import MlflowClient

    from freqexp.run import execute

    browser = chromium()
    store, experiment, port, server, command = served
    assert shlex.split(command)[0] == os.path.join(os.path.dirname(sys.executable), "mlflow")  # absolute: works from anywhere
    # two finished runs, the real way, while the server starts
    results = [execute(compose_cfg([*SMALL, *FAST, f"tracking.uri={store}", f"loss={loss}"]), tmp_path / f"run{i}")
               for i, loss in enumerate(["mse", "mse+ssim"])]
    client = MlflowClient(store)
    runs = [client.get_run(r.run_id) for r in results]
    assert {r.info.status for r in runs} == {"FINISHED"}
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == 2, names
    exp_id = runs[0].info.experiment_id
    figures = sorted(a.path for a in client.list_artifacts(runs[0].info.run_id) if a.path.endswith(".png"))
    assert "roc.png" in figures and "reconstructions.png" in figures
    wait_until_up(server, port, tmp_path / "server.log")

    runs_url = ui_link(port, exp_id)
    artifacts_url = run_link(port, exp_id, runs[0].info.run_id, "artifacts")
    pages = {"runs": render(browser, runs_url, tmp_path / "profile-runs"),
             "artifacts": render(browser, artifacts_url, tmp_path / "profile-artifacts")}
    doms = {}
    for key, proc in pages.items():
        try:
            doms[key], _ = proc.communicate(timeout=BROWSER_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"chromium did not render {key} page within {BROWSER_S} s")
        assert proc.returncode == 0, f"chromium failed on {key} page"

    dom = doms["runs"]
    text = page_text(dom)
    # the runs table, not the GenAI overview (traces, token usage)
    assert title(dom).startswith("Runs"), (title(dom), text[:1500])
    assert "Token Usage" not in text and "matching runs" in text, text[:1500]
    for name in names:
        assert name in text, (name, text[:3000])
    # freqexp's metric columns are shown, with the logged values
    for key in ("val/auroc", "test/auroc"):
        assert key in text, (key, text[:3000])
        for run in runs:
            assert js_number(run.data.metrics[key]) in text, (key, run.data.metrics[key], text[:3000])

    dom = doms["artifacts"]
    text = page_text(dom)
    assert names[0] in text and "Artifacts" in text, text[:1500]
    for figure in figures:
        assert figure in text, (figure, text[:3000])
