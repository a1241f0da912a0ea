"""Sweeps against the real amalgamd: a sweep killed (kill -9) or cancelled
midway leaves no stray results, the re-run after a restart publishes
exactly its models, and the inner models match (1 - t) A + t B in float64."""

import time

import grpc
import numpy as np
import pytest
import torch

import amalgam
from conftest import start_amalgamd


def wait_for_progress(job, tensors, timeout=60):
    """Polls until ``job`` has merged ``tensors`` tensors (a deadline, no
    fixed sleep); it must still be running then."""
    deadline = time.monotonic() + timeout
    while job.refresh().job.progress.tensors_done < tensors:
        assert job.state in ("queued", "running"), job.state
        assert time.monotonic() < deadline, "the sweep made no progress"
        time.sleep(0.02)


def test_a_sweep_killed_midway_reruns_to_exactly_its_results(tmp_path, amalgamd_path):
    flags = ("--testing-step-delay", "100ms")
    process, address = start_amalgamd(amalgamd_path, tmp_path, extra=flags)
    torch.manual_seed(11)
    a_model = {f"t{k}": torch.randn(8, 4) for k in range(5)}
    b_model = {f"t{k}": torch.randn(8, 4) for k in range(5)}
    try:
        with amalgam.Client(address) as client:
            a = client.upload_weights(a_model, name="a")
            b = client.upload_weights(b_model, name="b")
            job = client.sweep(a, b, steps=5, name="path")
            # Killed after two of the five models are written.
            wait_for_progress(job, 12)
            assert [x for x in client.list_artifacts() if x.produced_by_job] == []
        process.kill()
        process.wait()
        process, address = start_amalgamd(amalgamd_path, tmp_path, extra=flags)
        with amalgam.Client(address) as client:
            done = client.job(job.id).wait(timeout=120)
            assert done.state == "succeeded"
            results = [x for x in client.list_artifacts() if x.produced_by_job]
            assert sorted(x.id for x in results) == sorted(done.result_ids)
            assert len(results) == 5
            models = dict(done.models())
            for t, model in models.items():
                for name in a_model:
                    want = ((1 - t) * a_model[name].double() + t * b_model[name].double())
                    got = model[name].double()
                    assert np.abs((got - want).numpy()).max() <= 1e-6 * want.abs().max().item(), \
                        (t, name)
            assert torch.equal(models[0.0]["t0"], a_model["t0"])
            assert torch.equal(models[1.0]["t0"], b_model["t0"])
            # The midpoint is the average merge, bit for bit (docs/architecture.md).
            average = client.merge([a, b], "average").state_dict()
            assert all(torch.equal(models[0.5][name], average[name]) for name in a_model)

            cancelled = client.sweep(a, b, steps=5, name="cancelled")
            wait_for_progress(cancelled, 12)
            cancelled.cancel()
            with pytest.raises(amalgam.AmalgamError) as error:
                cancelled.wait(timeout=60)
            assert error.value.code == grpc.StatusCode.CANCELLED
            assert cancelled.refresh().state == "cancelled"
            assert [x for x in client.list_artifacts() if x.produced_by_job == cancelled.id] == []
    finally:
        process.terminate()
        process.wait(timeout=30)
