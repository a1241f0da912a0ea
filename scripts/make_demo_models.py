#!/usr/bin/python3
"""Writes small fine-tuned-looking models and their statistics for demos and tests.

Each model is a 2-layer MLP (torch.nn.Sequential(Linear(16, 32), ReLU(), Linear(32, 8))):
`0.weight` [32,16], `0.bias` [32], `2.weight` [8,32], `2.bias` [8], all F32. The models
share a random "pretrained" base and differ by a per-model fine-tuning delta. For model i
the directory gets:

  model_i.safetensors   the weights
  gram_i.safetensors    Gram matrices of the linear layers' inputs, G = X^T X summed
                        over rows: `0.weight` [16,16] from the model's inputs,
                        `2.weight` [32,32] from the hidden ReLU activations;
                        metadata num_examples (rows), reduction "sum"
  fisher_i.safetensors  diagonal empirical Fisher of every parameter (cross-entropy
                        with labels drawn from the model's own predictions, mean over
                        examples); metadata num_examples

Each model sees its own input distribution (a shifted, scaled Gaussian), so the Grams
differ and RegMean differs from the plain average. Output is deterministic per seed.

usage: make_demo_models.py OUT_DIR [--count N] [--examples R] [--seed S]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
import safetensors_np  # noqa: E402

IN, HIDDEN, OUT = 16, 32, 8


def base_model(rng):
    return {
        "0.weight": rng.normal(0.0, 1.0 / np.sqrt(IN), (HIDDEN, IN)),
        "0.bias": rng.normal(0.0, 0.1, (HIDDEN,)),
        "2.weight": rng.normal(0.0, 1.0 / np.sqrt(HIDDEN), (OUT, HIDDEN)),
        "2.bias": rng.normal(0.0, 0.1, (OUT,)),
    }


def fine_tune(base, rng, scale):
    return {name: value + rng.normal(0.0, scale * value.std(), value.shape) for name, value in base.items()}


def statistics(model, inputs, rng):
    """Returns (grams, fishers) in float64 for float32-rounded weights `model`."""
    w0, b0, w2, b2 = (model[k].astype(np.float64) for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    pre = inputs @ w0.T + b0
    hidden = np.maximum(pre, 0.0)
    logits = hidden @ w2.T + b2
    grams = {"0.weight": inputs.T @ inputs, "2.weight": hidden.T @ hidden}

    # Per-example gradients of the cross-entropy with sampled labels.
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(OUT, p=p) for p in probs])
    d_logits = probs.copy()
    d_logits[np.arange(len(labels)), labels] -= 1.0
    d_hidden = (d_logits @ w2) * (pre > 0)
    fishers = {
        "2.weight": np.einsum("no,nh->oh", d_logits**2, hidden**2) / len(inputs),
        "2.bias": (d_logits**2).mean(axis=0),
        "0.weight": np.einsum("nh,ni->hi", d_hidden**2, inputs**2) / len(inputs),
        "0.bias": (d_hidden**2).mean(axis=0),
    }
    return grams, fishers


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=3, help="number of models (default 3)")
    parser.add_argument("--examples", type=int, default=256, help="rows per Gram (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.count < 1 or args.examples < 1:
        parser.error("--count and --examples must be positive")

    os.makedirs(args.out_dir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    base = base_model(rng)
    for i in range(args.count):
        model = {k: v.astype(np.float32) for k, v in fine_tune(base, rng, 0.3).items()}
        shift = rng.normal(0.0, 0.5, IN)
        scale = rng.uniform(0.5, 2.0, IN)
        inputs = rng.normal(0.0, 1.0, (args.examples, IN)) * scale + shift
        grams, fishers = statistics(model, inputs, rng)
        meta = {"num_examples": args.examples}
        safetensors_np.save(model, os.path.join(args.out_dir, f"model_{i}.safetensors"),
                            {"format": "pt", "demo_model": i})
        safetensors_np.save({k: v.astype(np.float32) for k, v in grams.items()},
                            os.path.join(args.out_dir, f"gram_{i}.safetensors"),
                            dict(meta, reduction="sum"))
        safetensors_np.save({k: v.astype(np.float32) for k, v in fishers.items()},
                            os.path.join(args.out_dir, f"fisher_{i}.safetensors"), meta)
    print(f"wrote {args.count} models with gram and fisher files to {args.out_dir}")


if __name__ == "__main__":
    main()
