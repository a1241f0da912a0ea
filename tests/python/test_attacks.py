"""The security review's attacks, each against the real amalgamd: every one
must be refused with the fitting code while the server keeps serving."""

import json
import os
import re
import struct
import time
import urllib.request

import grpc
import pytest

import amalgam
from conftest import metrics_port, start_amalgamd, start_with_tokens


@pytest.fixture
def fresh_server(tmp_path, amalgamd_path):
    """(address, root) of an amalgamd of the test's own, with a token file."""
    process, address, _ = start_with_tokens(amalgamd_path, tmp_path)
    yield address, tmp_path
    process.terminate()
    assert process.wait(timeout=30) == 0, "amalgamd did not exit 0 on SIGTERM"


def refused_upload(address, path, header):
    """Uploads a file of ``header`` (bytes, or a dict written as JSON) and
    4 data bytes as org-a's weights; returns the AmalgamError it must raise."""
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with amalgam.Client(address, token="tok-a") as client:
        with pytest.raises(amalgam.AmalgamError) as error:
            client.upload_weights(str(path))
        # Nothing made, and still serving.
        assert client.list_artifacts() == []
    return error.value


def metrics_text(root):
    url = f"http://127.0.0.1:{metrics_port(root)}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()


def test_h1_a_deeply_nested_shape_is_refused_and_the_server_lives(fresh_server, tmp_path):
    address, _ = fresh_server
    deep = (b'{"t":{"dtype":"F32","shape":' + b"[" * 60000 + b"]" * 60000 +
            b',"data_offsets":[0,4]}}')
    error = refused_upload(address, tmp_path / "deep.safetensors", deep)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "deeper than 3 levels" in error.message
    assert "[[[" not in error.message


def test_h2_made_up_methods_neither_grow_metrics_nor_the_log(fresh_server):
    address, root = fresh_server
    before = len(metrics_text(root))
    log_before = (root / "server.log").stat().st_size
    calls = 300
    with grpc.insecure_channel(address) as channel:
        for i in range(calls):
            method = "/" + "".join(chr(ord("a") + (i + j) % 26) for j in range(4096))
            call = channel.unary_unary(method)
            with pytest.raises(grpc.RpcError) as error:
                call(b"", timeout=10)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    text = metrics_text(root)
    assert len(text) < before + 4096, f"/metrics grew from {before} to {len(text)} bytes"
    # (A replica of a cluster labels its own counts with its name.)
    assert re.search(r'amalgam_rpcs_total\{(replica="[^"]*",)?code="UNIMPLEMENTED",'
                     rf'method="unknown"\}} {calls}\n', text), text[:2000]
    grown = (root / "server.log").stat().st_size - log_before
    # One bounded line per call: the path is cut to 512 bytes.
    assert grown < calls * 1024, f"the log grew by {grown} bytes for {calls} calls"


def test_log_fields_from_callers_are_escaped(fresh_server, tmp_path):
    """A tensor name with quotes reaches the upload_failed line's error field;
    it must stay inside that one field (names with control characters are
    refused before any message names them)."""
    address, root = fresh_server
    name = 'x" forged=1 event="fake'
    error = refused_upload(address, tmp_path / "m.safetensors",
                           {name: {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}})
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert name in error.message
    lines = (root / "server.log").read_text().splitlines()
    failed = [line for line in lines if "event=upload_failed" in line]
    assert len(failed) == 1, failed
    # Parsed as the fields were given: the forged ones are inside error="...".
    fields = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', failed[0].split(" ", 2)[2])
    assert [key for key, _ in fields] == ["event", "owner", "code", "error"], fields
    assert '\\" forged=1 event=\\"fake' in dict(fields)["error"]

    error = refused_upload(address, tmp_path / "n.safetensors",
                           {"a\nINFO event=fake": {"dtype": "F32", "shape": [1],
                                                   "data_offsets": [0, 4]}})
    assert "holds the control character 0x0a at byte 1 of its name" in error.message
    assert "\nINFO event=fake" not in (root / "server.log").read_text()


