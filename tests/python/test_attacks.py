"""The security review's attacks, each against the real amalgamd: every one
must be refused with the fitting code while the server keeps serving."""

import json
import os
import struct
import urllib.request

import grpc
import pytest

import amalgam
from conftest import metrics_port, start_amalgamd


@pytest.fixture
def fresh_server(tmp_path, amalgamd_path):
    """(address, root) of an amalgamd of the test's own, with a token file."""
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-a org-a\n")
    os.chmod(tokens, 0o600)
    process, address = start_amalgamd(amalgamd_path, tmp_path,
                                      extra=("--tokens", str(tokens)))
    yield address, tmp_path
    process.terminate()
    assert process.wait(timeout=30) == 0, "amalgamd did not exit 0 on SIGTERM"


def metrics_text(root):
    url = f"http://127.0.0.1:{metrics_port(root)}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()


def test_h1_a_deeply_nested_shape_is_refused_and_the_server_lives(fresh_server, tmp_path):
    address, _ = fresh_server
    deep = (b'{"t":{"dtype":"F32","shape":' + b"[" * 60000 + b"]" * 60000 +
            b',"data_offsets":[0,4]}}')
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(deep)) + deep + bytes(4))
    with amalgam.Client(address, token="tok-a") as client:
        with pytest.raises(amalgam.AmalgamError) as error:
            client.upload_weights(str(path))
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "deeper than 3 levels" in error.value.message
        assert "[[[" not in error.value.message
        # Still serving.
        assert client.list_artifacts() == []


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
    assert f'amalgam_rpcs_total{{code="UNIMPLEMENTED",method="unknown"}} {calls}' in text
    grown = (root / "server.log").stat().st_size - log_before
    # One bounded line per call: the path is cut to 512 bytes.
    assert grown < calls * 1024, f"the log grew by {grown} bytes for {calls} calls"


def test_log_fields_from_callers_are_escaped(fresh_server, tmp_path):
    """A tensor name with a quote and a newline reaches the upload_failed
    line's error field; it must stay inside that one field of that one line."""
    address, root = fresh_server
    path = tmp_path / "m.safetensors"
    name = 'x" forged=1\n2026-01-01T00:00:00.000Z INFO event=fake'
    header = json.dumps({name: {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with amalgam.Client(address, token="tok-a") as client:
        with pytest.raises(amalgam.AmalgamError) as error:
            client.upload_weights(str(path))
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    lines = (root / "server.log").read_text().splitlines()
    assert not any("event=fake" in line and "event=upload_failed" not in line
                   for line in lines)
    failed = [line for line in lines if "event=upload_failed" in line]
    assert failed and '\\" forged=1\\x0a' in failed[-1], failed
