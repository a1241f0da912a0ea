"""Tenancy promises against the real amalgamd: another organisation's jobs
and artifacts look unknown to every call, token reloads take effect (and a
broken file keeps the old tokens), and shared content is stored once but
deleted only with its last artifact."""

import os
import signal
import time

import grpc
import pytest
import torch

import amalgam
from conftest import start_with_tokens


@pytest.fixture
def two_orgs(tmp_path, amalgamd_path):
    """(address, tokens file, data dir, process) with org-a and org-b."""
    process, address, tokens = start_with_tokens(
        amalgamd_path, tmp_path, ("org-a", "org-b"), ("--testing-step-delay", "100ms"))
    yield address, tokens, tmp_path / "data", process
    process.terminate()
    process.wait(timeout=30)


def not_found(call, *args, **kwargs):
    with pytest.raises(amalgam.AmalgamError) as error:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            next(result)
    assert error.value.code == grpc.StatusCode.NOT_FOUND, error.value
    return error.value.message


def test_another_organisations_jobs_and_artifacts_look_unknown(two_orgs):
    address = two_orgs[0]
    with amalgam.Client(address, token="tok-a") as a, \
            amalgam.Client(address, token="tok-b") as b:
        w = [a.upload_weights({f"t{k}": torch.full((4,), float(i)) for k in range(6)},
                              name=f"a{i}") for i in range(2)]
        mine = b.upload_weights({f"t{k}": torch.ones(4) for k in range(6)}, name="b")
        job = a.merge(w, "average")
        # Jobs: get, watch and cancel.
        assert not_found(b.job, job.id) == f"job {job.id} not found"
        pb = amalgam.client.pb
        with pytest.raises(grpc.RpcError) as error:
            next(b._jobs.WatchJob(pb.WatchJobRequest(id=job.id), metadata=b._metadata))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        not_found(b._call, b._jobs.CancelJob, pb.CancelJobRequest(id=job.id))
        # Artifacts: delete and share say NOT_FOUND (not PERMISSION_DENIED), so
        # existence does not leak; uploads may not describe them; grow and
        # sweep may not read them.
        for call in (lambda: b.delete(w[0]), lambda: b.share(w[0], "org-b")):
            assert not_found(call) == f"artifact {w[0].id} not found"
        not_found(b.upload_gram, {"t0": torch.eye(4, dtype=torch.float64)}, for_weights=w[0])
        not_found(b.grow, w[0], mine, layout="mlp")
        not_found(b.sweep, mine, w[1], steps=3)
        assert job.wait(timeout=60).state == "succeeded"
        # Unknown ids read the same.
        assert not_found(b.delete, "art_0000000000000000") == \
            "artifact art_0000000000000000 not found"


def wait_until(condition, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_sighup_drops_removed_tokens_and_keeps_the_old_ones_on_a_bad_file(two_orgs):
    address, tokens, _, process = two_orgs

    def works(token):
        try:
            with amalgam.Client(address, token=token) as client:
                client.list_artifacts()
            return True
        except amalgam.AmalgamError as error:
            assert error.code == grpc.StatusCode.UNAUTHENTICATED
            return False

    assert works("tok-b")
    tokens.write_text("tok-a org-a\n")
    process.send_signal(signal.SIGHUP)
    wait_until(lambda: not works("tok-b"), "a removed token still works after SIGHUP")
    assert works("tok-a")
    tokens.write_text("tok-a org-a\nthis line is malformed\n")
    process.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert works("tok-a"), "a malformed token file replaced the working tokens"
    assert process.poll() is None


def test_shared_content_is_stored_once_and_goes_with_its_last_artifact(two_orgs):
    address, _, data, _ = two_orgs
    model = {"w": torch.arange(16, dtype=torch.float32)}
    with amalgam.Client(address, token="tok-a") as a, \
            amalgam.Client(address, token="tok-b") as b:
        a1, a2 = a.upload_weights(model, name="a1"), a.upload_weights(model, name="a2")
        b1 = b.upload_weights(model, name="b1")
        assert a1.sha256 == a2.sha256 == b1.sha256
        assert len(os.listdir(data / "blobs")) == 1
        a.delete(a1)
        assert a.download_bytes(a2) == b.download_bytes(b1)
        b.delete(b1)
        assert len(a.download_bytes(a2)) == a2.size_bytes
        a.delete(a2)
    assert os.listdir(data / "blobs") == []