def weights(size_bytes, seed):
    """An in-memory model of ``size_bytes`` of float32 random values."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.rand(size_bytes // 4, generator=generator)}


def test_h3_quota_counts_artifacts_partial_uploads_and_job_outputs(tmp_path, amalgamd_path):
    import hashlib
    from amalgam.v1 import amalgam_pb2 as pb
    from amalgam.v1 import amalgam_pb2_grpc as pb_grpc
    process, address, _ = start_with_tokens(amalgamd_path, tmp_path, ("org-a", "org-b"),
                                            ("--quota-bytes-per-org", "300000"))
    try:
        with amalgam.Client(address, token="tok-a") as a:
            first = a.upload_weights(weights(100000, 1))
            # Two 100 KB models merge into a 100 KB result: 300 KB with it.
            second = a.upload_weights(weights(100000, 2))
            with pytest.raises(amalgam.AmalgamError) as error:
                a.merge([first, second], "average")
            assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "organisation org-a" in error.value.message
            assert "quota of 300000 bytes" in error.value.message
            a.delete(second)
            # A partial upload holds its declared size.
            data = bytes(120000)
            header = pb.UploadHeader(kind=pb.ARTIFACT_KIND_WEIGHTS, name="partial",
                                     size_bytes=len(data), upload_id="partial-1",
                                     sha256=hashlib.sha256(data).hexdigest())
            stub = pb_grpc.ArtifactServiceStub(a._channel)
            with pytest.raises(grpc.RpcError):
                stub.Upload(iter([pb.UploadRequest(header=header),
                                  pb.UploadRequest(chunk=pb.UploadChunk(offset=0, data=data[:1000]))]),
                            metadata=(("authorization", "Bearer tok-a"),))
            with pytest.raises(amalgam.AmalgamError) as error:
                a.upload_weights(weights(100000, 3))
            assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "holds 220" in error.value.message, error.value.message
        with amalgam.Client(address, token="tok-b") as b:
            # Another organisation's quota is its own.
            b.upload_weights(weights(100000, 4))
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 24 MiB tmpfs, mounted for the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    import subprocess
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory):
    """Writes files in ``directory`` until the filesystem is full."""
    fd = os.open(directory / f"filler-{len(os.listdir(directory))}",
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for block in (1 << 16, 1):
            try:
                while True:
                    os.write(fd, bytes(block))
            except OSError:
                pass
    finally:
        os.close(fd)


def test_h3_a_full_disk_is_freed_by_delete_and_serves_writes_again(
        small_filesystem, tmp_path, amalgamd_path):
    data_dir = small_filesystem / "data"
    process, address = start_amalgamd(amalgamd_path, tmp_path, extra=(
        "--data-dir", str(data_dir), "--disk-reserve-bytes", str(1 << 20)))
    try:
        with amalgam.Client(address) as client:
            big = client.upload_weights(weights(8 << 20, 1))
            # More than the volume has: refused before a byte is written.
            with pytest.raises(amalgam.AmalgamError) as error:
                client.upload_weights(weights(20 << 20, 2))
            assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "does not fit" in error.value.message
            assert str(small_filesystem) not in error.value.message
            client.upload_weights(weights(1 << 20, 3))
            fill(small_filesystem)
            with pytest.raises(amalgam.AmalgamError) as error:
                client.upload_weights(weights(1 << 16, 4))
            assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Deleting frees the disk although the catalog cannot grow first.
            client.delete(big)
            small = client.upload_weights(weights(1 << 16, 4))
            merged = client.merge([small, small], "average").wait()
            assert merged.state == "succeeded", merged
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
    # A restart on the full volume serves too.
    fill(small_filesystem)
    process, address = start_amalgamd(amalgamd_path, tmp_path, extra=(
        "--data-dir", str(data_dir), "--disk-reserve-bytes", str(1 << 20)))
    try:
        with amalgam.Client(address) as client:
            assert len(client.list_artifacts()) == 3
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_gram_with_a_negative_diagonal_entry_is_refused(client):
    import torch
    w = client.upload_weights({"lin.weight": torch.ones(3, 4)})
    gram = torch.eye(4, dtype=torch.float64)
    gram[2, 2] = -1e-3
    with pytest.raises(amalgam.AmalgamError) as error:
        client.upload_gram({"lin.weight": gram}, for_weights=w)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert 'Gram "lin.weight" has a negative diagonal entry at [2, 2]' in error.value.message
    # Off-diagonal entries may be negative.
    gram[2, 2], gram[0, 1], gram[1, 0] = 1.0, -0.5, -0.5
    client.upload_gram({"lin.weight": gram}, for_weights=w)


def test_streams_and_fan_in_are_bounded_per_organisation(tmp_path, amalgamd_path):
    from amalgam.v1 import amalgam_pb2 as pb
    from amalgam.v1 import amalgam_pb2_grpc as pb_grpc
    process, address = start_amalgamd(amalgamd_path, tmp_path, extra=(
        "--max-downloads-per-org", "2", "--max-models-per-job", "3"))
    try:
        with amalgam.Client(address) as client:
            big = client.upload_weights(weights(16 << 20, 1))
            stub = pb_grpc.ArtifactServiceStub(client._channel)
            open_calls = []
            for _ in range(2):
                call = stub.Download(pb.DownloadRequest(artifact_id=big.id))
                next(call)  # streaming, and not read further
                open_calls.append(call)
            third = stub.Download(pb.DownloadRequest(artifact_id=big.id))
            with pytest.raises(grpc.RpcError) as error:
                next(third)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "organisation local already has 2 downloads" in error.value.details()
            open_calls.pop().cancel()
            deadline = time.monotonic() + 10
            while True:  # the slot returns once the server sees the cancel
                try:
                    assert len(client.download_bytes(big)) == big.size_bytes
                    break
                except amalgam.AmalgamError as busy:
                    assert busy.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline, "the cancelled stream kept its slot"
                    time.sleep(0.05)
            open_calls.pop().cancel()

            small = [client.upload_weights(weights(64, i), name=f"s{i}") for i in range(4)]
            with pytest.raises(amalgam.AmalgamError) as error:
                client.merge(small, "average")
            assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "at most 3 in one job (--max-models-per-job)" in error.value.message
            assert client.merge(small[:3], "average").wait().state == "succeeded"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_oversized_metadata_is_refused_and_creates_no_artifact(fresh_server, tmp_path):
    address, _ = fresh_server
    error = refused_upload(address, tmp_path / "meta.safetensors", {
        "__metadata__": {"blob": "x" * (100 << 10)},
        "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "__metadata__ holds 102404 bytes" in error.message
    assert "at most 65536" in error.message


def test_names_are_validated_and_server_paths_never_shown(fresh_server, tmp_path):
    import torch
    address, root = fresh_server
    with amalgam.Client(address, token="tok-a") as client:
        for name, why in (("a/b", "control character or '/'"), ("x" * (1 << 20), "bytes; at most 256"),
                          ("..", 'may not be "." or ".."'), ("tab\there", "control character")):
            with pytest.raises(amalgam.AmalgamError) as error:
                client.upload_weights({"w": torch.ones(2)}, name=name)
            assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert why in error.value.message and "header.name" in error.value.message
        a = client.upload_weights({"w": torch.ones(2)}, name="a")
        b = client.upload_weights({"w": torch.zeros(2)}, name="b")
        with pytest.raises(amalgam.AmalgamError) as error:
            client.sweep(a, b, steps=2, name="../../etc/evil")
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "result_name" in error.value.message
        # A blob lost behind the server's back: DATA_LOSS naming the model's
        # file, without the blob's path.
        for blob in (root / "data" / "blobs").iterdir():
            blob.unlink()
        with pytest.raises(amalgam.AmalgamError) as error:
            client.get_artifact(a)
        assert error.value.code == grpc.StatusCode.DATA_LOSS
        assert str(root) not in error.value.message
        assert "cannot open model.safetensors" in error.value.message
        assert "blobs" not in error.value.message
        with pytest.raises(amalgam.AmalgamError) as error:
            client.merge([a, b], "average")
        assert error.value.code == grpc.StatusCode.DATA_LOSS
        assert str(root) not in error.value.message


def test_a_jobs_output_is_bounded_at_submission(tmp_path, amalgamd_path):
    """Growth multiplies sizes (hidden-to-hidden layers become 4x): a result
    over --max-upload-bytes is refused before it is written."""
    import torch
    process, address = start_amalgamd(amalgamd_path, tmp_path, extra=(
        "--max-upload-bytes", "150000"))
    try:
        with amalgam.Client(address) as client:
            model = {"0.weight": torch.ones(100, 100), "2.weight": torch.ones(100, 100),
                     "4.weight": torch.ones(100, 100)}
            a = client.upload_weights(model, name="a")
            with pytest.raises(amalgam.AmalgamError) as error:
                client.grow(a, a, layout="mlp")
            assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "this server writes at most 150000 bytes per artifact" in error.value.message
            assert [x for x in client.list_artifacts() if x.produced_by_job] == []
    finally:
        process.terminate()
        process.wait(timeout=30)
