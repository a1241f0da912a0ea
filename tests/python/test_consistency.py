"""What the catalog promises under concurrency and failure, against the real
amalgamd: shares are never lost or resurrect a deleted artifact, a job's
results appear with SUCCEEDED and not before, non-finite results are not
published, and another organisation's job neither leaks its id nor holds an
artifact after its share is revoked."""

import threading
import time

import grpc
import pytest
import torch

import amalgam
from conftest import sqlite_only, start_with_tokens


@pytest.fixture
def tenants(tmp_path, amalgamd_path):
    """(address, tokens) of an amalgamd with organisations org-a and org-b,
    one worker and a pause after each merged tensor."""
    process, address, _ = start_with_tokens(
        amalgamd_path, tmp_path, ("org-a", "org-b"),
        ("--workers", "1", "--testing-step-delay", "200ms"))
    yield address
    process.terminate()
    process.wait(timeout=30)


def test_concurrent_shares_lose_no_grant(tenants):
    with amalgam.Client(tenants, token="tok-a") as a:
        artifact = a.upload_weights({"w": torch.ones(4)})
        organisations = [f"org-{i}" for i in range(24)]
        errors = []

        def share(org):
            try:
                a.share(artifact, org)
            except Exception as error:  # noqa: BLE001 (reported below)
                errors.append(error)

        threads = [threading.Thread(target=share, args=(org,)) for org in organisations]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert sorted(a.get_artifact(artifact).shared_with) == sorted(organisations)


def test_a_share_racing_a_delete_never_brings_the_artifact_back(tenants):
    with amalgam.Client(tenants, token="tok-a") as a:
        for i in range(40):
            artifact = a.upload_weights({"w": torch.full((4,), float(i))})
            barrier = threading.Barrier(2)

            def share():
                barrier.wait()
                try:
                    a.share(artifact, "org-b")
                except amalgam.AmalgamError as error:
                    assert error.code == grpc.StatusCode.NOT_FOUND

            thread = threading.Thread(target=share)
            thread.start()
            barrier.wait()
            a.delete(artifact)
            thread.join()
            with pytest.raises(amalgam.AmalgamError) as error:
                a.get_artifact(artifact)
            assert error.value.code == grpc.StatusCode.NOT_FOUND
        assert a.list_artifacts() == []


def test_a_running_sweeps_results_appear_only_with_succeeded(tenants):
    with amalgam.Client(tenants, token="tok-a") as a:
        # 4 tensors a model, 200 ms each: about 0.8 s a model, 3 models.
        m = [a.upload_weights({f"t{k}": torch.full((8,), float(i + k)) for k in range(4)},
                              name=f"m{i}") for i in range(2)]
        job = a.sweep(m[0], m[1], steps=3)
        seen_running = 0
        while True:
            # Listed first: if the job still runs after the list was taken,
            # the list must hold none of its results.
            listed = [x for x in a.list_artifacts() if x.produced_by_job]
            if job.refresh().state not in ("queued", "running"):
                break
            if job.state == "running" and job.job.progress.tensors_done > 4:
                seen_running += 1
                assert listed == []
                assert not job.job.result_ids
            time.sleep(0.05)
        assert seen_running > 0, "never saw the sweep past its first model"
        assert job.state == "succeeded"
        results = [x for x in a.list_artifacts() if x.produced_by_job == job.id]
        assert sorted(x.id for x in results) == sorted(job.result_ids)
        assert len(results) == 3


def test_a_non_finite_result_is_not_published(tenants):
    with amalgam.Client(tenants, token="tok-a") as a:
        ws = [a.upload_weights({"w": torch.full((4,), 10.0)}, name=f"w{i}") for i in range(2)]
        # float32 products overflow: F W is inf, and inf / inf is NaN.
        fs = [a.upload_fisher({"w": torch.full((4,), 3e38)}, for_weights=w) for w in ws]
        job = a.merge(ws, "fisher", fishers=fs)
        with pytest.raises(amalgam.AmalgamError) as error:
            job.wait()
        assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert 'tensor "w" holds a NaN or infinity' in error.value.message
        assert [x for x in a.list_artifacts() if x.produced_by_job] == []


