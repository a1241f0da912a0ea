"""Merge options through every layer (Python client, gRPC, server, core)
against independent float64 references: 1-based take_excluded_from,
full-match exclusion patterns, RegMean with unequal coefficients, and the
Gram normalisation of mixed sum and mean Grams."""

import subprocess

import grpc
import numpy as np
import pytest
import torch

import amalgam


def models_with_heads(client):
    """Two models sharing a body, with task heads of different shapes."""
    torch.manual_seed(3)
    models = [{"body.weight": torch.randn(6, 4), "head.weight": torch.randn(2 + i, 6)}
              for i in range(2)]
    return models, [client.upload_weights(m, name=f"headed{i}") for i, m in enumerate(models)]


def test_take_excluded_from_is_one_based_and_copies_that_models_bytes(
        client, server, cli_path, tmp_path):
    models, ids = models_with_heads(client)
    merged = client.merge(ids, "average", exclude=["head\\..*"], take_excluded_from=2)
    result = merged.state_dict()
    assert torch.equal(result["head.weight"], models[1]["head.weight"])
    assert torch.allclose(result["body.weight"].double(),
                          (models[0]["body.weight"].double() + models[1]["body.weight"].double()) / 2)
    # The CLI spells it the same way.
    out = tmp_path / "cli.safetensors"
    run = subprocess.run([cli_path, "--server", server, "merge", "--method", "average",
                          "--model", ids[0].id, "--model", ids[1].id, "--exclude", "head\\..*",
                          "--take-excluded-from", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    from amalgam import safetensors
    tensors, _ = safetensors.loads(out.read_bytes())
    assert torch.equal(tensors["head.weight"], models[1]["head.weight"])


def test_exclusion_patterns_match_whole_names(client):
    _, ids = models_with_heads(client)
    # "head" is not a full match of "head.weight": the heads stay in the
    # merge, and their shapes differ.
    with pytest.raises(amalgam.AmalgamError) as error:
        client.merge(ids, "average", exclude=["head"])
    assert error.value.code in (grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.FAILED_PRECONDITION)
    assert "head.weight" in error.value.message
    dropped = client.merge(ids, "average", exclude=["head.weight"]).state_dict()
    assert sorted(dropped) == ["body.weight"]


def test_regmean_with_unequal_coefficients_matches_the_normal_equations(client):
    rng = np.random.default_rng(5)
    ws = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(2)]
    xs = [rng.standard_normal((40, 5)) * (1 + i) for i in range(2)]
    grams = [x.T @ x for x in xs]
    ids = [client.upload_weights({"lin.weight": torch.from_numpy(w)}) for w in ws]
    gram_ids = [client.upload_gram({"lin.weight": torch.from_numpy(g)}, for_weights=i)
                for g, i in zip(grams, ids)]
    coefficients, alpha = [1.0, 3.0], 0.7
    got = client.merge(ids, "regmean", grams=gram_ids, coefficients=coefficients,
                       alpha=alpha).state_dict()["lin.weight"].double().numpy()
    c = np.array(coefficients) / sum(coefficients)
    tilde = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    a = sum(ci * t for ci, t in zip(c, tilde))
    b = sum(ci * t @ w.astype(np.float64).T for ci, t, w in zip(c, tilde, ws))
    reference = np.linalg.solve(a, b).T
    assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-6
    # Not the plain weighted average: the statistics mattered.
    average = sum(ci * w for ci, w in zip(c, ws))
    assert np.abs(reference - average).max() > 1e-3


def test_mixed_sum_and_mean_grams_are_refused_as_uploaded_and_merge_as_means(client):
    rng = np.random.default_rng(8)
    ws = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2)]
    rows = [30, 90]
    xs = [rng.standard_normal((n, 4)) for n in rows]
    ids = [client.upload_weights({"lin.weight": torch.from_numpy(w)}) for w in ws]
    sum_gram = client.upload_gram({"lin.weight": torch.from_numpy(xs[0].T @ xs[0])},
                                  for_weights=ids[0], num_examples=rows[0], reduction="sum")
    mean_gram = client.upload_gram({"lin.weight": torch.from_numpy(xs[1].T @ xs[1] / rows[1])},
                                   for_weights=ids[1], num_examples=rows[1], reduction="mean")
    with pytest.raises(amalgam.AmalgamError) as error:
        client.merge(ids, "regmean", grams=[sum_gram, mean_gram])
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
    got = client.merge(ids, "regmean", grams=[sum_gram, mean_gram], alpha=1.0,
                       gram_normalization="mean").state_dict()["lin.weight"].double().numpy()
    means = [x.T @ x / n for x, n in zip(xs, rows)]
    a = sum(g / 2 for g in means)
    b = sum(g @ w.astype(np.float64).T / 2 for g, w in zip(means, ws))
    reference = np.linalg.solve(a, b).T
    assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-6


