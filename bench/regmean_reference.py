"""The PyTorch baselines of bench/regmean_bert: RegMean (Jin et al., eq. 2 with
the non-diagonal scaling alpha),

    W = (sum_i G~_i)^-1 (sum_i G~_i W_i^T),  G~ = alpha G + (1 - alpha) diag(G)

for every linear weight with a Gram; every other tensor is averaged. Two styles:

- float64: the formula in float64 with torch.linalg.solve (a straightforward
  implementation); its result, kept in float64 as DIR/reference.safetensors,
  is the ground truth of the errors below;
- authors: in the style of the RegMean authors' code: float32 in the inputs'
  dtype, the off-diagonal entries scaled by alpha, sum G~ W^T, torch.inverse
  of sum G~, all in memory (run after float64).

Reads the files regmean_bert wrote and prints its own time (load, merge,
save), its peak RSS and the errors of its result against the float64 solve,
then a line with the errors of each RESULT (amalgam's merged model files)
given, two ways: the
largest relative difference of the weights (max |W - W*| / max |W*| over
each tensor), and the largest over the weights of the relative difference of
the merged layer's outputs on the pooled inputs, ||(W - W*) L||_F / ||W* L||_F
with sum G~ = L L^T (what the model's predictions feel).

    /usr/bin/python3 bench/regmean_reference.py DIR MODELS ALPHA float64|authors \
        [RESULT ...]
"""

import importlib.util
import pathlib
import resource
import sys
import time

import torch

# The client's safetensors module, loaded on its own (the package would import
# gRPC, which a GPU machine may not have).
_SPEC = importlib.util.spec_from_file_location(
    "amalgam_safetensors",
    pathlib.Path(__file__).resolve().parent.parent / "client/python/amalgam/safetensors.py")
safetensors = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(safetensors)


def load(path):
    with open(path, "rb") as f:
        return safetensors.loads(f.read())[0]


def load_grams(path):
    """A Gram file's tensors, with each alias.<weight> of its metadata resolved
    to the tensor it names (the authors' code holds a Gram per weight)."""
    with open(path, "rb") as f:
        tensors, metadata = safetensors.loads(f.read())
    for key, target in metadata.items():
        if key.startswith("alias."):
            tensors[key[len("alias."):]] = tensors[target]
    return tensors


def scaled(gram, alpha):
    """alpha G + (1 - alpha) diag(G), in G's dtype."""
    return alpha * gram + (1 - alpha) * torch.diag(torch.diag(gram))


def float64_style(weights, grams, alpha):
    merged = {}
    for name in weights[0]:
        if name in grams[0]:
            gs = [scaled(g[name].double(), alpha) for g in grams]
            a = sum(gs)
            b = sum(g @ w[name].double().T for g, w in zip(gs, weights))
            merged[name] = torch.linalg.solve(a, b).T.contiguous()
        else:
            merged[name] = sum(w[name].double() for w in weights) / len(weights)
    return merged


def authors_style(weights, grams, alpha):
    merged = {}
    for name in weights[0]:
        if name in grams[0]:
            gs = [scaled(g[name], alpha) for g in grams]
            sum_gram = sum(gs)
            sum_gram_w = sum(g @ w[name].T for g, w in zip(gs, weights))
            merged[name] = (torch.inverse(sum_gram) @ sum_gram_w).T.contiguous()
        else:
            merged[name] = sum(w[name] for w in weights) / len(weights)
    return merged


def errors(result, truth, grams, alpha):
    """(largest relative weight difference, largest relative output error)."""
    weight = output = 0.0
    for name, want in truth.items():
        got = result[name].double()
        weight = max(weight, ((got - want).abs().max() / want.abs().max()).item())
        if name in grams[0]:
            pooled = sum(scaled(g[name].double(), alpha) for g in grams)
            lower = torch.linalg.cholesky(pooled)
            output = max(output, (torch.linalg.norm((got - want) @ lower) /
                                  torch.linalg.norm(want @ lower)).item())
    return weight, output


def main():
    directory, models, alpha, style = (sys.argv[1], int(sys.argv[2]), float(sys.argv[3]),
                                       sys.argv[4])
    results = sys.argv[5:]
    start = time.monotonic()
    weights = [load(f"{directory}/model{m}.safetensors") for m in range(models)]
    grams = [load_grams(f"{directory}/gram{m}.safetensors") for m in range(models)]
    if style == "float64":
        merged = float64_style(weights, grams, alpha)
        with open(f"{directory}/reference.safetensors", "wb") as f:
            f.write(safetensors.dumps(merged))
    else:
        merged = authors_style(weights, grams, alpha)
        with open(f"{directory}/authors.safetensors", "wb") as f:
            f.write(safetensors.dumps(merged))
    seconds = time.monotonic() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    truth = load(f"{directory}/reference.safetensors")
    own = errors(merged, truth, grams, alpha)
    print(f"seconds={seconds:.3f} peak_rss_mib={peak_mib:.0f} weight_error={own[0]:.3g} "
          f"output_error={own[1]:.3g}")
    for result in results:
        theirs = errors(load(result), truth, grams, alpha)
        print(f"weight_error={theirs[0]:.3g} output_error={theirs[1]:.3g}")


if __name__ == "__main__":
    main()
