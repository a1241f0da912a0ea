"""The Grafana dashboard's queries, evaluated by a real Prometheus (Debian's
`prometheus`, scraping amalgamd every second on loopback) after uploads and
every job kind: each query returns series, and "Jobs finished" counts each
job, the first of every label set included."""

import json
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import torch

import amalgam
from conftest import ROOT, metrics_port, start_amalgamd

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port, expr, at=None):
    """Evaluates `expr` now, or at Unix time `at`."""
    params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(params)
    answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


@pytest.fixture
def prometheus(tmp_path):
    """Starts Prometheus with a 1 s scrape of the target given to the returned
    function; yields that function, which returns Prometheus's port."""
    if not pathlib.Path(PROMETHEUS).exists():
        pytest.fail("prometheus is not installed: run scripts/setup.sh")
    processes = []

    def start(target):
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: amalgamd\n    static_configs: [{{targets: ['{target}']}}]\n")
        log = open(tmp_path / "prometheus.log", "wb")
        processes.append(subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while True:
            try:
                up = query(port, 'up{job="amalgamd"}')
                if up and up[0]["value"][1] == "1":
                    return port
            except OSError:
                pass
            assert processes[-1].poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "Prometheus never scraped amalgamd"
            time.sleep(0.2)

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


def test_every_dashboard_query_returns_series_and_counts_each_job(
        tmp_path, amalgamd_path, prometheus):
    process, address = start_amalgamd(amalgamd_path, tmp_path)
    try:
        port = prometheus(f"127.0.0.1:{metrics_port(tmp_path)}")
        time.sleep(2)  # a few scrapes before the first job
        subprocess.run(["/usr/bin/python3", str(ROOT / "scripts/make_demo_models.py"),
                        str(tmp_path / "demo"), "--count", "2"], check=True,
                       stdout=subprocess.DEVNULL)
        demo = tmp_path / "demo"
        ran = {}
        with amalgam.Client(address) as client:
            w = [client.upload_weights(str(demo / f"model_{i}.safetensors")) for i in range(2)]
            g = [client.upload_gram(str(demo / f"gram_{i}.safetensors"), for_weights=w[i])
                 for i in range(2)]
            f = [client.upload_fisher(str(demo / f"fisher_{i}.safetensors"), for_weights=w[i])
                 for i in range(2)]
            jobs = [("merge", "average", client.merge(w, "average")) for _ in range(3)]
            jobs += [("merge", "weighted", client.merge(w, "weighted", coefficients=[1, 2])),
                     ("merge", "fisher", client.merge(w, "fisher", fishers=f)),
                     ("merge", "regmean", client.merge(w, "regmean", grams=g)),
                     ("grow", "-", client.grow(w[0], w[1], layout="mlp")),
                     ("sweep", "-", client.sweep(w[0], w[1], steps=3))]
            for kind, method, job in jobs:
                assert job.wait(timeout=120).state == "succeeded"
                ran[(kind, method)] = ran.get((kind, method), 0) + 1
        time.sleep(3)  # scraped after the last job

        dashboard = json.loads((ROOT / "deploy/grafana/dashboards/amalgam.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                assert query(port, target["expr"]), f"{panel['title']}: {target['expr']} is empty"

        # The dashboard's increase() extrapolates past the last sample by less
        # than 1.1 average scrape intervals, and not at all before a first
        # sample of 0 (Prometheus's extrapolatedRate): with n samples it reads
        # between the count and count * (1 + 1.1 / (n - 1)). The raw samples,
        # read at the same instant, must hold the count exactly.
        at = time.time()
        finished = next(t["expr"] for p in dashboard["panels"] for t in p["targets"]
                        if p["title"].startswith("Jobs finished"))
        shown = {}
        for series in query(port, finished, at):
            labels = series["metric"]
            shown[(labels["kind"], labels["method"], labels["state"])] = float(series["value"][1])
        samples = {}
        for series in query(port, "amalgam_jobs_total[1h]", at):
            labels = series["metric"]
            samples[(labels["kind"], labels["method"], labels["state"])] = [
                float(v) for _, v in series["values"]]
        assert samples.keys() == shown.keys()
        for key, values in samples.items():
            count = ran.get(key[:2], 0) if key[2] == "succeeded" else 0
            assert values[0] == 0, f"{key}: first scraped at {values[0]}, not 0"
            assert values[-1] == count, f"{key}: counted {values[-1]}, {count} ran"
            assert len(values) >= 2, f"{key}: scraped {len(values)} times"
            bound = count * (1 + 1.1 / (len(values) - 1))
            assert count * (1 - 1e-12) <= shown[key] <= bound, \
                f"{key}: the dashboard shows {shown[key]} for {count} jobs ({len(values)} samples)"
        assert sum(ran.values()) == len(jobs)
    finally:
        process.terminate()
        process.wait(timeout=30)
