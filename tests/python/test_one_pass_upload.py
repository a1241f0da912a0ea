"""Uploads in one pass: files are hashed while they are sent and the digest
comes last, in the stream's trailer; resumes check the bytes held."""

import hashlib
import os
import subprocess

import grpc
import pytest
import torch

import amalgam
from amalgam import client as client_module
from amalgam.v1 import amalgam_pb2 as pb
from test_resume import cut_after_first_mib


class RecordingClient(amalgam.Client):
    """Records the kind of each message it sends."""

    def _upload_requests(self, header, opener, offset, bar, digest):
        for request in super()._upload_requests(header, opener, offset, bar, digest):
            self.sent.append(request.WhichOneof("payload"))
            if request.HasField("header"):
                self.headers.append(request.header)
            yield request


def _random_file(path, mib):
    g = torch.Generator().manual_seed(mib)
    path.write_bytes(torch.randn(mib << 18, generator=g).numpy().tobytes())
    return path


def test_a_large_upload_reads_each_byte_once_and_sends_its_digest_last(
        server, tmp_path, monkeypatch):
    from amalgam import safetensors
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors.dumps({"w": torch.randn(1024, 2048, generator=g)}))
    read = []
    real_read = client_module._ConcatenatedFiles.read
    monkeypatch.setattr(client_module._ConcatenatedFiles, "read",
                        lambda self, n: read.append(real_read(self, n)) or read[-1])
    with RecordingClient(server, dedup_below=0) as client:
        client.sent, client.headers = [], []
        artifact = client.upload_weights(path)
    data = path.read_bytes()
    assert sum(len(block) for block in read) == len(data), "each byte read once"
    assert client.headers[0].sha256 == ""
    assert client.sent[0] == "header" and client.sent[-1] == "trailer"
    assert set(client.sent[1:-1]) == {"chunk"}
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    # Small files (and dedup=True) are hashed first: the digest in the header.
    with RecordingClient(server) as client:
        client.sent, client.headers = [], []
        again = client.upload_weights(path, name="again")
    assert client.headers[0].sha256 == artifact.sha256 and "trailer" not in client.sent
    assert again.sha256 == artifact.sha256


def test_resuming_a_file_that_changed_is_refused_naming_it(server, tmp_path):
    path = _random_file(tmp_path / "w.bin", 4)
    data = path.read_bytes()
    header = pb.UploadHeader(kind=pb.ARTIFACT_KIND_WEIGHTS, name="changing",
                             size_bytes=len(data), upload_id="py-changed")

    with amalgam.Client(server, dedup_below=0) as client:
        cut_after_first_mib(client, header, data)
        held = client.get_upload("py-changed")
        assert held.held_sha256 == hashlib.sha256(data[:1 << 20]).hexdigest()
        changed = bytearray(data)
        changed[10] ^= 1
        path.write_bytes(bytes(changed))
        with pytest.raises(amalgam.AmalgamError) as error:
            client.upload_weights(path, name="changing", upload_id="py-changed")
        assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert str(path) in error.value.message and "changed since" in error.value.message


def test_the_cli_finishes_a_one_pass_upload_that_python_began(server, cli_path, tmp_path):
    """Over 64 MiB both clients send in one pass and derive the same upload
    id from the file's device, inode and mtime."""
    from amalgam import safetensors
    g = torch.Generator().manual_seed(65)
    path = tmp_path / "big.safetensors"
    path.write_bytes(safetensors.dumps({"w": torch.randn(65 << 18, generator=g)}))
    size = path.stat().st_size
    header = pb.UploadHeader(kind=pb.ARTIFACT_KIND_WEIGHTS, name="big", size_bytes=size)
    header.upload_id = client_module._derived_upload_id(header, [os.stat(path)])
    with amalgam.Client(server) as client:
        cut_after_first_mib(client, header, path.read_bytes())
        run = subprocess.run([cli_path, "--server", server, "upload", "weights", str(path),
                              "--name", "big"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        artifact_id = run.stdout.strip().splitlines()[-1]
        assert client.get_upload(header.upload_id).artifact_id == artifact_id, \
            "the CLI used another upload"
        assert client.get_artifact(artifact_id).sha256 == hashlib.sha256(
            path.read_bytes()).hexdigest()
