"""Tests for amalgam.stats: Gram and diagonal Fisher collection from torch models."""

import numpy as np
import pytest
import torch

from amalgam import stats
from amalgam.stats import Statistics

cuda = pytest.mark.cuda


class Conv1D(torch.nn.Module):
    """GPT-2 style Conv1D: weight is [in, out], forward is x @ weight + bias."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(nx, nf))
        self.bias = torch.nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
    )


def _np(t):
    return t.detach().cpu().double().numpy()


def _mlp_expected(model, xs):
    """Hand-computed Grams (numpy float64) of both linear layers for inputs xs [N, 3]."""
    x = _np(xs)
    w0, b0 = _np(model[0].weight), _np(model[0].bias)
    h = np.maximum(x @ w0.T + b0, 0.0)
    return x.T @ x, h.T @ h


# --------------------------------------------------------------------------- gram


def test_gram_mlp_matches_hand_computation():
    model = _mlp()
    torch.manual_seed(1)
    b1, b2 = torch.randn(5, 3), torch.randn(7, 3)
    st = stats.gram(model, [b1, b2])
    assert sorted(st.tensors) == ["0.weight", "2.weight"]
    g0, g2 = _mlp_expected(model, torch.cat([b1, b2]))
    for name, want in (("0.weight", g0), ("2.weight", g2)):
        got = st.tensors[name]
        assert got.dtype == torch.float64 and got.device.type == "cpu"
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    assert st.tensors["0.weight"].shape == (3, 3)
    assert st.tensors["2.weight"].shape == (4, 4)
    assert st.num_examples == 12
    assert st.rows == {"0.weight": 12, "2.weight": 12}
    assert st.reduction == "sum"


def test_gram_batch_conventions_and_forward_override():
    torch.manual_seed(2)
    lin = torch.nn.Linear(3, 2)

    class TwoArg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, a, b=None):
            return self.lin(a if b is None else a + b)

    model = TwoArg()
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    want = _np(a + b).T @ _np(a + b)
    for batches in ([(a, b)], [[a, b]], [{"a": a, "b": b}]):
        st = stats.gram(model, batches)
        assert list(st.tensors) == ["lin.weight"]
        np.testing.assert_allclose(st.tensors["lin.weight"].numpy(), want, rtol=1e-6)
    st = stats.gram(model, [{"x": a, "y": b}], forward=lambda m, bt: m(bt["x"], bt["y"]))
    np.testing.assert_allclose(st.tensors["lin.weight"].numpy(), want, rtol=1e-6)


def test_gram_token_inputs_every_position_counts():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(2, 5, 3)
    st = stats.gram(model, [x])
    flat = _np(x).reshape(-1, 3)
    np.testing.assert_allclose(st.tensors["0.weight"].numpy(), flat.T @ flat, rtol=1e-6)
    assert st.num_examples == 10


class _Tokens(torch.nn.Module):
    """Token model: a Linear over [B, T, 3] and a pooler Linear over [B, 3]."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)
        self.pooler = torch.nn.Linear(3, 2)

    def forward(self, input, attention_mask=None):
        h = self.proj(input)
        return self.pooler(h[:, 0])


