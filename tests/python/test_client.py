"""amalgam.Client against the real amalgamd binary (fixture in conftest.py)."""

import subprocess

import grpc
import pytest
import torch

import amalgam
from amalgam import safetensors


def _models(seed, count=3):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3))
    models = []
    for _ in range(count):
        m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        models.append(m)
    return models


def _batches(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 6, generator=g) for _ in range(n)]


def _regmean_reference(state_dicts, grams, alpha):
    """float64 RegMean from the formula: W^T = (sum G~_i)^-1 sum G~_i W_i^T."""
    out = {}
    for name in state_dicts[0]:
        ws = [sd[name].double() for sd in state_dicts]
        if name in grams[0]:
            gts = []
            for g in grams:
                gram = g[name].double()
                gts.append(alpha * gram + (1 - alpha) * torch.diag(torch.diag(gram)))
            lhs = sum(gts)
            rhs = sum(gt @ w.T for gt, w in zip(gts, ws))
            out[name] = torch.linalg.solve(lhs, rhs).T
        else:
            out[name] = sum(ws) / len(ws)
    return out


def test_import_exposes_the_client_api():
    assert callable(amalgam.Client)
    assert issubclass(amalgam.AmalgamError, Exception)
    assert callable(amalgam.stats.gram) and callable(amalgam.stats.fisher)


def test_safetensors_round_trip_keeps_dtypes_and_values():
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16),
               "c": torch.randn(2, 2).double(), "d": torch.randn(7).half(),
               "s": torch.tensor(1.5)}
    back, metadata = safetensors.loads(safetensors.dumps(tensors, {"k": "v"}))
    assert metadata == {"k": "v"}
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype
        assert back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)


def test_uploaded_state_dict_downloads_unchanged(client):
    state = _models(1, 1)[0].state_dict()
    artifact = client.upload_weights(state, name="one")
    assert artifact.id and artifact.kind == amalgam.client.pb.ARTIFACT_KIND_WEIGHTS
    listed = client.get_artifact(artifact.id)
    assert sorted(t.name for t in listed.tensors) == sorted(state)
    back, _ = safetensors.loads(client.download_bytes(artifact))
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor)


def test_regmean_state_dict_equals_cli_result_and_reference(client, server, cli_path,
                                                            tmp_path):
    models = _models(2)
    states = [m.state_dict() for m in models]
    stats = [amalgam.stats.gram(m, _batches(10 + i)) for i, m in enumerate(models)]
    weights = [client.upload_weights(s, name=f"agent{i}") for i, s in enumerate(states)]
    grams = [client.upload_gram(st, for_weights=w) for st, w in zip(stats, weights)]
    assert grams[0].metadata["num_examples"] == "20"

    merged = client.merge(weights, "regmean", grams=grams, alpha=0.9).state_dict()

    out = tmp_path / "cli.safetensors"
    command = [cli_path, "--server", server, "merge", "--method", "regmean",
               "--alpha", "0.9", "--out", str(out)]
    for w, g in zip(weights, grams):
        command += ["--model", w.id, "--gram", g.id]
    subprocess.run(command, check=True, capture_output=True)
    cli_result, _ = safetensors.load_file(out)
    assert sorted(cli_result) == sorted(merged)
    for name in merged:
        assert torch.equal(merged[name], cli_result[name]), name

    # The float32 Grams as uploaded are what the server saw.
    uploaded = [{k: v.float() for k, v in st.tensors.items()} for st in stats]
    want = _regmean_reference(states, uploaded, 0.9)
    for name, tensor in want.items():
        error = (merged[name].double() - tensor).abs().max() / tensor.abs().max()
        assert error < 1e-5, name


def test_events_report_progress_until_success(client):
    weights = [client.upload_weights(m.state_dict()) for m in _models(3, 2)]
    job = client.merge(weights, "weighted", coefficients=[1, 3])
    events = list(job.events())
    assert events[-1].state == amalgam.client.pb.JOB_STATE_SUCCEEDED
    assert events[-1].progress.tensors_done == events[-1].progress.tensors_total == 4
    assert job.state == "succeeded"
    merged = job.state_dict()
    a, b = (m.state_dict() for m in _models(3, 2))
    for name in merged:
        want = 0.25 * a[name].double() + 0.75 * b[name].double()
        assert torch.allclose(merged[name].double(), want, rtol=1e-6, atol=1e-7)


def test_fisher_merge_from_collected_statistics(client):
    models = _models(4, 2)

    def loss_fn(model, batch):
        return model(batch).pow(2).sum(dim=1)

    weights, fishers, stats = [], [], []
    for i, m in enumerate(models):
        st = amalgam.stats.fisher(m, _batches(20 + i), loss_fn)
        w = client.upload_weights(m.state_dict())
        weights.append(w)
        fishers.append(client.upload_fisher(st, for_weights=w))
        stats.append(st)
    merged = client.merge(weights, "fisher", fishers=fishers).state_dict()
    for name in merged:
        fs = [st.tensors[name].float().double() for st in stats]
        ws = [m.state_dict()[name].double() for m in models]
        want = sum(f * w for f, w in zip(fs, ws)) / sum(fs)
        assert torch.allclose(merged[name].double(), want, rtol=1e-5, atol=1e-6), name


