"""Operations against the real amalgamd: Prometheus metrics, the standard
health service and server reflection (driven with stubs generated here from
the standard protocols, not with the project's client), and graceful drain."""

import importlib
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc
import pytest
import torch

import amalgam
from conftest import RESOLVED_DEVICE, ROOT, metrics_port, start_amalgamd

HERE = __import__("pathlib").Path(__file__).resolve().parent
HEALTH_PROTOS = HERE.parents[1] / "proto" / "grpc" / "health" / "v1"
REFLECTION_PROTOS = HERE / "protos"


@pytest.fixture(scope="module")
def standard_stubs(tmp_path_factory):
    """Python stubs for grpc.health.v1 and grpc.reflection.v1alpha."""
    out = tmp_path_factory.mktemp("stubs")
    for protos, name in ((HEALTH_PROTOS, "health.proto"),
                         (REFLECTION_PROTOS, "reflection.proto")):
        subprocess.run(["protoc", f"-I{protos}", f"--python_out={out}",
                        f"--grpc_python_out={out}",
                        "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin", name],
                       check=True)
    sys.path.insert(0, str(out))
    try:
        yield {name: importlib.import_module(name) for name in
               ("health_pb2", "health_pb2_grpc", "reflection_pb2", "reflection_pb2_grpc")}
    finally:
        sys.path.remove(str(out))


def scrape(port):
    """The metric samples as {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def sample(samples, name, **labels):
    """The sum of the samples of ``name`` whose labels include ``labels``
    (0 if there is none)."""
    total = 0.0
    for key, value in samples.items():
        match = re.fullmatch(r"([a-zA-Z_:]+)(?:\{(.*)\})?", key)
        if match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


def test_metrics_count_uploads_and_merges(tmp_path, amalgamd_path):
    process, address = start_amalgamd(amalgamd_path, tmp_path)
    try:
        port = metrics_port(tmp_path)
        before = scrape(port)
        upload = "/amalgam.v1.ArtifactService/Upload"
        torch.manual_seed(0)
        models = [{"w": torch.randn(64, 64), "b": torch.randn(64)} for _ in range(2)]
        with amalgam.Client(address) as client:
            ids = [client.upload_weights(m, name=f"m{i}") for i, m in enumerate(models)]
            uploaded = sum(a.size_bytes for a in ids)
            merged = client.merge(ids, "average")
            result = client.get_artifact(merged.wait().result_ids[0])
            downloaded = len(client.download_bytes(result))
        after = scrape(port)

        def delta(name, **labels):
            return sample(after, name, **labels) - sample(before, name, **labels)

        assert delta("amalgam_rpcs_total", method=upload, code="OK") == 2
        assert delta("amalgam_rpcs_total", method="/amalgam.v1.JobService/SubmitJob",
                     code="OK") == 1
        assert delta("amalgam_rpc_duration_seconds_count", method=upload) == 2
        assert delta("amalgam_received_bytes_total") == uploaded
        assert delta("amalgam_sent_bytes_total") == downloaded == result.size_bytes
        assert delta("amalgam_jobs_total", kind="merge", method="average",
                     state="succeeded") == 1
        assert delta("amalgam_job_duration_seconds_count", kind="merge") == 1
        assert delta("amalgam_job_output_bytes_total", kind="merge") == sum(
            t.numel() * 4 for t in models[0].values())
        assert sample(after, "amalgam_artifacts") == 3
        assert sample(after, "amalgam_stored_bytes") == uploaded + result.size_bytes
        assert sample(after, "amalgam_jobs_queued") == 0
        assert sample(after, "amalgam_uploads_in_progress") == 0
        assert sample(after, "amalgam_build_info", version="0.1.0") == 1
        assert sample(after, "amalgam_device_info", device=RESOLVED_DEVICE) == 1
        used = sample(after, "amalgam_device_memory_bytes", device=RESOLVED_DEVICE, kind="used")
        total = sample(after, "amalgam_device_memory_bytes", device=RESOLVED_DEVICE, kind="total")
        assert 1 << 20 < used < total
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_health_and_reflection_from_standard_stubs(server, standard_stubs, cli_path):
    health_pb2 = standard_stubs["health_pb2"]
    reflection_pb2 = standard_stubs["reflection_pb2"]
    with grpc.insecure_channel(server) as channel:
        health = standard_stubs["health_pb2_grpc"].HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = standard_stubs["reflection_pb2_grpc"].ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"amalgam.v1.ArtifactService", "amalgam.v1.JobService",
            "grpc.health.v1.Health"} <= names
    # The container health check.
    run = subprocess.run([cli_path, "--server", server, "health"], capture_output=True,
                         text=True, timeout=30)
    assert (run.returncode, run.stdout.strip()) == (0, "SERVING")


def test_with_tokens_reflection_is_not_served_and_health_stays_open(
        tmp_path, amalgamd_path, standard_stubs):
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-a org-a\n")
    process, address = start_amalgamd(amalgamd_path, tmp_path, extra=("--tokens", str(tokens)))
    try:
        with grpc.insecure_channel(address) as channel:
            reflection = standard_stubs["reflection_pb2_grpc"].ServerReflectionStub(channel)
            responses = reflection.ServerReflectionInfo(
                iter([standard_stubs["reflection_pb2"].ServerReflectionRequest(
                    list_services="")]), timeout=10)
            with pytest.raises(grpc.RpcError) as error:
                list(responses)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
            health = standard_stubs["health_pb2_grpc"].HealthStub(channel)
            request = standard_stubs["health_pb2"].HealthCheckRequest(service="")
            assert health.Check(request, timeout=10).status == \
                standard_stubs["health_pb2"].HealthCheckResponse.SERVING
    finally:
        process.terminate()
        process.wait(timeout=30)


JOB_STATES = amalgam.v1.amalgam_pb2


def _recovered(root):
    """The ``requeued=N`` of the last ``event=recover`` line in ``root``'s log."""
    lines = [line for line in (root / "server.log").read_text().splitlines()
             if "event=recover" in line]
    assert lines, "the server logged no recovery"
    return int(re.search(r"requeued=(\d+)", lines[-1]).group(1))


