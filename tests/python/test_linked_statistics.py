"""A merge that names no statistics uses those uploaded for each model."""

import subprocess

import pytest
import torch

import amalgam
from amalgam import safetensors


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 6, generator=g) for _ in range(3)]


def test_a_merge_without_statistics_uses_the_ones_uploaded_for_its_models(
        client, server, cli_path, tmp_path):
    models = [_model(s) for s in (1, 2)]
    weights = [client.upload_weights(m.state_dict()) for m in models]
    grams = [client.upload_gram(amalgam.stats.gram(m, _batches(i)), for_weights=w)
             for i, (m, w) in enumerate(zip(models, weights))]

    linked = client.merge(weights, "regmean", alpha=0.9)
    assert linked.wait().state == "succeeded"
    # The job records the statistics it read.
    assert [m.gram_id for m in linked.job.merge.models] == [g.id for g in grams]
    explicit = client.merge(weights, "regmean", grams=grams, alpha=0.9).state_dict()
    found = linked.state_dict()
    for name in explicit:
        assert torch.equal(found[name], explicit[name]), name
    # The CLI too.
    out = tmp_path / "linked.safetensors"
    subprocess.run([cli_path, "--server", server, "merge", "--method", "regmean",
                    "--model", weights[0].id, "--model", weights[1].id, "--out", str(out)],
                   check=True, capture_output=True)
    from_cli, _ = safetensors.load_file(out)
    for name in explicit:
        assert torch.equal(from_cli[name], explicit[name]), name

    # A second Gram for model 0: ambiguous unless named.
    second = client.upload_gram(amalgam.stats.gram(models[0], _batches(7)),
                                for_weights=weights[0])
    with pytest.raises(amalgam.AmalgamError) as error:
        client.merge(weights, "regmean")
    assert error.value.code.name == "FAILED_PRECONDITION"
    assert grams[0].id in error.value.message and second.id in error.value.message
    assert "merge.models[0].gram_id" in error.value.message
    # Explicit ids still win, also for one model of the two.
    chosen = client.merge(weights, "regmean", grams=[second, grams[1]])
    assert chosen.wait().state == "succeeded"
    assert chosen.job.merge.models[1].gram_id == grams[1].id


def test_a_fisher_merge_finds_its_fisher_and_a_model_without_one_is_refused(client):
    models = [_model(s) for s in (3, 4)]
    weights = [client.upload_weights(m.state_dict()) for m in models]
    fisher = {k: torch.rand_like(v) + 0.1 for k, v in models[0].state_dict().items()}
    client.upload_fisher(fisher, for_weights=weights[0])
    with pytest.raises(amalgam.AmalgamError) as error:
        client.merge(weights, "fisher")
    # Model 1 has none: the error of a merge missing statistics, as before.
    assert error.value.code.name in ("FAILED_PRECONDITION", "INVALID_ARGUMENT")
    client.upload_fisher(fisher, for_weights=weights[1])
    assert client.merge(weights, "fisher").wait().state == "succeeded"