def test_gram_skip_padding_keeps_only_unmasked_rows():
    torch.manual_seed(4)
    model = _Tokens()
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"input": x, "attention_mask": mask}

    full = stats.gram(model, [batch])
    flat = _np(x).reshape(-1, 3)
    np.testing.assert_allclose(full.tensors["proj.weight"].numpy(), flat.T @ flat, rtol=1e-6)
    assert full.rows["proj.weight"] == 8

    st = stats.gram(model, [batch], skip_padding=True)
    kept = flat[mask.numpy().reshape(-1) != 0]
    assert kept.shape[0] == 5
    np.testing.assert_allclose(st.tensors["proj.weight"].numpy(), kept.T @ kept, rtol=1e-6)
    assert st.rows["proj.weight"] == 5
    # the pooler's input is [B, H]: every row counts
    h0 = (_np(x) @ _np(model.proj.weight).T + _np(model.proj.bias))[:, 0]
    np.testing.assert_allclose(st.tensors["pooler.weight"].numpy(), h0.T @ h0, rtol=1e-6)
    assert st.rows["pooler.weight"] == 2
    # tie between row counts 5 and 2 is broken towards the largest
    assert st.num_examples == 5
    assert st.metadata()["rows.pooler.weight"] == "2"
    assert "rows.proj.weight" not in st.metadata()

    # a custom mask key
    st2 = stats.gram(
        model, [{"input": x, "m": mask}], skip_padding=True, mask_key="m",
        forward=lambda mod, bt: mod(bt["input"]),
    )
    np.testing.assert_allclose(st2.tensors["proj.weight"].numpy(), kept.T @ kept, rtol=1e-6)


def test_gram_conv1d_orientation_and_equivalence_with_linear():
    torch.manual_seed(5)
    conv = Conv1D(3, 5)
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Linear(5, 2))
    x = torch.randn(2, 6, 3)
    st = stats.gram(model, [x])
    g = st.tensors["0.weight"]
    assert g.shape == (3, 3)  # in x in, not out x out
    flat = _np(x).reshape(-1, 3)
    np.testing.assert_allclose(g.numpy(), flat.T @ flat, rtol=1e-6)
    h = np.maximum(flat @ _np(conv.weight) + _np(conv.bias), 0)
    np.testing.assert_allclose(st.tensors["2.weight"].numpy(), h.T @ h, rtol=1e-6, atol=1e-9)

    # Linear with the transposed weight computes the same function and the same Gram
    lin = torch.nn.Linear(3, 5)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    model_l = torch.nn.Sequential(lin, torch.nn.ReLU(), torch.nn.Linear(5, 2))
    st_l = stats.gram(model_l, [x])
    for name in ("0.weight", "2.weight"):
        np.testing.assert_allclose(
            st_l.tensors[name].numpy(), st.tensors[name].numpy(), rtol=1e-6, atol=1e-9
        )


def test_gram_unrun_layers_absent_hooks_removed_mode_restored():
    torch.manual_seed(6)

    class Partial(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(3, 3)
            self.unused = torch.nn.Linear(3, 3)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x):
            assert not self.training and not self.drop.training
            return self.drop(self.used(x))

    model = Partial()
    model.train()
    model.unused.eval()
    st = stats.gram(model, [torch.randn(4, 3)])
    assert list(st.tensors) == ["used.weight"]
    assert model.training and model.used.training and model.drop.training
    assert not model.unused.training  # per-submodule modes restored
    assert not model.used._forward_pre_hooks and not model.used._forward_hooks
    assert not model.unused._forward_pre_hooks

    # hooks are removed even when the forward raises
    with pytest.raises(RuntimeError):
        stats.gram(model, [torch.randn(4, 7)])
    assert not model.used._forward_pre_hooks
    assert model.training


def test_gram_nested_names_and_no_grad():
    torch.manual_seed(7)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query = torch.nn.Linear(3, 3)

        def forward(self, x):
            assert not torch.is_grad_enabled()
            return self.query(x)

    model = torch.nn.Module()
    model.encoder = torch.nn.ModuleList([Block(), Block()])
    model.forward = lambda x: model.encoder[1](model.encoder[0](x))
    st = stats.gram(model, [torch.randn(2, 3)], forward=lambda m, b: m.forward(b))
    assert sorted(st.tensors) == ["encoder.0.query.weight", "encoder.1.query.weight"]


def test_gram_empty_batches():
    st = stats.gram(_mlp(), [])
    assert st.tensors == {} and st.num_examples == 0


# --------------------------------------------------------------------------- fisher


def _regression(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 1)


def _per_example_mse(model, batch):
    x, t = batch
    return (model(x).squeeze(-1) - t) ** 2