def test_failed_merge_raises_with_the_servers_code_and_message(client):
    weights = [client.upload_weights(m.state_dict()) for m in _models(5, 2)]
    with pytest.raises(amalgam.AmalgamError) as error:
        client.merge(weights[:1], "average")
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "two models" in error.value.message

    other = {k: v for k, v in _models(5, 1)[0].state_dict().items()}
    other["2.bias"] = torch.zeros(4)
    odd = client.upload_weights(other)
    with pytest.raises(amalgam.AmalgamError) as error:
        client.merge([weights[0], odd], "average")
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "2.bias" in error.value.message

    with pytest.raises(amalgam.AmalgamError) as error:
        client.merge(weights, "regmean")
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION

    with pytest.raises(amalgam.AmalgamError) as error:
        client.job("job_missing").wait()
    assert error.value.code == grpc.StatusCode.NOT_FOUND


def test_owner_deletes_and_shares(client):
    artifact = client.upload_weights(_models(6, 1)[0].state_dict())
    client.share(artifact, "org-x")
    assert list(client.get_artifact(artifact).shared_with) == ["org-x"]
    client.share(artifact, "org-x", revoke=True)
    assert list(client.get_artifact(artifact).shared_with) == []
    client.delete(artifact)
    with pytest.raises(amalgam.AmalgamError) as error:
        client.get_artifact(artifact)
    assert error.value.code == grpc.StatusCode.NOT_FOUND


