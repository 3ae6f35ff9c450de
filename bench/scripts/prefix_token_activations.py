"""Which token can serve as a fixed prefix (PrefixQuant's float-cached prefix) on SmolLM2: the
largest activations at each of the first positions of held-out Wikipedia windows, with no prefix
and with each candidate token before every window.

A prefix token only helps if it takes the attention sink's massive activations *and* leaves the
first real token after it ordinary: a first real token that is still massive lands on the main
activation grid once the prefix runs in float. Reported per position (mean over the windows):
the residual stream's largest |h| over all layers, and the largest |x| at any ``down_proj``
input (where SmolLM2's massive activations are made); ``rest`` is the median over positions
from 6 on.

    PYTHONPATH=$PWD .venv/bin/python bench/scripts/prefix_token_activations.py --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

from outlierfx.evaluate import DecoderEval
from outlierfx.models import load

POSITIONS = 6  # leading positions reported one by one; the rest as a median


def leading_maxima(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, list[float]]:
    """Per position (mean over rows): the residual stream's and the down_proj inputs' max |x|."""
    down: list[torch.Tensor] = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, inp: down.append(inp[0].abs().amax(-1)))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for name, per_layer in (("residual", [h.abs().amax(-1) for h in hidden]), ("down_proj_input", down)):
        peak = torch.stack(per_layer).amax(0)  # [rows, positions]
        out[name] = [round(v, 1) for v in peak.mean(0)[:POSITIONS].tolist()] + [round(float(peak[:, POSITIONS:].median()), 1)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="tokens of each window")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    loaded = load("smollm2")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    ids = DecoderEval.build(loaded).wiki[: args.windows, : args.tokens]
    candidates = {"none": None}
    for role in ("bos_token", "eos_token", "pad_token"):
        token = getattr(tokenizer, role, None)
        if token is not None:
            candidates[f"{role} {token!r}"] = tokenizer.convert_tokens_to_ids(token)
    candidates["'<|endoftext|>'"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    candidates["'\\n'"] = tokenizer("\n").input_ids[0]
    rows = []
    for label, token in candidates.items():
        prefixed = ids if token is None else torch.cat([torch.full((ids.shape[0], 1), token), ids], 1)
        row = {"prefix": label, "token_id": token, **leading_maxima(model, prefixed)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(args.json, "w") as f:
        json.dump({"rows": rows, "positions": f"0..{POSITIONS - 1}, then the median of the rest",
                   "windows": args.windows, "tokens": args.tokens}, f, indent=2)


if __name__ == "__main__":
    main()
