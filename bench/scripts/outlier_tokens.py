"""Which tokens carry massive activations, and where: each Linear's input and each decoder
layer's residual output, per token, on real text (the model's evaluation passages).

    .venv/bin/python bench/scripts/outlier_tokens.py --model smollm2 --json bench/results/smollm2/outlier-tokens.json

For every tensor it prints the median token's largest |value|, position 0's, the largest beyond
position 0 (and how many times the median that is), and the tokens beyond position 0 above
``--times`` x the median (8 by default: a token that alone takes 3 of int8's 8 bits), by text.
A diagnostic for "is the first token the only outlier token?" (docs/experiments/outlier-tokens.md).
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from outlierfx.corpus import news, wikipedia_sample
from outlierfx.models import encode, load


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--texts", type=int, default=24, help="passages: two thirds Wikipedia, one third news")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--times", type=float, default=8.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    loaded = load(args.model)
    texts = wikipedia_sample("evaluation", args.texts * 2 // 3, min_words=150) + news()[: args.texts // 3]
    encoded = encode(loaded, texts, args.seq)
    peaks: dict[str, torch.Tensor] = {}  # tensor -> [batch, seq] largest |value| per token

    def record(name: str, tensor: torch.Tensor) -> None:
        peaks[name] = tensor.detach().abs().amax(-1).float()

    hooks = []
    for name, module in loaded.model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: record(f"{n} (input)", i[0])))
        elif type(module).__name__.endswith("DecoderLayer"):
            hooks.append(module.register_forward_hook(
                lambda m, i, o, n=name: record(f"{n} (output)", o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        loaded.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    for hook in hooks:
        hook.remove()
    mask = encoded["attention_mask"].bool()
    ids = encoded["input_ids"]
    rows = []
    for name, peak in peaks.items():
        median = float(peak[mask].median())
        beyond = peak[:, 1:].masked_fill(~mask[:, 1:], 0)
        big = (beyond > args.times * median).nonzero().tolist()
        tokens = collections.Counter(loaded.tokenizer.decode([int(ids[b, t + 1])]) for b, t in big)
        rows.append({"tensor": name, "median": round(median, 3), "position0": round(float(peak[:, 0].mean()), 2),
                     "max_beyond0": round(float(beyond.max()), 2), "times_median": round(float(beyond.max()) / median, 1),
                     "outlier_tokens": len(big), "top_tokens": tokens.most_common(5)})
        if big or "(output)" in name:
            print(f"{name:40s} median {median:8.2f}  pos0 {rows[-1]['position0']:9.2f}  beyond pos0 up to "
                  f"{rows[-1]['max_beyond0']:8.2f} ({rows[-1]['times_median']:5.1f}x)  {len(big):4d} tokens "
                  f"> {args.times:g}x: {tokens.most_common(3)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "times": args.times, "texts": len(texts), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