def test_progress_is_reported_in_order_and_never_decreases(tmp_path, amalgamd_path):
    process, address = start_amalgamd(amalgamd_path, tmp_path,
                                      extra=["--testing-step-delay", "100ms"])
    try:
        with amalgam.Client(address) as client:
            w = client.upload_weights({f"t{i}": torch.ones(4 + i) for i in range(6)}, name="w")
            job = client.merge([w, w], "average")
            events = list(job.events())
        states = [e.state for e in events]
        assert states == sorted(states), states  # QUEUED, RUNNING..., SUCCEEDED
        assert states[-1] == JOB_STATES.JOB_STATE_SUCCEEDED
        assert JOB_STATES.JOB_STATE_RUNNING in states
        partial = [e.progress for e in events if e.state == JOB_STATES.JOB_STATE_RUNNING
                   and 0 < e.progress.tensors_done < e.progress.tensors_total]
        assert partial, "no RUNNING event with 0 < done < total"
        assert all(0 < p.bytes_done < p.bytes_total for p in partial)
        for field in ("tensors_done", "bytes_done"):
            values = [getattr(e.progress, field) for e in events]
            assert values == sorted(values), (field, values)
        final = events[-1].progress
        assert final.tensors_done == final.tensors_total == 6
        assert final.bytes_done == final.bytes_total == sum(4 * (4 + i) for i in range(6))
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_sigterm_drains_running_jobs(tmp_path, amalgamd_path, standard_stubs):
    health_pb2 = standard_stubs["health_pb2"]
    process, address = start_amalgamd(amalgamd_path, tmp_path,
                                      extra=["--testing-step-delay", "300ms"])
    try:
        with amalgam.Client(address) as client:
            w = client.upload_weights({f"t{i}": torch.ones(4) for i in range(6)}, name="w")
            job = client.merge([w, w], "average")
            events = job.events()
            for snapshot in events:
                if snapshot.state == JOB_STATES.JOB_STATE_RUNNING:
                    break
            process.send_signal(signal.SIGTERM)
            with grpc.insecure_channel(address) as channel:
                health = standard_stubs["health_pb2_grpc"].HealthStub(channel)
                deadline = time.monotonic() + 5
                status = None
                while time.monotonic() < deadline:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                    time.sleep(0.02)
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(amalgam.AmalgamError) as refused:
                client.merge([w, w], "average")
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            # The stream opened before SIGTERM stays open through the drain,
            # and the draining server itself reports the job's success.
            rest = list(events)
            assert rest and rest[-1].state == JOB_STATES.JOB_STATE_SUCCEEDED
            assert rest[-1].progress.tensors_done == 6
            result = list(rest[-1].result_ids)
        assert process.wait(timeout=30) == 0
        # The job finished during the drain: the restart re-runs nothing.
        process, address = start_amalgamd(amalgamd_path, tmp_path)
        assert _recovered(tmp_path) == 0
        with amalgam.Client(address) as client:
            after = client.job(job.id)
            assert after.state == "succeeded"
            assert list(after.job.result_ids) == result
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_job_longer_than_the_drain_timeout_is_rerun_after_restart(tmp_path, amalgamd_path):
    # Six tensors, 2 s after each: a 12 s job against a 1 s drain.
    process, address = start_amalgamd(
        amalgamd_path, tmp_path, extra=["--testing-step-delay", "2s", "--drain-timeout", "1s"])
    try:
        with amalgam.Client(address) as client:
            w = client.upload_weights(
                {f"t{i}": torch.full((4,), float(i)) for i in range(6)}, name="w")
            job = client.merge([w, w], "average")
            for snapshot in job.events():
                if snapshot.state == JOB_STATES.JOB_STATE_RUNNING:
                    break
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - started < 8, "the drain waited for the whole job"
        process, address = start_amalgamd(amalgamd_path, tmp_path)
        assert _recovered(tmp_path) == 1
        with amalgam.Client(address) as client:
            rerun = client.job(job.id).wait(timeout=60)
            assert rerun.state == "succeeded"
            merged = rerun.state_dict()
        assert sorted(merged) == [f"t{i}" for i in range(6)]
        for i in range(6):
            assert torch.equal(merged[f"t{i}"], torch.full((4,), float(i)))
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_health_says_not_serving_while_the_catalog_is_unreachable(
        amalgamd_path, standard_stubs):
    health_pb2 = standard_stubs["health_pb2"]
    # A PostgreSQL of this test's own, to stop and start again.
    root = pathlib.Path(tempfile.mkdtemp(prefix="amalgam-health-"))
    root.chmod(0o755)
    postgres = ["bash", str(ROOT / "scripts" / "postgres.sh")]
    subprocess.run(postgres + ["start", str(root / "pg")], check=True)
    uri = f"postgresql://amalgam@/amalgam?host={root / 'pg' / 'sock'}"
    process, address = start_amalgamd(amalgamd_path, root, extra=["--catalog", uri])

    def health():
        with grpc.insecure_channel(address) as channel:
            stub = standard_stubs["health_pb2_grpc"].HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status

    def await_health(want, seconds):
        deadline = time.monotonic() + seconds
        while health() != want:
            assert time.monotonic() < deadline, f"health never became {want}"
            time.sleep(0.1)

    try:
        with amalgam.Client(address) as client:
            w = client.upload_weights({"w": torch.ones(3)}, name="kept")
            assert health() == health_pb2.HealthCheckResponse.SERVING
            subprocess.run(postgres + ["stop", str(root / "pg")], check=True)
            await_health(health_pb2.HealthCheckResponse.NOT_SERVING, 10)
            with pytest.raises(amalgam.AmalgamError) as down:
                client.list_artifacts()
            assert down.value.code == grpc.StatusCode.UNAVAILABLE
            assert "catalog" in str(down.value)
            subprocess.run(postgres + ["resume", str(root / "pg")], check=True)
            # Reconnection backs off to at most 10 s between attempts.
            await_health(health_pb2.HealthCheckResponse.SERVING, 30)
            assert [a.id for a in client.list_artifacts()] == [w.id]
    finally:
        process.terminate()
        process.wait(timeout=30)
        subprocess.run(postgres + ["stop", str(root / "pg")], check=False,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)


