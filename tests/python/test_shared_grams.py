"""Weights that read the same input (query, key, value) share one Gram: stored once
with aliases, or found identical by the server at upload; merged with one
factorisation, bitwise as if each were solved alone, and right against float64."""

import pytest
import torch

import amalgam
from amalgam import stats


class Attention(torch.nn.Module):
    """q, k and v read the same input; o reads another."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.k, self.v = (torch.nn.Linear(6, 4) for _ in range(3))
        self.o = torch.nn.Linear(4, 6)

    def forward(self, x):
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1)
        return self.o(scores @ self.v(x))


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 6, generator=g) for _ in range(3)]


def _reference(states, grams, name, alpha):
    """The RegMean normal equations in float64, equal coefficients."""
    a = torch.zeros_like(grams[0][name])
    b = 0
    for state, gram in zip(states, grams):
        g = gram[name]
        gt = alpha * g + (1 - alpha) * torch.diag(torch.diag(g))
        a = a + gt
        b = b + gt @ state[name].double().T
    return torch.linalg.solve(a, b).T


def test_stats_alias_the_layers_that_read_one_input():
    model = Attention(1)
    shared = stats.gram(model, _batches(1))
    # To the first by name.
    assert shared.aliases == {"q.weight": "k.weight", "v.weight": "k.weight"}
    assert set(shared.tensors) == {"q.weight", "k.weight", "v.weight", "o.weight"}
    assert set(shared.stored_tensors()) == {"k.weight", "o.weight"}
    meta = shared.metadata()
    assert meta["alias.q.weight"] == "k.weight" and meta["alias.v.weight"] == "k.weight"
    assert torch.equal(shared.tensors["q.weight"], shared.tensors["k.weight"])
    assert shared.mean().aliases == shared.aliases
    assert stats.gram(model, _batches(1), share=False).aliases == {}


def test_shared_and_identical_grams_merge_bitwise_as_apart_and_match_float64(client):
    models = [Attention(s) for s in (1, 2, 3)]
    weights = [client.upload_weights(m.state_dict()) for m in models]
    collected = [stats.gram(m, _batches(10 + i)) for i, m in enumerate(models)]

    aliased = [client.upload_gram(g, for_weights=w) for g, w in zip(collected, weights)]
    for artifact in aliased:
        assert artifact.tensor_count == 2
        assert artifact.metadata["alias.q.weight"] == "k.weight"
        assert dict(artifact.identical_tensors) == {}
    # Each Gram under its own name: the server finds q, k and v identical.
    copies = [client.upload_gram(dict(g.tensors), for_weights=w,
                                 num_examples=g.num_examples)
              for g, w in zip(collected, weights)]
    for artifact in copies:
        assert artifact.tensor_count == 4
        assert dict(artifact.identical_tensors) == {"q.weight": "k.weight",
                                                    "v.weight": "k.weight"}

    merged = {}
    for layout, grams in (("aliased", aliased), ("copies", copies)):
        for precision in ("float64", "float32"):
            job = client.merge(weights, "regmean", grams=grams, alpha=0.9,
                               precision=precision)
            assert job.wait().state == "succeeded", job.job.error
            merged[layout, precision] = job.state_dict()
    for precision in ("float64", "float32"):
        a, b = merged["aliased", precision], merged["copies", precision]
        assert set(a) == set(b)
        for name in a:
            assert torch.equal(a[name], b[name]), (precision, name)

    states = [m.state_dict() for m in models]
    for name in ("q.weight", "k.weight", "v.weight", "o.weight"):
        ref = _reference(states, [g.tensors for g in collected], name, 0.9)
        got = merged["aliased", "float64"][name].double()
        assert (got - ref).abs().max() <= 1e-6 * ref.abs().max(), name


def test_an_alias_naming_no_tensor_of_the_file_is_refused(client):
    model = Attention(4)
    weights = client.upload_weights(model.state_dict())
    g = stats.gram(model, _batches(4))
    broken = stats.Statistics({"o.weight": g.tensors["o.weight"]}, g.num_examples,
                              aliases={"k.weight": "q.weight"})
    with pytest.raises(amalgam.AmalgamError) as error:
        client.upload_gram(broken, for_weights=weights)
    assert error.value.code.name == "INVALID_ARGUMENT"
    assert ('Gram alias "alias.k.weight" names "q.weight", which is not a tensor of '
            'the file') in error.value.message