def test_another_organisations_job_hides_its_id_and_yields_to_a_revoke(tenants):
    with amalgam.Client(tenants, token="tok-a") as a, \
            amalgam.Client(tenants, token="tok-b") as b:
        big = [a.upload_weights({f"t{k}": torch.ones(8) for k in range(20)}, name=f"big{i}")
               for i in range(2)]
        shared = a.upload_weights({"w": torch.ones(4)}, name="shared")
        a.share(shared, "org-b")
        mine = b.upload_weights({"w": torch.zeros(4)}, name="b's")
        blocker = a.merge(big, "average")          # holds the only worker for ~4 s
        queued = b.merge([shared, mine], "average")
        assert queued.refresh().state == "queued"
        with pytest.raises(amalgam.AmalgamError) as error:
            a.delete(shared)
        assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert queued.id not in error.value.message
        assert "organisation it is shared with" in error.value.message
        a.share(shared, "org-b", revoke=True)
        a.delete(shared)
        with pytest.raises(amalgam.AmalgamError) as error:
            queued.wait(timeout=60)
        assert error.value.code == grpc.StatusCode.NOT_FOUND
        blocker.wait(timeout=60)


@sqlite_only
def test_a_catalog_of_the_first_schema_is_migrated_with_its_shares(tmp_path, amalgamd_path):
    """A catalog written before the indexed columns existed (user_version 0):
    opened, its artifacts keep their owners and grants."""
    import hashlib
    import sqlite3
    import struct
    from amalgam.v1 import amalgam_pb2 as pb
    data = tmp_path / "data"
    (data / "blobs").mkdir(parents=True)
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    blob = struct.pack("<Q", len(header)) + header + bytes(4)
    sha = hashlib.sha256(blob).hexdigest()
    (data / "blobs" / sha).write_bytes(blob)
    db = sqlite3.connect(data / "catalog.db")
    for table in ("artifacts", "jobs"):
        db.execute(f"CREATE TABLE {table} (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL,"
                   " record BLOB NOT NULL)")
    for i, (owner, shared) in enumerate((("org-a", ["org-b"]), ("org-a", []), ("org-b", []))):
        record = pb.Artifact(id=f"art_{i}", kind=pb.ARTIFACT_KIND_WEIGHTS, owner=owner,
                             name=f"old{i}", size_bytes=len(blob), sha256=sha,
                             tensor_count=1, shared_with=shared)
        db.execute("INSERT INTO artifacts VALUES (?, ?, ?)",
                   (record.id, i, record.SerializeToString()))
    db.commit()
    db.close()
    process, address, _ = start_with_tokens(amalgamd_path, tmp_path,
                                            ("org-a", "org-b", "org-c"))
    try:
        seen = {}
        for token in ("tok-a", "tok-b", "tok-c"):
            with amalgam.Client(address, token=token) as client:
                seen[token] = sorted(a.name for a in client.list_artifacts())
        assert seen == {"tok-a": ["old0", "old1"], "tok-b": ["old0", "old2"], "tok-c": []}
        with amalgam.Client(address, token="tok-a") as a:
            a.delete("art_1")
            a.share("art_0", "org-b", revoke=True)
        with amalgam.Client(address, token="tok-b") as b:
            assert [x.name for x in b.list_artifacts()] == ["old2"]
            # The blob is still referenced by the other two rows.
            assert len(b.download_bytes("art_2")) == len(blob)
            # Stored before models had files: one model.safetensors.
            files = b.get_artifact("art_2").files
            assert [(f.name, f.size_bytes, f.sha256) for f in files] == [
                ("model.safetensors", len(blob), sha)]
    finally:
        process.terminate()
        process.wait(timeout=30)
    version = sqlite3.connect(data / "catalog.db").execute("PRAGMA user_version").fetchone()[0]
    # 1: artifact columns and shares; 2: the job queue; 3: the housekeeping
    # lease; 4: the contents of each artifact; 5: the tasks of jobs
    assert version == 5
