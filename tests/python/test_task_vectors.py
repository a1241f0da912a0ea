"""The task-vector merges through the real amalgamd, from Python and the CLI,
against float64 references written here from the formulas."""

import subprocess

import pytest
import torch

import amalgam
from amalgam import safetensors


def _state(seed, scale=1.0, base=None):
    g = torch.Generator().manual_seed(seed)
    state = {"layer.weight": torch.randn(6, 5, generator=g) * scale,
             "layer.bias": torch.randn(5, generator=g) * scale}
    if base is not None:
        state = {k: base[k] + v for k, v in state.items()}
    return state


@pytest.fixture
def family(client):
    """A base model, three fine-tunes of it, uploaded; and their tensors."""
    base = _state(1)
    tuned = [_state(10 + i, 0.1, base) for i in range(3)]
    ids = [client.upload_weights(s, name=f"tuned{i}") for i, s in enumerate(tuned)]
    return client.upload_weights(base, name="base"), ids, base, tuned


def _trim(delta, density):
    flat = delta.flatten()
    k = max(1, int(density * flat.numel()))
    # Largest magnitude first; equal magnitudes in index order.
    order = torch.sort(-flat.abs(), stable=True).indices
    kept = torch.zeros_like(flat)
    kept[order[:k]] = flat[order[:k]]
    return kept.view_as(delta)


def _ties(base, models, weights, density, lam, normalize=True):
    deltas = [_trim(m.double() - base.double(), density) for m in models]
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * base.dim())
    d = torch.stack(deltas)
    elected = torch.where((w * d).sum(0) >= 0, 1.0, -1.0).double()
    agree = torch.sign(d) == elected
    numerator = (agree * w * d).sum(0)
    divisor = (agree * w).sum(0)
    merged = numerator / torch.where(divisor == 0, 1.0, divisor) if normalize else numerator
    return base.double() + lam * merged


def test_task_arithmetic_and_ties_match_their_formulas_from_python_and_the_cli(
        client, server, cli_path, family, tmp_path):
    base_id, ids, base, tuned = family
    merged = client.merge(ids, "task_arithmetic", base=base_id, weights=[1, 0.5, 2],
                          lambda_=0.7).state_dict()
    for name in base:
        want = base[name].double() + 0.7 * sum(
            w * (t[name].double() - base[name].double()) for w, t in zip([1, 0.5, 2], tuned))
        assert torch.allclose(merged[name].double(), want, rtol=0, atol=1e-6), name

    job = client.merge(ids, "ties", base=base_id, weights=[1, 2, 1], density=0.4,
                       lambda_=0.9)
    ties = job.state_dict()
    for name in base:
        want = _ties(base[name], [t[name] for t in tuned], [1, 2, 1], 0.4, 0.9)
        assert torch.allclose(ties[name].double(), want, rtol=0, atol=1e-6), name
    # The result says how it was made.
    metadata = client.get_artifact(job.result_ids[0]).metadata
    assert metadata["amalgam.method"] == "ties"
    assert metadata["amalgam.base"] == base_id.id
    assert metadata["amalgam.lambda"] == "0.9"
    assert metadata["amalgam.densities"] == "0.4,0.4,0.4"

    # The CLI gives the same bytes (W and D per model: ID:W:D).
    out = tmp_path / "ties.safetensors"
    command = [cli_path, "--server", server, "merge", "--method", "ties", "--base",
               base_id.id, "--lambda", "0.9", "--out", str(out)]
    for w, artifact in zip([1, 2, 1], ids):
        command += ["--model", f"{artifact.id}:{w}:0.4"]
    subprocess.run(command, check=True, capture_output=True)
    from_cli, _ = safetensors.load_file(out)
    for name in ties:
        assert torch.equal(from_cli[name], ties[name]), name


def test_dare_is_reproducible_and_at_density_one_is_task_arithmetic(client, family):
    base_id, ids, base, tuned = family
    arithmetic = client.merge(ids, "task_arithmetic", base=base_id).state_dict()
    dense = client.merge(ids, "dare_linear", base=base_id, density=1.0).state_dict()
    for name in base:
        assert torch.equal(dense[name], arithmetic[name]), name
    first = client.merge(ids[:1], "dare_linear", base=base_id, density=0.5, seed=3).state_dict()
    again = client.merge(ids[:1], "dare_linear", base=base_id, density=0.5, seed=3).state_dict()
    other = client.merge(ids[:1], "dare_linear", base=base_id, density=0.5, seed=4).state_dict()
    assert all(torch.equal(first[n], again[n]) for n in base)
    assert any(not torch.equal(first[n], other[n]) for n in base)
    # Each entry is dropped (the base's) or kept and rescaled by 1/density.
    for name in base:
        delta = tuned[0][name].double() - base[name].double()
        got = first[name].double() - base[name].double()
        dropped = got.abs() < 1e-7
        assert torch.allclose(got[~dropped], 2 * delta[~dropped], atol=1e-6), name
    ties = client.merge(ids, "dare_ties", base=base_id, density=0.5, seed=3,
                        rescale="l1", normalize=False)
    assert ties.wait().state == "succeeded"