def test_tls_client_talks_to_a_tls_server(tmp_path, amalgamd_path):
    script = f"""set -e; cd {tmp_path}
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=ca 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout s.key -out s.csr -subj /CN=s 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\\n' > s.ext
openssl x509 -req -in s.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out s.pem -days 1 -extfile s.ext 2>/dev/null
"""
    subprocess.run(["bash", "-c", script], check=True)
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [amalgamd_path, "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"),
         "--port-file", str(port_file), "--metrics-listen", "127.0.0.1:0",
         "--tls-cert", str(tmp_path / "s.pem"),
         "--tls-key", str(tmp_path / "s.key")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time
        deadline = time.monotonic() + 60
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        address = f"127.0.0.1:{port_file.read_text().split()[0]}"
        with amalgam.Client(address, tls_ca=str(tmp_path / "ca.pem")) as secure:
            assert secure.list_artifacts() == []
        with amalgam.Client(address, timeout=5) as plain:
            with pytest.raises(amalgam.AmalgamError) as error:
                plain.list_artifacts()
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_sweep_yields_the_interpolation_path_lazily(client, tmp_path, server, cli_path):
    a, b = (m.state_dict() for m in _models(11, count=2))
    a_id = client.upload_weights(a, name="a").id
    b_id = client.upload_weights(b, name="b").id
    job = client.sweep(a_id, b_id, steps=5, name="path")
    points = job.models()
    t, first = next(points)  # nothing else downloaded yet
    assert t == 0.0
    for name in a:
        assert torch.equal(first[name], a[name])
    rest = list(points)
    assert [t for t, _ in rest] == [0.25, 0.5, 0.75, 1.0]
    for t, model in rest:
        for name in a:
            want = ((1 - t) * a[name].double() + t * b[name].double()).float()
            if t == 1.0:
                assert torch.equal(model[name], b[name])
            else:
                assert torch.allclose(model[name], want, rtol=1e-6, atol=1e-7)

    # The CLI writes the same path to a directory, a model directory each.
    out = tmp_path / "curve"
    run = subprocess.run([cli_path, "--server", server, "sweep", "--a", a_id, "--b", b_id,
                          "--steps", "3", "--out", str(out), "--name", "cli"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith("job_")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["cli-t0.0000", "cli-t0.5000", "cli-t1.0000"]
    assert [p.name for p in (out / "cli-t0.5000").iterdir()] == ["model.safetensors"]
    midpoint, _ = safetensors.load_file(out / "cli-t0.5000" / "model.safetensors")
    average = client.merge([a_id, b_id], "average").state_dict()
    for name in a:
        assert torch.equal(midpoint[name], average[name])


def _gpt2(d, seed, vocab=11, positions=8, layers=2):
    """A GPT-2-shaped state dict (Conv1D weights are [in, out]) of width d."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    sd = {"wte.weight": randn(vocab, d), "wpe.weight": randn(positions, d),
          "ln_f.weight": randn(d).abs() + 0.5, "ln_f.bias": randn(d),
          "lm_head.weight": randn(vocab, d)}
    for layer in range(layers):
        p = f"h.{layer}."
        sd.update({
            p + "ln_1.weight": randn(d).abs() + 0.5, p + "ln_1.bias": randn(d),
            p + "attn.c_attn.weight": randn(d, 3 * d, scale=0.3),
            p + "attn.c_attn.bias": randn(3 * d),
            p + "attn.c_proj.weight": randn(d, d, scale=0.3), p + "attn.c_proj.bias": randn(d),
            p + "ln_2.weight": randn(d).abs() + 0.5, p + "ln_2.bias": randn(d),
            p + "mlp.c_fc.weight": randn(d, 4 * d, scale=0.3), p + "mlp.c_fc.bias": randn(4 * d),
            p + "mlp.c_proj.weight": randn(4 * d, d, scale=0.15),
            p + "mlp.c_proj.bias": randn(d)})
    return sd


def _gpt2_logits(sd, ids, heads, layer_norm):
    """GPT-2 forward in float64 (head size = width / heads); LayerNorm is
    the identity unless ``layer_norm``."""
    w = {k: v.double() for k, v in sd.items()}

    def norm(x, p):
        if not layer_norm:
            return x
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w[p + ".weight"], w[p + ".bias"])

    t = len(ids)
    x = w["wte.weight"][ids] + w["wpe.weight"][:t]
    d = x.shape[1]
    hd = d // heads
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    for layer in range(2):
        p = f"h.{layer}."
        q, k, v = (norm(x, p + "ln_1") @ w[p + "attn.c_attn.weight"]
                   + w[p + "attn.c_attn.bias"]).split(d, dim=1)
        q, k, v = (z.reshape(t, heads, hd).transpose(0, 1) for z in (q, k, v))
        att = (q @ k.transpose(1, 2) / hd ** 0.5).masked_fill(mask, float("-inf")).softmax(-1)
        o = (att @ v).transpose(0, 1).reshape(t, d)
        x = x + o @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        f = torch.nn.functional.gelu(norm(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"]
                                     + w[p + "mlp.c_fc.bias"])
        x = x + f @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    return norm(x, "ln_f") @ w["lm_head.weight"].T


def test_grow_two_tiny_gpt2_models(client):
    a, b = _gpt2(8, 1), _gpt2(12, 2)  # 2 and 3 heads of size 4
    job = client.grow(client.upload_weights(a, name="a"), client.upload_weights(b, name="b"),
                      layout="gpt2", name="grown")
    grown = job.state_dict()
    assert grown["h.0.attn.c_attn.weight"].shape == (20, 60)
    assert grown["wte.weight"].shape == (11, 20)
    assert grown["h.1.mlp.c_proj.weight"].shape == (80, 20)
    report = job.report
    assert report["config"]["n_embd"] == 20 and report["config"]["n_layer"] == 2
    assert report["properties"]["output_is_mean_of_inputs_without_layernorm"] is True
    assert report["properties"]["output_is_mean_of_inputs"] is False
    assert any("LayerNorm" in c for c in report["caveats"])

    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    want = (_gpt2_logits(a, ids, 2, False) + _gpt2_logits(b, ids, 3, False)) / 2
    got = _gpt2_logits(grown, ids, 5, False)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-10
    # With LayerNorm, as the report says, the mean is not kept.
    with_norm = (_gpt2_logits(a, ids, 2, True) + _gpt2_logits(b, ids, 3, True)) / 2
    assert ((_gpt2_logits(grown, ids, 5, True) - with_norm).abs().max() > 1e-3).item()


def test_grow_refuses_a_layout_that_does_not_fit(client, server, cli_path, tmp_path):
    a = client.upload_weights(_gpt2(8, 3), name="a")
    with pytest.raises(amalgam.AmalgamError) as error:
        client.grow(a, layout="bert")
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "fits no rule of the bert layout" in error.value.message
    with pytest.raises(amalgam.AmalgamError) as error:
        client.grow(a, layout="resnet")
    assert "unknown layout 'resnet'" in error.value.message

    # An MLP self-fusion from the CLI keeps the function.
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    mlp = client.upload_weights(net.state_dict(), name="mlp")
    out = tmp_path / "grown.safetensors"
    run = subprocess.run([cli_path, "--server", server, "grow", "--a", mlp.id, "--layout",
                          "mlp", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert '"self_fusion":true' in run.stderr
    grown, _ = safetensors.loads(out.read_bytes())
    wide = torch.nn.Sequential(torch.nn.Linear(4, 12), torch.nn.ReLU(), torch.nn.Linear(12, 2))
    wide.load_state_dict(grown)
    x = torch.randn(16, 4)
    assert torch.allclose(wide(x), net(x), rtol=1e-6, atol=1e-6)
