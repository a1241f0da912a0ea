"""Results of merges, grows and sweeps are Hugging Face model directories:
shards as the Hub names them, an index, and the side files of one input."""

import json
import pathlib
import subprocess

import grpc
import pytest
import torch

import amalgam
from amalgam import safetensors
from test_client import _batches, _models, _regmean_reference
from test_model_dirs import _write_model

GENERATION = {"max_length": 20}


def _upload_model(client, directory, state, config, shards=3):
    _write_model(directory, state, shards=shards)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps(GENERATION))
    return client.upload_weights(directory)


def _check_layout(directory, shard_size):
    """The Hub's conventions; returns the tensors of the shards."""
    files = sorted(p.name for p in directory.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    tensors = {}
    sizes = {}
    for shard in shards:
        part, metadata = safetensors.load_file(directory / shard)
        assert metadata["format"] == "pt", shard
        tensors.update(part)
        sizes[shard] = sum(t.numel() * t.element_size() for t in part.values())
    if len(shards) == 1:
        assert shards == ["model.safetensors"]
        assert "model.safetensors.index.json" not in files
        return tensors
    n = len(shards)
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for name in tensors:
        part, _ = safetensors.load_file(directory / index["weight_map"][name])
        assert name in part
    assert sorted(index["weight_map"]) == sorted(tensors)
    # Shards in write (name) order, each starting where the next tensor would
    # take the one before past the shard size.
    order = sorted(tensors)
    for k, shard in enumerate(shards):
        assert sizes[shard] <= shard_size or len(
            [t for t in order if index["weight_map"][t] == shard]) == 1
        if k + 1 < n:
            first_next = next(t for t in order if index["weight_map"][t] == shards[k + 1])
            nbytes = tensors[first_next].numel() * tensors[first_next].element_size()
            assert sizes[shard] + nbytes > shard_size
    return tensors


def test_a_regmean_merge_of_sharded_models_downloads_as_a_hugging_face_directory(
        client, server, cli_path, tmp_path):
    models = _models(2, 2)
    states = [m.state_dict() for m in models]
    configs = [{"model_type": "mlp", "torch_dtype": "float32", "origin": k} for k in range(2)]
    weights = [_upload_model(client, tmp_path / f"in{k}", states[k], configs[k])
               for k in range(2)]
    stats = [amalgam.stats.gram(m, _batches(k)) for k, m in enumerate(models)]
    for w, g in zip(weights, stats):
        client.upload_gram(g, for_weights=w)
    # No Grams named: the linked ones. Side files from model 1.
    job = client.merge(weights, "regmean", alpha=0.9, shard_size=150, config_from=1)
    out = pathlib.Path(job.save_pretrained(tmp_path / "out"))
    tensors = _check_layout(out, 150)
    assert len([p for p in out.iterdir() if p.name.endswith(".safetensors")]) >= 3
    for name in ("tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "in1" / name).read_bytes(), name
    assert (out / "config.json").read_bytes() == (tmp_path / "in1" / "config.json").read_bytes()
    reference = _regmean_reference(states, [g.tensors for g in stats], 0.9)
    assert sorted(tensors) == sorted(reference)
    for name, want in reference.items():
        assert tensors[name].dtype == torch.float32
        assert torch.allclose(tensors[name].double(), want, rtol=1e-5, atol=1e-6), name
    # The artifact lists the same files; the CLI writes the same directory.
    artifact = client.get_artifact(job.result_ids[0])
    assert sorted(f.name for f in artifact.files) == sorted(p.name for p in out.iterdir())
    subprocess.run([cli_path, "--server", server, "download", artifact.id, "--out",
                    str(tmp_path / "cli")], check=True, capture_output=True)
    for p in out.iterdir():
        assert (tmp_path / "cli" / p.name).read_bytes() == p.read_bytes()


def test_out_dtype_sets_the_tensors_and_torch_dtype(client, server, cli_path, tmp_path):
    states = [m.state_dict() for m in _models(3, 2)]
    weights = [_upload_model(client, tmp_path / f"in{k}", states[k],
                             {"torch_dtype": "float32", "k": k}) for k in range(2)]
    out = pathlib.Path(client.merge(weights, "average", out_dtype="bfloat16")
                       .save_pretrained(tmp_path / "bf16"))
    tensors = _check_layout(out, 5_000_000_000)
    config = json.loads((out / "config.json").read_text())
    assert config == {"torch_dtype": "bfloat16", "k": 0}
    for name in states[0]:
        want = ((states[0][name].double() + states[1][name].double()) / 2).to(torch.bfloat16)
        assert tensors[name].dtype == torch.bfloat16
        assert torch.equal(tensors[name], want), name
    # The CLI: a size with units, --out-dtype, --config-from.
    cli_out = tmp_path / "cli"
    run = subprocess.run(
        [cli_path, "--server", server, "merge", "--method", "average", "--model", weights[0].id,
         "--model", weights[1].id, "--shard-size", "0.2KB", "--out-dtype", "float16",
         "--config-from", "1", "--out", str(cli_out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    cli_tensors = _check_layout(cli_out, 200)
    assert json.loads((cli_out / "config.json").read_text()) == {"torch_dtype": "float16", "k": 1}
    assert all(t.dtype == torch.float16 for t in cli_tensors.values())


def test_bad_output_options_are_refused_naming_the_field(client, tmp_path):
    states = [m.state_dict() for m in _models(4, 2)]
    weights = [client.upload_weights(s) for s in states]
    for kwargs, words in (({"config_from": 2}, "merge.output.config_from is 2; expected 0..1"),
                          ({"shard_size": -1}, "merge.output.shard_size_bytes is -1")):
        with pytest.raises(amalgam.AmalgamError) as error:
            client.merge(weights, "average", **kwargs)
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert words in error.value.message
    with pytest.raises(amalgam.AmalgamError) as error:
        client.sweep(weights[0], weights[1], 3, config_from=-1)
    assert "sweep.output.config_from is -1" in error.value.message
    with pytest.raises(ValueError):
        client.merge(weights, "average", out_dtype="int8")


def test_a_grown_model_gets_the_grown_config(client, tmp_path):
    from test_client import _gpt2
    a, b = _gpt2(4, 1), _gpt2(4, 2)
    config = {"model_type": "gpt2", "n_embd": 4, "n_head": 2, "n_layer": 2, "n_inner": None,
              "torch_dtype": "float32", "vocab_size": 11}
    ids = [_upload_model(client, tmp_path / f"g{k}", s, config, shards=2)
           for k, s in enumerate((a, b))]
    job = client.grow(ids[0], ids[1], layout="gpt2", shard_size=400)
    out = pathlib.Path(job.save_pretrained(tmp_path / "grown"))
    tensors = _check_layout(out, 400)
    grown = json.loads((out / "config.json").read_text())
    assert grown["n_embd"] == 8 and grown["n_head"] == 4 and grown["n_layer"] == 2
    assert grown["n_inner"] == tensors["h.0.mlp.c_fc.weight"].shape[1]
    assert grown["vocab_size"] == 11 and grown["model_type"] == "gpt2"
    assert job.report["config"]["n_embd"] == 8
