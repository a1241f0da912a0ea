"""A weights artifact is a Hugging Face model directory: its tensors in one
file or in shards with an index, and the side files (config, tokenizer)."""

import hashlib
import json
import pathlib
import subprocess

import grpc
import pytest
import torch

import amalgam
from amalgam import safetensors
from conftest import start_amalgamd
from test_resume import cut_after_first_mib, upload_through_a_kill

CONFIG = {"model_type": "bert", "hidden_size": 8, "torch_dtype": "float32"}
TOKENIZER = {"version": "1.0", "model": {"type": "WordPiece", "vocab": {"[UNK]": 0}}}


def _tensors(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {f"layer.{i}.weight": torch.randn(8, 4 + i, generator=g).to(dtype)
            for i in range(6)}


def _write_model(directory, tensors, shards, side=True):
    """Writes `tensors` as `shards` shards (one file when 1) and side files."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        (directory / "model.safetensors").write_bytes(
            safetensors.dumps(tensors, {"format": "pt"}))
    else:
        weight_map = {}
        for k in range(shards):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[k::shards]}
            (directory / file).write_bytes(safetensors.dumps(part, {"format": "pt"}))
            weight_map.update({n: file for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
    if side:
        (directory / "config.json").write_text(json.dumps(CONFIG))
        (directory / "tokenizer.json").write_text(json.dumps(TOKENIZER))
    return directory


def _same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_sharded_model_directory_uploads_shows_and_downloads_as_it_was(
        client, server, cli_path, tmp_path):
    source = _write_model(tmp_path / "bert", _tensors(1), shards=3)
    artifact = client.upload_weights(source)
    assert artifact.name == "bert"
    assert [f.name for f in artifact.files] == [
        "config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    for f in artifact.files:
        assert f.size_bytes == (source / f.name).stat().st_size
    shown = client.get_artifact(artifact)
    assert shown.tensor_count == 6
    assert shown.parameter_count == sum(8 * (4 + i) for i in range(6))
    assert list(shown.dtypes) == ["F32"]
    assert sorted(t.name for t in shown.tensors) == sorted(_tensors(1))

    # Python and the CLI write the directory back, file for file.
    _same_files(source, pathlib.Path(client.download(artifact, tmp_path / "py")))
    subprocess.run([cli_path, "--server", server, "download", artifact.id, "--out",
                    str(tmp_path / "cli")], check=True, capture_output=True)
    _same_files(source, tmp_path / "cli")
    show = subprocess.run([cli_path, "--server", server, "show", artifact.id],
                          check=True, capture_output=True, text=True).stdout
    assert "files: 6" in show and "model-00002-of-00003.safetensors" in show
    lines = {line.split(":")[0].strip(): line.split(":", 1)[1].strip()
             for line in show.splitlines() if ":" in line}
    assert lines["parameters"] == str(shown.parameter_count)
    assert lines["dtypes"] == "F32"

    # A sharded model is no one file.
    with pytest.raises(amalgam.AmalgamError) as error:
        client.download(artifact, tmp_path / "one.safetensors")
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "3 shards" in error.value.message
    with pytest.raises(amalgam.AmalgamError) as error:
        client.download_bytes(artifact, "README.md")
    assert error.value.code == grpc.StatusCode.NOT_FOUND
    assert "README.md" in error.value.message and "config.json" in error.value.message


def test_the_cli_uploads_a_directory_and_sharded_models_merge(client, server, cli_path,
                                                                tmp_path):
    a = _tensors(2)
    b = _tensors(3)
    _write_model(tmp_path / "a", a, shards=3)
    _write_model(tmp_path / "b", b, shards=2, side=False)
    uploaded = subprocess.run([cli_path, "--server", server, "upload", "weights",
                               str(tmp_path / "a") + "/"], check=True, capture_output=True,
                              text=True)
    a_id = uploaded.stdout.strip()
    assert client.get_artifact(a_id).name == "a"
    b_id = client.upload_weights(tmp_path / "b").id
    merged = client.merge([a_id, b_id], "average").state_dict()
    assert sorted(merged) == sorted(a)
    for name in a:
        want = (a[name].double() + b[name].double()) / 2
        assert torch.allclose(merged[name].double(), want, rtol=1e-6, atol=1e-7), name


def test_bad_model_directories_are_refused_naming_the_file_or_tensor(client, tmp_path):
    tensors = _tensors(4)

    def refused(directory, code, *words):
        with pytest.raises(amalgam.AmalgamError) as error:
            client.upload_weights(directory)
        assert error.value.code == code, error.value.message
        for word in words:
            assert word in error.value.message, error.value.message

    # The index names a shard the directory does not hold.
    missing = _write_model(tmp_path / "missing", tensors, shards=3)
    (missing / "model-00003-of-00003.safetensors").unlink()
    refused(missing, grpc.StatusCode.INVALID_ARGUMENT, "model-00003-of-00003.safetensors",
            "not among the model's files")
    # A shard holds a tensor the index does not list.
    unlisted = _write_model(tmp_path / "unlisted", tensors, shards=2)
    index = json.loads((unlisted / "model.safetensors.index.json").read_text())
    del index["weight_map"]["layer.0.weight"]
    (unlisted / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(unlisted, grpc.StatusCode.INVALID_ARGUMENT, '"layer.0.weight"',
            "model-00001-of-00002.safetensors", "does not list")
    # Two shards hold the same tensor.
    twice = _write_model(tmp_path / "twice", tensors, shards=2)
    second = twice / "model-00002-of-00002.safetensors"
    part, _ = safetensors.load_file(second)
    part["layer.0.weight"] = tensors["layer.0.weight"]
    second.write_bytes(safetensors.dumps(part))
    refused(twice, grpc.StatusCode.INVALID_ARGUMENT, '"layer.0.weight"', "in both shard")
    # A file that is no part of a model directory: refused before any byte.
    extra = _write_model(tmp_path / "extra", tensors, shards=1)
    (extra / "README.md").write_text("# a model card\n")
    refused(extra, grpc.StatusCode.INVALID_ARGUMENT, '"README.md"', "header.files")
    # A .safetensors file the index does not name.
    stray = _write_model(tmp_path / "stray", tensors, shards=2)
    (stray / "extra.safetensors").write_bytes(safetensors.dumps({"x": torch.ones(2)}))
    refused(stray, grpc.StatusCode.INVALID_ARGUMENT, '"extra.safetensors"',
            "not a shard that model.safetensors.index.json names")
    # Two tensor files and no index.
    loose = _write_model(tmp_path / "loose", tensors, shards=1)
    (loose / "other.safetensors").write_bytes(safetensors.dumps({"x": torch.ones(2)}))
    refused(loose, grpc.StatusCode.INVALID_ARGUMENT, "several .safetensors files")
    # A config.json that results could not be given.
    bad_config = _write_model(tmp_path / "bad_config", tensors, shards=1)
    (bad_config / "config.json").write_text("[1, 2]")
    refused(bad_config, grpc.StatusCode.INVALID_ARGUMENT, "config.json is not a JSON object")
    # A directory inside: the client says so before it sends anything.
    nested = _write_model(tmp_path / "nested", tensors, shards=1)
    (nested / "sub").mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        client.upload_weights(nested)
    assert not [a for a in client.list_artifacts()
                if a.name in ("missing", "unlisted", "twice", "extra", "stray", "loose",
                              "bad_config")]


def test_identical_files_are_stored_once(tmp_path, amalgamd_path):
    (tmp_path / "server").mkdir()
    process, address = start_amalgamd(amalgamd_path, tmp_path / "server")
    try:
        tensors = _tensors(5)
        first = _write_model(tmp_path / "first", tensors, shards=3)
        changed = dict(tensors)
        changed["layer.1.weight"] = changed["layer.1.weight"] + 1  # in shard 2 of 3
        second = _write_model(tmp_path / "second", changed, shards=3)
        with amalgam.Client(address) as client:
            a = client.upload_weights(first)
            b = client.upload_weights(second)
        shared = {(f.name, f.sha256) for f in a.files} & {(f.name, f.sha256) for f in b.files}
        assert {name for name, _ in shared} == {
            "config.json", "tokenizer.json", "model-00001-of-00003.safetensors",
            "model-00003-of-00003.safetensors", "model.safetensors.index.json"}
        blobs = list((tmp_path / "server" / "data" / "blobs").rglob("*"))
        stored = {p.name for p in blobs if p.is_file()}
        assert stored == {f.sha256 for f in a.files} | {f.sha256 for f in b.files}
        assert len(stored) == 6 + 1  # only shard 2 differs
        # A delete removes the blobs no other artifact has, and only those.
        with amalgam.Client(address) as client:
            client.delete(b)
            assert {p.name for p in blobs if p.exists()} == {f.sha256 for f in a.files}
            client.delete(a)
            assert not [p for p in blobs if p.exists()]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_directory_upload_cut_off_by_a_killed_server_resumes(tmp_path, amalgamd_path):
    torch.manual_seed(6)
    big = {f"w{i}": torch.randn(512, 1024) for i in range(3)}  # 2 MiB each
    source = _write_model(tmp_path / "big", big, shards=3)
    (tmp_path / "server").mkdir()
    # Killed once the server holds part of the second shard.
    client, result, process = upload_through_a_kill(amalgamd_path, tmp_path / "server",
                                                    source, "dir-killed", 3 << 20)
    try:
        assert "error" not in result, result.get("error")
        assert client.first_offsets[0] == 0 and client.first_offsets[-1] >= 3 << 20
        _same_files(source, pathlib.Path(client.download(result["artifact"],
                                                         tmp_path / "back")))
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=30)


def test_the_cli_finishes_a_directory_upload_that_python_began(tmp_path, server, cli_path):
    """Both clients derive the same upload id for a directory, its file names
    and sizes included."""
    from amalgam.client import _derived_upload_id
    from amalgam.v1 import amalgam_pb2 as pb

    torch.manual_seed(7)
    source = _write_model(tmp_path / "rerun-dir",
                          {f"w{i}": torch.randn(256, 1024) for i in range(3)}, shards=3)
    paths = sorted(source.iterdir())
    data = b"".join(p.read_bytes() for p in paths)
    header = pb.UploadHeader(
        kind=pb.ARTIFACT_KIND_WEIGHTS, name="rerun-dir", size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        files=[pb.ModelFile(name=p.name, size_bytes=p.stat().st_size) for p in paths])
    header.upload_id = _derived_upload_id(header)

    with amalgam.Client(server) as client:
        cut_after_first_mib(client, header, data)
        run = subprocess.run([cli_path, "--server", server, "upload", "weights", str(source)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        artifact_id = run.stdout.strip().splitlines()[-1]
        assert client.get_upload(header.upload_id).artifact_id == artifact_id, \
            "the CLI used another upload"
        _same_files(source, pathlib.Path(client.download(artifact_id, tmp_path / "back")))