def _fisher_expected(model, x, t):
    w, b = _np(model.weight).reshape(-1), float(_np(model.bias)[0])
    x, t = _np(x), _np(t)
    r = x @ w + b - t                      # residual per example
    gw = 2 * r[:, None] * x                # per-example grad wrt w
    gb = 2 * r                             # per-example grad wrt b
    return (gw ** 2).mean(0)[None, :], np.array([(gb ** 2).mean()])


def test_fisher_matches_closed_form():
    model = _regression()
    torch.manual_seed(10)
    x1, t1 = torch.randn(4, 3), torch.randn(4)
    x2, t2 = torch.randn(3, 3), torch.randn(3)
    st = stats.fisher(model, [(x1, t1), (x2, t2)], _per_example_mse)
    fw, fb = _fisher_expected(model, torch.cat([x1, x2]), torch.cat([t1, t2]))
    assert sorted(st.tensors) == ["bias", "weight"]
    assert st.tensors["weight"].dtype == torch.float64
    assert st.tensors["weight"].shape == model.weight.shape
    np.testing.assert_allclose(st.tensors["weight"].numpy(), fw, rtol=1e-5)
    np.testing.assert_allclose(st.tensors["bias"].numpy(), fb, rtol=1e-5)
    assert st.num_examples == 7
    assert st.reduction == "mean"
    assert st.metadata() == {"num_examples": "7", "reduction": "mean"}


def test_fisher_scalar_loss_is_one_example():
    model = _regression(1)
    torch.manual_seed(11)
    x, t = torch.randn(5, 3), torch.randn(5)

    def batch_loss(m, batch):
        return _per_example_mse(m, batch).sum()

    st = stats.fisher(model, [(x, t)], batch_loss)
    assert st.num_examples == 1
    w, b = _np(model.weight).reshape(-1), float(_np(model.bias)[0])
    r = _np(x) @ w + b - _np(t)
    gw = (2 * r[:, None] * _np(x)).sum(0)
    np.testing.assert_allclose(st.tensors["weight"].numpy(), (gw ** 2)[None, :], rtol=1e-5)
    np.testing.assert_allclose(st.tensors["bias"].numpy(), [(2 * r).sum() ** 2], rtol=1e-5)


def test_fisher_leaves_grad_and_mode_and_skips_frozen():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    marker = torch.full_like(model[2].weight, 7.0)
    model[2].weight.grad = marker.clone()
    model.train()
    seen_modes = []

    def loss_fn(m, batch):
        seen_modes.append(m.training or m[1].training)
        return (m(batch).squeeze(-1)) ** 2

    torch.manual_seed(12)
    st = stats.fisher(model, [torch.randn(4, 3)], loss_fn)
    assert seen_modes == [False]
    assert model.training and model[1].training
    assert torch.equal(model[2].weight.grad, marker)
    assert model[0].bias.grad is None and model[2].bias.grad is None
    assert "0.weight" not in st.tensors
    assert sorted(st.tensors) == ["0.bias", "2.bias", "2.weight"]
    assert st.num_examples == 4


def test_fisher_works_under_no_grad_and_rejects_bad_shapes():
    model = _regression(2)
    x, t = torch.randn(3, 3), torch.randn(3)
    with torch.no_grad():
        st = stats.fisher(model, [(x, t)], _per_example_mse)
    fw, _ = _fisher_expected(model, x, t)
    np.testing.assert_allclose(st.tensors["weight"].numpy(), fw, rtol=1e-5)
    with pytest.raises(ValueError):
        stats.fisher(model, [(x, t)], lambda m, b: torch.ones(2, 2, requires_grad=True))


# --------------------------------------------------------------------------- Statistics


