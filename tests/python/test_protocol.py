"""The upload protocol and its bookkeeping, driven with raw stubs against the
real amalgamd: misplaced chunks, excess bytes, a repeated header, a bad
digest on a resumable upload, start-up reconciliation of uploads/, corrupted
blobs, and the metrics that count errors and work in flight."""

import hashlib
import json
import struct
import threading
import time

import grpc
import pytest

import amalgam
from amalgam.v1 import amalgam_pb2 as pb
from amalgam.v1 import amalgam_pb2_grpc as pb_grpc
from conftest import metrics_port, sqlite_only, start_amalgamd
from test_operations import sample, scrape


def safetensors_bytes(values=4):
    header = json.dumps({"w": {"dtype": "F32", "shape": [values],
                               "data_offsets": [0, 4 * values]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(4 * values)


def header_for(data, upload_id=""):
    return pb.UploadHeader(kind=pb.ARTIFACT_KIND_WEIGHTS, name="raw", size_bytes=len(data),
                           sha256=hashlib.sha256(data).hexdigest(), upload_id=upload_id)


def upload(address, messages):
    """Sends ``messages`` on one Upload stream; returns the RpcError raised."""
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.ArtifactServiceStub(channel).Upload(iter(messages), timeout=30)
    return error.value


@pytest.fixture
def own_server(tmp_path, amalgamd_path):
    process, address = start_amalgamd(amalgamd_path, tmp_path,
                                      extra=("--testing-step-delay", "300ms"))
    yield process, address, tmp_path
    process.terminate()
    process.wait(timeout=30)


def test_misplaced_excess_and_repeated_messages_are_refused(server):
    data = safetensors_bytes()
    chunk = lambda offset, data: pb.UploadRequest(  # noqa: E731
        chunk=pb.UploadChunk(offset=offset, data=data))
    error = upload(server, [pb.UploadRequest(header=header_for(data)), chunk(8, data)])
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "chunk offset 8 but the server holds 0 bytes" in error.details()
    error = upload(server, [pb.UploadRequest(header=header_for(data)), chunk(0, data + b"x")])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than the declared size_bytes" in error.details()
    error = upload(server, [pb.UploadRequest(header=header_for(data)),
                            pb.UploadRequest(header=header_for(data))])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header sent twice" in error.details()
    # A resumable upload told the wrong offset is ABORTED (the client re-asks).
    error = upload(server, [pb.UploadRequest(header=header_for(data, "resume-me")),
                            chunk(4, data)])
    assert error.code() == grpc.StatusCode.ABORTED


def test_a_bad_digest_discards_a_resumable_upload(server):
    data = safetensors_bytes()
    header = header_for(data, "bad-digest-1")
    header.sha256 = hashlib.sha256(b"something else").hexdigest()
    error = upload(server, [pb.UploadRequest(header=header),
                            pb.UploadRequest(chunk=pb.UploadChunk(offset=0, data=data))])
    assert error.code() == grpc.StatusCode.DATA_LOSS
    with amalgam.Client(server) as client:
        with pytest.raises(amalgam.AmalgamError) as missing:
            client.get_upload("bad-digest-1")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        assert all(a.name != "raw" for a in client.list_artifacts())


@sqlite_only
def test_restart_removes_orphan_upload_files_and_rows(own_server, amalgamd_path):
    process, address, root = own_server
    data = safetensors_bytes(1 << 10)
    # A partial upload (row and file), then a file without a row and a row
    # without its file.
    upload(address, [pb.UploadRequest(header=header_for(data, "kept")),
                     pb.UploadRequest(chunk=pb.UploadChunk(offset=0, data=data[:100]))])
    upload(address, [pb.UploadRequest(header=header_for(data, "rowless")),
                     pb.UploadRequest(chunk=pb.UploadChunk(offset=0, data=data[:50]))])
    uploads = root / "data" / "uploads"
    files = {p.name for p in uploads.iterdir()}
    assert len(files) == 2
    process.terminate()
    process.wait(timeout=30)
    # Take "rowless"'s file name out of the catalog's view by deleting its row,
    # and add a stray file.
    import sqlite3
    db = sqlite3.connect(root / "data" / "catalog.db")
    db.execute("DELETE FROM uploads WHERE id = 'rowless'")
    db.execute("INSERT INTO uploads (owner, id, updated_at, header) VALUES "
               "('local', 'fileless', 0, ?)",
               (header_for(data, "fileless").SerializeToString(),))
    db.commit()
    db.close()
    (uploads / "stray").write_bytes(b"junk")
    process, address = start_amalgamd(amalgamd_path, root)
    try:
        with amalgam.Client(address) as client:
            assert client.get_upload("kept").committed_bytes == 100
            for gone in ("rowless", "fileless"):
                with pytest.raises(amalgam.AmalgamError) as error:
                    client.get_upload(gone)
                assert error.value.code == grpc.StatusCode.NOT_FOUND
        assert len(list(uploads.iterdir())) == 1
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_flipped_byte_in_a_blob_is_data_loss_in_python_and_the_cli(
        own_server, tmp_path, cli_path):
    import subprocess
    import torch
    _, address, root = own_server
    with amalgam.Client(address) as client:
        artifact = client.upload_weights({"w": torch.arange(1024, dtype=torch.float32)})
        blob = root / "data" / "blobs" / artifact.sha256
        raw = bytearray(blob.read_bytes())
        raw[-1] ^= 0xFF
        blob.write_bytes(bytes(raw))
        with pytest.raises(amalgam.AmalgamError) as error:
            client.download_bytes(artifact)
        assert error.value.code == grpc.StatusCode.DATA_LOSS
    run = subprocess.run([cli_path, "--server", address, "download", artifact.id, "--out",
                          str(tmp_path / "x.safetensors")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1
    assert "DATA_LOSS" in run.stderr, run.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_metrics_count_errors_and_show_work_in_flight(own_server):
    import torch
    _, address, root = own_server
    port = metrics_port(root)
    with amalgam.Client(address) as client:
        with pytest.raises(amalgam.AmalgamError):
            client.get_artifact("art_0000000000000000")
        models = [client.upload_weights({f"t{k}": torch.full((64,), float(i)) for k in range(8)},
                                        name=f"m{i}") for i in range(2)]
        job = client.merge(models, "average")
        queued = client.merge(models, "average")  # one worker: waits for the first
        # An upload held open while the merge (8 tensors x 300 ms) runs.
        data = safetensors_bytes(1 << 12)
        release = threading.Event()

        def slow_upload():
            def messages():
                yield pb.UploadRequest(header=header_for(data, "slow-1"))
                yield pb.UploadRequest(chunk=pb.UploadChunk(offset=0, data=data[:10]))
                release.wait(30)
                yield pb.UploadRequest(chunk=pb.UploadChunk(offset=10, data=data[10:]))
            with grpc.insecure_channel(address) as channel:
                pb_grpc.ArtifactServiceStub(channel).Upload(messages(), timeout=60)

        thread = threading.Thread(target=slow_upload)
        thread.start()
        deadline = time.monotonic() + 10
        seen = {}
        names = ("amalgam_jobs_running", "amalgam_jobs_queued", "amalgam_uploads_in_progress")
        while time.monotonic() < deadline and len(seen) < len(names):
            samples = scrape(port)
            for name in names:
                if sample(samples, name) > 0:
                    seen[name] = True
            time.sleep(0.05)
        release.set()
        thread.join()
        assert job.wait(timeout=60).state == "succeeded"
        assert queued.wait(timeout=60).state == "succeeded"
        assert seen == {name: True for name in names}
    samples = scrape(port)
    assert sample(samples, "amalgam_rpcs_total", method="/amalgam.v1.ArtifactService/GetArtifact",
                  code="NOT_FOUND") == 1