def test_regmean_precision_float32_keeps_the_output_error_under_its_tolerance(
        client, server, cli_path, tmp_path):
    from amalgam import safetensors
    rng = np.random.default_rng(11)
    features, outputs = 48, 12
    ws = [rng.standard_normal((outputs, features)).astype(np.float32) for _ in range(3)]
    xs = [rng.standard_normal((300, features)) * np.linspace(0.5, 4.0, features)
          for _ in range(3)]
    grams = [(x.T @ x).astype(np.float32) for x in xs]
    ids = [client.upload_weights({"lin.weight": torch.from_numpy(w)}) for w in ws]
    gram_ids = [client.upload_gram({"lin.weight": torch.from_numpy(g)}, for_weights=i)
                for g, i in zip(grams, ids)]
    alpha = 0.9
    tilde = [alpha * g.astype(np.float64) + (1 - alpha) * np.diag(np.diag(g))
             for g in grams]
    a = sum(t / 3 for t in tilde)
    reference = np.linalg.solve(a, sum(t @ w.astype(np.float64).T / 3
                                       for t, w in zip(tilde, ws))).T
    lower = np.linalg.cholesky(a)

    def output_error(got):
        return (np.linalg.norm((got - reference) @ lower) /
                np.linalg.norm(reference @ lower))

    job = client.merge(ids, "regmean", grams=gram_ids, precision="float32")
    job.save_pretrained(tmp_path / "fast")
    tensors, metadata = safetensors.loads((tmp_path / "fast" / "model.safetensors").read_bytes())
    assert metadata["amalgam.precision"] == "float32"
    fast = tensors["lin.weight"].double().numpy()
    assert output_error(fast) <= 1e-5
    precise = client.merge(ids, "regmean", grams=gram_ids).state_dict()["lin.weight"]
    assert output_error(precise.double().numpy()) <= 1e-7
    # Solved in float32 (a weight redone in float64 would be the precise one).
    assert not torch.equal(tensors["lin.weight"], precise)
    # The CLI spells it --precision.
    out = tmp_path / "cli.safetensors"
    command = [cli_path, "--server", server, "merge", "--method", "regmean"]
    for i, g in zip(ids, gram_ids):
        command += ["--model", i.id, "--gram", g.id]
    run = subprocess.run(command + ["--precision", "float32", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    tensors, metadata = safetensors.loads(out.read_bytes())
    assert metadata["amalgam.precision"] == "float32"
    assert output_error(tensors["lin.weight"].double().numpy()) <= 1e-5
    run = subprocess.run(command + ["--precision", "float16"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "--precision 'float16'" in run.stderr
    # Only RegMean has a precision.
    with pytest.raises(amalgam.AmalgamError) as error:
        client.merge(ids, "average", precision="float32")
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "precision float32" in error.value.message
    with pytest.raises(ValueError):
        client.merge(ids, "regmean", grams=gram_ids, precision="float16")
