"""A straightforward PyTorch implementation of RegMean (Jin et al., eq. 2 with
the non-diagonal scaling alpha), the baseline of bench/regmean_bert:

    W = (sum_i G~_i)^-1 (sum_i G~_i W_i^T),  G~ = alpha G + (1 - alpha) diag(G)

in float64 with torch.linalg.solve; every other tensor is averaged. Reads the
files regmean_bert wrote, writes DIR/reference.safetensors, and prints its
own time (load, merge, save), its peak RSS and the largest relative
difference from amalgam's result (DIR/merged/model.safetensors).

    /usr/bin/python3 bench/regmean_reference.py DIR MODELS ALPHA
"""

import resource
import sys
import time

import torch

from amalgam import safetensors


def load(path):
    with open(path, "rb") as f:
        return safetensors.loads(f.read())[0]


def main():
    directory, models, alpha = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    start = time.monotonic()
    weights = [load(f"{directory}/model{m}.safetensors") for m in range(models)]
    grams = [load(f"{directory}/gram{m}.safetensors") for m in range(models)]
    merged = {}
    for name in weights[0]:
        if name in grams[0]:
            gs = []
            for g in grams:
                g = g[name].double()
                gs.append(alpha * g + (1 - alpha) * torch.diag(torch.diag(g)))
            a = sum(gs)
            b = sum(g @ w[name].double().T for g, w in zip(gs, weights))
            merged[name] = torch.linalg.solve(a, b).T.float().contiguous()
        else:
            merged[name] = (sum(w[name].double() for w in weights) / models).float()
    with open(f"{directory}/reference.safetensors", "wb") as f:
        f.write(safetensors.dumps(merged))
    seconds = time.monotonic() - start
    ours = load(f"{directory}/merged/model.safetensors")
    worst = max(((ours[n].double() - t.double()).abs().max() /
                 t.double().abs().max()).item() for n, t in merged.items())
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"seconds={seconds:.3f} peak_rss_mib={peak_mib:.0f} max_relative_difference={worst:.3g}")


if __name__ == "__main__":
    main()