def test_slerp_and_model_stock_match_their_formulas(client, family):
    base_id, ids, base, tuned = family
    ends = client.merge(ids[:2], "slerp", t=0.0).state_dict()
    for name in base:
        assert torch.equal(ends[name], tuned[0][name]), name
    half = client.merge(ids[:2], "slerp", t=0.5).state_dict()
    for name in base:
        a, b = tuned[0][name].double().flatten(), tuned[1][name].double().flatten()
        dot = torch.dot(a / a.norm(), b / b.norm())
        omega = torch.arccos(dot)
        want = (torch.sin(0.5 * omega) * a + torch.sin(0.5 * omega) * b) / torch.sin(omega)
        assert torch.allclose(half[name].double().flatten(), want, atol=1e-6), name
    # A model and the base.
    towards = client.merge(ids[:1], "slerp", base=base_id, t=1.0).state_dict()
    assert all(torch.equal(towards[n], tuned[0][n]) for n in base)

    stock = client.merge(ids, "model_stock", base=base_id).state_dict()
    for name in base:
        b0 = base[name].double().flatten()
        deltas = [t[name].double().flatten() - b0 for t in tuned]
        cosines = [torch.dot(deltas[i], deltas[j]) /
                   max(deltas[i].norm() * deltas[j].norm(), 1e-6)
                   for i in range(3) for j in range(i + 1, 3)]
        c = float(torch.stack(cosines).mean().clamp(-1, 1))
        t = 3 * c / (1 + 2 * c)
        mean = sum(x[name].double() for x in tuned) / 3
        want = t * mean + (1 - t) * base[name].double()
        assert torch.allclose(stock[name].double(), want, atol=1e-6), name


def test_bad_task_vector_requests_are_refused_with_what_is_wrong(
        client, server, cli_path, family):
    base_id, ids, _, _ = family
    cases = [
        (dict(method="ties"), "needs a base model"),
        (dict(method="ties", base=base_id, density=1.5), "density must be in (0, 1]"),
        (dict(method="slerp", t=0.5, models=ids), "slerp interpolates two models"),
        (dict(method="slerp", models=ids[:2], t=2.0), "t must be in [0, 1]"),
        (dict(method="model_stock", base=base_id, models=ids[:1]), "at least 2 model(s)"),
        (dict(method="model_stock", base=base_id, lambda_=2.0), "lambda is not a parameter"),
        (dict(method="average", base=base_id), "a base model is not a parameter"),
    ]
    for arguments, message in cases:
        models = arguments.pop("models", ids)
        with pytest.raises(amalgam.AmalgamError) as error:
            client.merge(models, **arguments)
        assert error.value.code.name == "INVALID_ARGUMENT", arguments
        assert message in error.value.message, (arguments, error.value.message)
    other = client.upload_weights({"layer.weight": torch.zeros(6, 4),
                                   "layer.bias": torch.zeros(5)})
    with pytest.raises(amalgam.AmalgamError) as error:
        client.merge(ids, "task_arithmetic", base=other)
    assert error.value.code.name == "FAILED_PRECONDITION"
    assert 'tensor "layer.weight" has shape [6, 5]' in error.value.message
    # The CLI refuses what the method does not use, naming it.
    result = subprocess.run([cli_path, "--server", server, "merge", "--method", "ties",
                             "--base", base_id.id, "--t", "0.5", "--model", ids[0].id],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "t is not a parameter of ties" in result.stderr


@pytest.mark.parametrize("method,flags,parameters,count,with_base", [
    ("task_arithmetic", ["--lambda", "0.7"], dict(lambda_=0.7), 3, True),
    ("ties", ["--density", "0.3", "--no-normalize"], dict(density=0.3, normalize=False), 3,
     True),
    ("dare_linear", ["--density", "0.5", "--seed", "3"], dict(density=0.5, seed=3), 3, True),
    ("dare_ties", ["--density", "0.5", "--rescale", "l1"], dict(density=0.5, rescale="l1"),
     3, True),
    ("slerp", ["--t", "0.25"], dict(t=0.25), 2, False),
    ("model_stock", [], {}, 3, True),
])
def test_every_method_gives_the_same_bytes_from_the_cli_and_python(
        client, server, cli_path, family, tmp_path, method, flags, parameters, count,
        with_base):
    base_id, ids, _, _ = family
    base = base_id if with_base else None
    from_python = client.merge(ids[:count], method, base=base, **parameters).state_dict()
    out = tmp_path / f"{method}.safetensors"
    command = [cli_path, "--server", server, "merge", "--method", method, *flags,
               "--out", str(out)]
    if with_base:
        command += ["--base", base_id.id]
    for artifact in ids[:count]:
        command += ["--model", artifact.id]
    subprocess.run(command, check=True, capture_output=True)
    from_cli, metadata = safetensors.load_file(out)
    assert metadata["amalgam.method"] == method
    for name, tensor in from_python.items():
        assert torch.equal(from_cli[name], tensor), name