def test_statistics_metadata_and_mean():
    a = torch.full((2, 2), 6.0, dtype=torch.float64)
    b = torch.full((2, 2), 6.0, dtype=torch.float64)
    st = Statistics({"a.weight": a, "b.weight": b}, num_examples=3,
                    rows={"a.weight": 3, "b.weight": 2})
    assert st.metadata() == {
        "num_examples": "3", "reduction": "sum", "rows.b.weight": "2"}
    m = st.mean()
    assert m.reduction == "mean"
    assert m.num_examples == 3
    assert torch.allclose(m.tensors["a.weight"], torch.full((2, 2), 2.0, dtype=torch.float64))
    assert torch.allclose(m.tensors["b.weight"], torch.full((2, 2), 3.0, dtype=torch.float64))
    assert m.metadata() == {"num_examples": "3", "reduction": "mean", "rows.b.weight": "2"}
    # the original is untouched; mean of a mean is unchanged
    assert torch.equal(st.tensors["a.weight"], a) and a[0, 0] == 6.0
    assert torch.equal(m.mean().tensors["b.weight"], m.tensors["b.weight"])
    # a tensor without a row entry uses num_examples
    s2 = Statistics({"c": torch.full((1,), 9.0, dtype=torch.float64)}, num_examples=3)
    assert s2.metadata() == {"num_examples": "3", "reduction": "sum"}
    assert s2.mean().tensors["c"].item() == 3.0
    with pytest.raises(ValueError):
        Statistics({}, 0, reduction="median")


def test_gram_mean_matches_numpy_mean():
    model = _mlp(3)
    x = torch.randn(6, 3)
    m = stats.gram(model, [x]).mean()
    g0, _ = _mlp_expected(model, x)
    np.testing.assert_allclose(m.tensors["0.weight"].numpy(), g0 / 6, rtol=1e-6)


# --------------------------------------------------------------------------- CUDA


@cuda
def test_gram_cuda_matches_cpu():
    model = _mlp(4)
    torch.manual_seed(13)
    xs = [torch.randn(5, 3), torch.randn(2, 3)]
    cpu = stats.gram(model, xs)
    model_c = _mlp(4).cuda()
    # batches on CPU are moved to the model's device
    st = stats.gram(model_c, xs)
    assert next(model_c.parameters()).is_cuda
    for name in cpu.tensors:
        assert st.tensors[name].device.type == "cpu"
        assert st.tensors[name].dtype == torch.float64
        np.testing.assert_allclose(st.tensors[name].numpy(), cpu.tensors[name].numpy(),
                                   rtol=1e-4, atol=1e-5)
    assert st.rows == cpu.rows


@cuda
def test_gram_cuda_skip_padding_and_conv1d():
    torch.manual_seed(14)
    model = _Tokens().cuda()
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 0]])
    st = stats.gram(model, [{"input": x, "attention_mask": mask}], skip_padding=True,
                    device="cuda")
    flat = _np(x).reshape(-1, 3)
    kept = flat[mask.numpy().reshape(-1) != 0]
    np.testing.assert_allclose(st.tensors["proj.weight"].numpy(), kept.T @ kept,
                               rtol=1e-4, atol=1e-5)
    conv = Conv1D(3, 4).cuda()
    g = stats.gram(conv, [x]).tensors["weight"]
    assert g.shape == (3, 3)
    np.testing.assert_allclose(g.numpy(), flat.T @ flat, rtol=1e-4, atol=1e-5)


@cuda
def test_fisher_cuda_matches_closed_form():
    model = _regression(5).cuda()
    torch.manual_seed(15)
    x, t = torch.randn(6, 3), torch.randn(6)
    st = stats.fisher(model, [(x, t)], _per_example_mse)
    fw, fb = _fisher_expected(model, x, t)
    assert st.tensors["weight"].device.type == "cpu"
    np.testing.assert_allclose(st.tensors["weight"].numpy(), fw, rtol=1e-4)
    np.testing.assert_allclose(st.tensors["bias"].numpy(), fb, rtol=1e-4)
    assert model.weight.grad is None