def test_blas_core_flag_restarts_with_those_kernels_and_threads_flag_holds(
        tmp_path, amalgamd_path):
    """--blas-core NAME re-executes amalgamd with OPENBLAS_CORETYPE (read only
    when OpenBLAS loads), checks a GEMM, logs and exports the core in use."""
    process, address = start_amalgamd(amalgamd_path, tmp_path,
                                      extra=("--blas-core", "Haswell", "--threads", "1"))
    try:
        port = metrics_port(tmp_path)
        info = [k for k in scrape(port) if k.startswith("amalgam_blas_info{")]
        assert len(info) == 1 and 'core="Haswell"' in info[0], info
        with amalgam.Client(address) as client:
            w = client.upload_weights({"w": torch.ones(8, 8)})
            assert client.merge([w, w], "average").wait().state == "succeeded"
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
    log = (tmp_path / "server.log").read_text()
    assert re.search(r"event=blas .*core=Haswell reason=\"chosen over \w+: --blas-core "
                     r"Haswell\" gemm_check=ok", log), log
    assert "event=threads intra_op=1 source=--threads" in log
    # Idle OpenMP threads sleep instead of spinning against OpenBLAS.
    assert "omp_wait_policy=PASSIVE" in log
    assert "intra-op threads: 1" in log
