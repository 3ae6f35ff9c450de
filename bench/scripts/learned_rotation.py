"""A learned residual rotation for SmolLM2 W4A8 (SpinQuant, Liu et al. 2024), as an experiment:
does training the residual stream's rotation (instead of the preset's seeded randomized
Hadamard) close the W4A8 gap that GPTQ leaves (docs/experiments/rotation.md)?

Training needs the LM loss's gradient through every weight that reads or writes the residual
stream: on 2 CPU cores one forward+backward of one 4 x 256 batch takes 22 s, so the training
runs on a GPU (``train``) and everything else here, on the CPU:

1. ``prepare DIR`` (CPU, the library): the calibration split of the Wikipedia text as
   512-token sequences, the evaluation windows (``DecoderEval``'s), and the preset's fixed
   rotations (``RotateResidual``'s Q0, ``RotateHeads``' per-head H, ``RotateFFN``'s Kronecker
   factors, all seed 0), so that training starts from exactly the preset's rotation.
2. ``train DIR GGUF OUT`` (GPU; plain torch + transformers, the library is not imported): the
   model with norm gammas folded into the Linears reading them, the rotations folded as the
   passes fold them, int4 asymmetric per-row round-to-nearest weights (8-bit symmetric LM head
   and embedding) and int8 per-tensor activations on every Linear input (the first token on
   its own grid) as straight-through fake quantization; R1 = Q0 expm(A - A^T) with A trained
   by Adam on the LM loss (the skew parametrization keeps R1 orthogonal by construction; the
   Stiefel-manifold SGD of SpinQuant does the same by a Cayley retraction). Writes each
   variant's R1 (float64) and a JSON of losses and proxy perplexities (round-to-nearest
   weights, dynamic activation ranges: a guide, not a result).
3. The result is measured on the CPU by the library's own pipeline with the learned R1 in place
   of Q0 (``w4a8_weight_rounding.py --rotation FILE``): GPTQ, static activation ranges, the
   evaluation windows.

Every constant is set here and none was chosen on the evaluation windows: variants are
compared on held-out calibration sequences (the last 10%).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch
import torch.nn.functional as F

SEQ = 512  # calibration sequence length (SpinQuant trains on 2048; SmolLM2's text here is short)
HELD_OUT = 0.1  # share of the calibration sequences held out to compare variants


def prepare(out: pathlib.Path) -> None:
    from outlierfx import corpus
    from outlierfx.evaluate import DecoderEval
    from outlierfx.models import load_smollm2
    from outlierfx.quantizers.hadamard import hadamard, kronecker_hadamard

    loaded = load_smollm2()
    tokenizer, config = loaded.tokenizer, loaded.model.config
    ids: list[int] = []
    for text in corpus.wikipedia("calibration"):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    count = len(ids) // SEQ
    evaluation = DecoderEval.build(loaded)
    ffn = kronecker_hadamard(config.intermediate_size, 0)
    head_dim = config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        windows = evaluation.wiki[:4]
        logits = loaded.model(input_ids=windows, attention_mask=torch.ones_like(windows)).logits
        reference = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"calibration": torch.tensor(ids[: count * SEQ], dtype=torch.int32).reshape(count, SEQ),
                "wiki": evaluation.wiki.int(), "news": evaluation.news.int(),
                "residual": hadamard(config.hidden_size, 0).matrix, "heads": hadamard(head_dim, 0).matrix,
                "ffn_left": ffn.left.matrix, "ffn_right": ffn.right.matrix,
                "reference_loss_wiki4": reference}, out / "data.pt")
    print(f"{count} sequences of {SEQ} tokens; FP32 loss on 4 wiki windows {reference:.6f}")


# ---- fake quantization with straight-through gradients ------------------------------------


def _straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    return x + (rounded - x).detach()


def asymmetric_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2**bits - 1
    lo = w.detach().amin(1, keepdim=True).clamp(max=0)
    hi = w.detach().amax(1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    codes = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
    return _straight_through(w, (codes - zero) * scale)


def symmetric_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = (w.detach().abs().amax(1, keepdim=True) / qmax).clamp(min=1e-12)
    return _straight_through(w, torch.clamp(torch.round(w / scale), -qmax, qmax) * scale)


def _uint8_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    return _straight_through(x, (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale)


def activations(x: torch.Tensor) -> torch.Tensor:
    """int8 per tensor over tokens 1.. (dynamic range: the static one's stand-in), the first
    token of each sequence on its own grid (the preset's ``sink``)."""
    first, rest = x[:, :1], x[:, 1:]
    d = x.detach()
    first_q = _uint8_range(first, d[:, :1].amin(-1, keepdim=True), d[:, :1].amax(-1, keepdim=True))
    rest_q = _uint8_range(rest, d[:, 1:].amin(), d[:, 1:].amax())
    return torch.cat([first_q, rest_q], 1)


# ---- the model with its rotations folded -------------------------------------------------


class Folded:
    """SmolLM2's weights with gammas folded and the fixed rotations (heads, FFN) applied, ready
    for any residual rotation R1: ``params(R1)`` gives the weights ``functional_call`` runs."""

    def __init__(self, model: torch.nn.Module, data: dict, device: str) -> None:
        self.model = model
        cfg = model.config
        base = {k: v.to(device, torch.float64) for k, v in model.state_dict().items()}
        heads = data["heads"].to(device)
        kv_blocks = torch.block_diag(*[heads] * cfg.num_key_value_heads)
        q_blocks = torch.block_diag(*[heads] * cfg.num_attention_heads)
        self.ffn = torch.kron(data["ffn_left"], data["ffn_right"]).to(device)
        self.readers: dict[str, torch.Tensor] = {}  # W (gamma folded), rotated as W R1
        self.writers: dict[str, torch.Tensor] = {}  # W, rotated as R1^T W
        self.ones: dict[str, torch.Tensor] = {}
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            g1, g2 = base[p + "input_layernorm.weight"], base[p + "post_attention_layernorm.weight"]
            self.ones[p + "input_layernorm.weight"] = torch.ones_like(g1, dtype=torch.float32)
            self.ones[p + "post_attention_layernorm.weight"] = torch.ones_like(g2, dtype=torch.float32)
            self.readers[p + "self_attn.q_proj.weight"] = base[p + "self_attn.q_proj.weight"] * g1
            self.readers[p + "self_attn.k_proj.weight"] = base[p + "self_attn.k_proj.weight"] * g1
            self.readers[p + "self_attn.v_proj.weight"] = kv_blocks.T @ (base[p + "self_attn.v_proj.weight"] * g1)
            self.writers[p + "self_attn.o_proj.weight"] = base[p + "self_attn.o_proj.weight"] @ q_blocks
            self.readers[p + "mlp.gate_proj.weight"] = base[p + "mlp.gate_proj.weight"] * g2
            self.readers[p + "mlp.up_proj.weight"] = base[p + "mlp.up_proj.weight"] * g2
            self.writers[p + "mlp.down_proj.weight"] = base[p + "mlp.down_proj.weight"] @ self.ffn
        embedding = base["model.embed_tokens.weight"]
        self.embedding = embedding
        self.head = embedding * base["model.norm.weight"]
        self.ones["model.norm.weight"] = torch.ones_like(base["model.norm.weight"], dtype=torch.float32)
        for table in (self.readers, self.writers):
            for k in table:
                table[k] = table[k].float()
        self.embedding, self.head, self.ffn = self.embedding.float(), self.head.float(), self.ffn.float()

    def params(self, r1: torch.Tensor, weight_bits: int | None) -> dict[str, torch.Tensor]:
        low = (lambda w: asymmetric_rows(w, weight_bits)) if weight_bits else (lambda w: w)
        wide = (lambda w: symmetric_rows(w, 8)) if weight_bits else (lambda w: w)
        out = dict(self.ones)
        for k, w in self.readers.items():
            out[k] = low(w @ r1)
        for k, w in self.writers.items():
            out[k] = low(r1.T @ w)
        out["model.embed_tokens.weight"] = wide(self.embedding @ r1)
        out["lm_head.weight"] = wide(self.head @ r1)
        return out


def install_activation_quant(model: torch.nn.Module, ffn: torch.Tensor, state: dict) -> None:
    """Every Linear's input fake-quantized while ``state['on']``; each FFN's down projection
    reads its input through the online Hadamard (always: its weight carries the inverse)."""
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        is_down = name.endswith("down_proj")

        def hook(_module, args, is_down=is_down):
            x = args[0] @ ffn if is_down else args[0]
            return (activations(x) if state["on"] else x,)

        module.register_forward_pre_hook(hook)


def lm_loss(model, params, ids: torch.Tensor) -> torch.Tensor:
    logits = torch.func.functional_call(model, params, args=(), kwargs={"input_ids": ids}, tie_weights=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def perplexity(model, params, windows: torch.Tensor, batch: int = 8) -> float:
    total = 0.0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            ids = windows[i : i + batch]
            total += float(lm_loss(model, params, ids)) * ids.shape[0]
    return math.exp(total / windows.shape[0])


def parse_variant(variant: str) -> tuple[int | None, float, int]:
    """``w<bits>:lr<float>:steps<int>``: int<bits> weights in the loop (``w16``: float weights,
    activations alone, as SpinQuant trains before GPTQ), Adam's learning rate, steps."""
    bits, lr, steps = variant.split(":")
    if not (bits.startswith("w") and lr.startswith("lr") and steps.startswith("steps")):
        raise SystemExit(f"bad variant {variant!r}; expected e.g. w4:lr1e-3:steps200")
    return (None if bits == "w16" else int(bits[1:])), float(lr[2:]), int(steps[5:])


def train(data_dir: pathlib.Path, gguf: pathlib.Path, out: pathlib.Path, variants: list[str], batch: int,
          budget_s: float, stop_s: float, device: str) -> None:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    data = torch.load(data_dir / "data.pt")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 attn_implementation="sdpa").to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    seqs = data["calibration"].long().to(device)
    held = max(1, int(len(seqs) * HELD_OUT))
    train_seqs, val_seqs = seqs[:-held], seqs[-held:]
    wiki, news = data["wiki"].long().to(device), data["news"].long().to(device)
    folded = Folded(model, data, device)
    state = {"on": False}
    install_activation_quant(model, folded.ffn, state)
    q0 = data["residual"].to(device)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else device,
                     "train_sequences": len(train_seqs), "held_out_sequences": held, "seq": SEQ, "batch": batch}
    with torch.no_grad():
        ref = float(lm_loss(model, folded.params(q0.float(), None), wiki[:4]))
    results["fp32_loss_wiki4"] = ref
    results["fp32_loss_wiki4_cpu_reference"] = data["reference_loss_wiki4"]
    print(f"loaded in {time.perf_counter() - start:.0f}s; FP32 (rotated) loss {ref:.6f} vs CPU reference "
          f"{data['reference_loss_wiki4']:.6f}", flush=True)

    def score(r1: torch.Tensor) -> dict[str, float]:
        state["on"] = True
        params = folded.params(r1.float(), 4)
        row = {"val_ppl": perplexity(model, params, val_seqs), "wiki_ppl": perplexity(model, params, wiki),
               "news_ppl": perplexity(model, params, news)}
        state["on"] = False
        return {k: round(v, 4) for k, v in row.items()}

    torch.backends.cuda.matmul.allow_tf32 = True  # after the exactness check above: training and proxies
    torch.backends.cudnn.allow_tf32 = True
    results["fp32"] = {"wiki_ppl": perplexity(model, folded.params(q0.float(), None), wiki),
                       "news_ppl": perplexity(model, folded.params(q0.float(), None), news)}
    results["q0_w4a8_rtn"] = score(q0)
    print("Q0 (preset's Hadamard), W4A8 RTN proxy:", results["q0_w4a8_rtn"], flush=True)
    results["variants"] = []
    for variant in variants:
        if time.perf_counter() - start > budget_s:
            print(f"budget reached; skipped {variant}", flush=True)
            break
        weight_bits, lr, steps = parse_variant(variant)
        generator = torch.Generator(device="cpu").manual_seed(0)
        skew = torch.zeros_like(q0, dtype=torch.float32, requires_grad=True)
        optimizer = torch.optim.Adam([skew], lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        losses, t0 = [], time.perf_counter()
        for step in range(steps):
            if time.perf_counter() - start > stop_s:  # keep what was learned; the row says how far
                print(f"{variant}: stopped at step {step} (time)", flush=True)
                break
            ids = train_seqs[torch.randint(0, len(train_seqs), (batch,), generator=generator).to(device)]
            r1 = q0.float() @ torch.linalg.matrix_exp(skew - skew.T)
            state["on"] = True
            loss = lm_loss(model, folded.params(r1, weight_bits), ids)
            state["on"] = False
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(round(float(loss.detach()), 4))
            if step % 25 == 0 or step == steps - 1:
                print(f"{variant} step {step} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        with torch.no_grad():
            s64 = skew.detach().double()
            r1 = q0 @ torch.linalg.matrix_exp(s64 - s64.T)
        name = variant.replace(":", "_").replace(".", "p")
        torch.save({"matrix": r1.cpu(), "variant": variant, "init": "hadamard(576, seed 0)"}, out / f"r1_{name}.pt")
        row = {"variant": variant, "seconds": round(time.perf_counter() - t0, 1), "steps_done": len(losses), "loss_first10": losses[:10],
               "loss_last10": losses[-10:], "orthogonality": float((r1.T @ r1 - torch.eye(len(r1), device=device,
                                                                   dtype=r1.dtype)).abs().max()),
               "moved_fro": float((r1 - q0).norm()), **score(r1)}
        results["variants"].append(row)
        print(row, flush=True)
        (out / "learned_rotation.json").write_text(json.dumps(results, indent=1))
    (out / "learned_rotation.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("out", type=pathlib.Path)
    t = sub.add_parser("train")
    t.add_argument("data", type=pathlib.Path)
    t.add_argument("gguf", type=pathlib.Path)
    t.add_argument("out", type=pathlib.Path)
    t.add_argument("--variants", default="w4:lr1e-3:steps200,w16:lr1e-3:steps200")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--budget-s", type=float, default=400.0)
    t.add_argument("--stop-s", type=float, default=500.0, help="stop training (and still score) after this")
    t.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out)
    else:
        train(args.data, args.gguf, args.out, args.variants.split(","), args.batch, args.budget_s, args.stop_s,
              args.device)


if __name__ == "__main__":
    main()
