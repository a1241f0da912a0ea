"""Resumable uploads from Python against the real amalgamd: an upload whose
server is killed (-9) mid-stream resumes by itself once the server is back."""

import hashlib
import threading
import time

import pytest
import torch

import amalgam
from amalgam import safetensors
from amalgam.v1 import amalgam_pb2 as pb
from conftest import start_amalgamd


class SlowClient(amalgam.Client):
    """Sends its chunks with a pause, so the test can act mid-upload."""

    def _upload_requests(self, header, opener, offset, bar, digest):
        self.first_offsets.append(offset)
        for request in super()._upload_requests(header, opener, offset, bar, digest):
            yield request
            time.sleep(0.01)


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(3)
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors.dumps({"w": torch.randn(1024, 2048)}))  # 8 MiB
    return path


def cut_after_first_mib(client, header, data):
    """Sends `header` and the first MiB of `data`, then ends the stream (no
    more bytes, no trailer): the server holds that MiB of the upload."""
    def first_mib():
        yield pb.UploadRequest(header=header)
        yield pb.UploadRequest(chunk=pb.UploadChunk(offset=0, data=data[:1 << 20]))

    with pytest.raises(Exception):
        client._artifacts.Upload(first_mib())
    assert client.get_upload(header.upload_id).committed_bytes == 1 << 20


def upload_through_a_kill(amalgamd_path, root, source, upload_id, kill_at):
    """Uploads `source` (resumable, as `upload_id`) on a thread through a
    server at `root` that is killed (-9) once it holds `kill_at` bytes of it
    and started again on the same port. Returns (client, result, process):
    the client, {"artifact": ...} or {"error": ...}, and the new server."""
    process, address = start_amalgamd(amalgamd_path, root)
    port = int(address.rsplit(":", 1)[1])
    # In one pass (hashed while sent, the digest in the trailer).
    client = SlowClient(address, chunk_size=64 << 10, retry_backoff=0.5, dedup_below=0)
    client.first_offsets = []
    result = {}

    def upload():
        try:
            result["artifact"] = client.upload_weights(source, upload_id=upload_id)
        except Exception as error:  # reported by the callers' assertions
            result["error"] = error

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        with amalgam.Client(address) as watcher:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if watcher.get_upload(upload_id).committed_bytes >= kill_at:
                        break
                except amalgam.AmalgamError:
                    pass
                time.sleep(0.01)
        process.kill()
        process.wait()
        # Same address, so the client's retries find it; the port may be
        # held for a moment after the kill.
        process, _ = start_amalgamd(amalgamd_path, root, port=port, attempts=25)
    finally:
        thread.join(timeout=60)
    return client, result, process


def test_upload_survives_a_server_killed_mid_stream(tmp_path, amalgamd_path, weights):
    client, result, process = upload_through_a_kill(amalgamd_path, tmp_path, weights,
                                                    "py-killed", 1 << 20)
    try:
        assert "error" not in result, result.get("error")
        artifact = result["artifact"]
        expected = hashlib.sha256(weights.read_bytes()).hexdigest()
        assert artifact.sha256 == expected
        assert client.download_bytes(artifact.id) == weights.read_bytes()
        assert len(client.first_offsets) >= 2
        assert client.first_offsets[0] == 0
        assert client.first_offsets[-1] >= 1 << 20, "the retry resumed, not restarted"
        # The finished upload remembers its artifact (for a lost response).
        assert client.get_upload("py-killed").artifact_id == artifact.id
    finally:
        client.close()
        process.kill()
        process.wait()


def test_a_cut_upload_resumes_from_another_client(tmp_path, server, weights):
    data = weights.read_bytes()
    header = pb.UploadHeader(
        kind=pb.ARTIFACT_KIND_WEIGHTS, name="w", size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(), upload_id="py-cut")

    def first_three_mib():
        yield pb.UploadRequest(header=header)
        for offset in range(0, 3 << 20, 1 << 20):
            yield pb.UploadRequest(chunk=pb.UploadChunk(
                offset=offset, data=data[offset:offset + (1 << 20)]))

    with amalgam.Client(server) as first:
        with pytest.raises(Exception) as cut:
            first._artifacts.Upload(first_three_mib())
        assert "resume upload py-cut from offset 3145728" in str(cut.value)
    with amalgam.Client(server) as second:
        assert second.get_upload("py-cut").committed_bytes == 3 << 20
        artifact = second.upload_weights(weights, name="w", upload_id="py-cut")
        assert second.download_bytes(artifact.id) == data


def test_rerunning_the_cli_resumes_an_upload_cut_in_python(tmp_path, server, cli_path,
                                                         weights):
    """Without an explicit id both clients derive the same one from the
    header, so the CLI finishes the upload that Python began."""
    import subprocess
    from amalgam.client import _derived_upload_id

    data = weights.read_bytes()
    header = pb.UploadHeader(kind=pb.ARTIFACT_KIND_WEIGHTS, name="rerun",
                             size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    header.upload_id = _derived_upload_id(header)

    with amalgam.Client(server) as client:
        cut_after_first_mib(client, header, data)
        run = subprocess.run([cli_path, "--server", server, "upload", "weights",
                              str(weights), "--name", "rerun"],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        artifact_id = run.stdout.strip().splitlines()[-1]
        assert client.get_upload(header.upload_id).artifact_id == artifact_id, \
            "the CLI used another upload"
        assert client.download_bytes(artifact_id) == data
