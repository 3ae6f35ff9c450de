"""The int8 Linear the eager engines run: torch.ao's ``quantized::linear`` and oneDNN's GEMM.

torch.ao's quantized engines (``fbgemm`` and ``x86`` on x86 CPUs, ``qnnpack`` for ARM, also
built on x86) execute ``quantized::linear`` with per-channel int8 weights and uint8 activations;
the requantization to the output's scale is fused into the kernel. ``onednn`` runs the same
GEMM through ``onednn::qlinear_pointwise``, the kernel inductor's int8 patterns call, in eager
mode: it reads plain uint8 codes, returns float or requantized uint8, can fuse a GELU into its
output, and uses AMX/VNNI int8 instructions where the CPU has them (on this project's x86
machines about 4x faster than fbgemm per GEMM; ``bench/int8_gemm.py``). Packed weights are
specific to the engine and the CPU, so :class:`QuantizedLinear` stores the plain int8 weight
and packs it on first use (also after loading a saved model in a new process).

The engine tables below are what these kernels do; the backends' :class:`~outlierfx.backends.capabilities.Capabilities` read them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .capabilities import BackendError, PostOp
from .runtime import (clamp_to_grid, first_rows, quantized_engine, quantized_tensors_quietly, two_grid_codes,
                      uint8_codes)

EAGER_ENGINES = ("fbgemm", "x86", "qnnpack", "onednn")  # torch.backends.quantized engines
# Engines with an int8 GEMM whose output is float (the int32 accumulator scaled, no requantization).
FLOAT_OUTPUT_ENGINES = ("fbgemm", "x86", "onednn")
FUSED_POST_OPS = {
    "fbgemm": frozenset({PostOp.REQUANTIZE}),
    "x86": frozenset({PostOp.REQUANTIZE}),
    "qnnpack": frozenset({PostOp.REQUANTIZE}),
    # a GELU before any requantization; a float residual added in the GEMM (a binary post-op)
    "onednn": frozenset({PostOp.REQUANTIZE, PostOp.GELU, PostOp.RESIDUAL_ADD}),
}


def _fuses(engine: str, post_op: PostOp) -> bool:
    return post_op in FUSED_POST_OPS[engine]


class QuantizedLinear(torch.nn.Module):
    """``y = x W^T + b`` on an int8 kernel: ``x`` is quantized with the calibrated (static)
    ``in_scale``/``in_zero_point`` (uint8 grid ``[in_qmin, in_qmax]``), ``W`` is int8 per output
    channel. With ``out_qparams`` the kernel requantizes to that uint8 grid and returns a quint8
    tensor (the next int8 op reads it as is); without, the int32 accumulator is scaled to float
    (``fbgemm``/``x86`` only).
    """

    def __init__(self, weight_int8: torch.Tensor | Sequence[torch.Tensor], weight_scale: torch.Tensor,
                 bias: torch.Tensor | None,
                 in_qparams: tuple[float, int, int, int], out_qparams: tuple[float, int] | None, engine: str,
                 gelu: str | None = None, sink: tuple[int, float, int] | None = None, residual: bool = False,
                 sink_out: tuple[int, float, int] | None = None) -> None:
        super().__init__()
        blocks = [weight_int8] if isinstance(weight_int8, torch.Tensor) else list(weight_int8)
        if any(b.dtype != torch.int8 for b in blocks):
            raise ValueError(f"weight must be int8, got {[b.dtype for b in blocks]}")
        if len({b.shape[1:] for b in blocks}) != 1 or any(b.dim() != 2 for b in blocks):
            raise ValueError(f"the weight's row blocks must be 2-D with one width, got {[tuple(b.shape) for b in blocks]}")
        if out_qparams is None and engine not in FLOAT_OUTPUT_ENGINES:
            raise BackendError(f"engine {engine} has no int8 GEMM with float output")
        if gelu is not None and (not _fuses(engine, PostOp.GELU) or gelu not in ("none", "tanh")):
            raise BackendError(f"a fused GELU ({gelu!r}) needs an engine that fuses it, not {engine}")
        # A merged GEMM (Q/K/V, gate/up) keeps its parts' int8 rows as they are, one buffer each
        # (the codes the lowered model holds for saving are those buffers): its stacked weight
        # exists only while it is packed. Stacked for good, it was a second int8 copy of those
        # rows next to onednn's packed one (70 MB on SmolLM2; docs/experiments/memory.md).
        self.row_blocks = len(blocks)
        for name, block in zip(self._block_names(), blocks):
            self.register_buffer(name, block.contiguous())
        self.register_buffer("weight_scale", weight_scale.detach().double())  # no copy if already float64
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.in_scale, self.in_zero_point, self.in_qmin, self.in_qmax = float(in_qparams[0]), *map(int, in_qparams[1:])
        self.out_qparams = None if out_qparams is None else (float(out_qparams[0]), int(out_qparams[1]))
        self.engine = engine
        self.gelu = gelu  # GELU approximation ("none" or "tanh") fused into the output, if any
        if sink is not None and engine != "onednn" and (out_qparams is not None or gelu is not None):
            raise BackendError(f"a first-token input grid on {engine} needs a float output without a fused GELU")
        # (n, scale, zero point): the first n positions of a [batch, seq, in] input have their own grid
        self.sink = None if sink is None else (int(sink[0]), float(sink[1]), int(sink[2]))
        if sink_out is not None and (engine != "onednn" or out_qparams is None):
            raise BackendError("a first-token output grid needs a requantized output on onednn")
        if sink_out is not None and sink is not None and int(sink_out[0]) != self.sink[0]:
            raise BackendError("the first-token input and output grids must cover as many positions")
        # (n, scale, zero point) of the first n output positions; with a requantized output the
        # module then returns plain uint8 codes (two grids fit no quint8 tensor)
        self.sink_out = None if sink_out is None else (int(sink_out[0]), float(sink_out[1]), int(sink_out[2]))
        if residual and (not _fuses(engine, PostOp.RESIDUAL_ADD) or out_qparams is not None or gelu is not None):
            raise BackendError(f"a fused residual add needs a float output without GELU on an engine that "
                               f"fuses it, not {engine}")
        self.residual = residual  # forward takes a second float tensor, added to the output in the kernel
        # onednn with out_qparams: return the plain uint8 codes (set by Lower when only other onednn
        # GEMMs read them; wrapping them in a quint8 tensor copies them)
        self.codes_out = False
        # onednn float output: float32, or bfloat16 where only bf16 attention reads it (set by Lower)
        self.out_dtype = torch.float32
        self._packed: object | None = None

    def _block_names(self) -> list[str]:
        return ["weight_int8"] if self.row_blocks == 1 else [f"weight_int8_{i}" for i in range(self.row_blocks)]

    def weight_blocks(self) -> list[torch.Tensor]:
        """The int8 weight's row blocks (one, or a merged GEMM's parts), in output order."""
        return [getattr(self, name) for name in self._block_names()]

    def int8_weight(self) -> torch.Tensor:
        """The whole ``[out, in]`` int8 weight (a merged GEMM's blocks stacked: a new tensor)."""
        blocks = self.weight_blocks()
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    @property
    def in_features(self) -> int:
        return self.weight_blocks()[0].shape[1]

    @property
    def out_features(self) -> int:
        return sum(block.shape[0] for block in self.weight_blocks())

    def _pack(self) -> object:
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        weight = self.int8_weight()  # stacked only for packing: freed once packed
        if self.engine == "onednn":
            # sum_k W[o, k] w_scale[o]: the closed-form first-row correction of _onednn_sink; summed
            # 4,096 rows at a time: sum(dtype=int64) makes an int64 copy of what it sums, 226 MB
            # for SmolLM2's LM head, the peak of the low-memory run's lowered check
            sums = torch.cat([rows.sum(1, dtype=torch.int64) for rows in weight.split(4096)])
            row_sums = (sums.double() * self.weight_scale).float()
            self._packed = (torch.ops.onednn.qlinear_prepack(weight, None), self.weight_scale.float(), zeros,
                            row_sums)
            return self._packed
        with quantized_engine(self.engine), quantized_tensors_quietly():
            qweight = torch._make_per_channel_quantized_tensor(weight, self.weight_scale, zeros, 0)
            self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
        return self._packed

    # torch.compile runs the packed kernel eagerly: traced, a oneDNN GEMM whose packed weight is a
    # graph input (not a frozen constant) crashes inductor's GEMM + add fusion (torch 2.13)
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                first_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: float, or (with ``out_qparams``, or on ``onednn``) already a quint8 tensor on
        the input grid (``onednn`` also takes its plain uint8 codes). ``residual`` (a module built
        with ``residual=True``): a float tensor of the output's shape, added inside the kernel.
        ``first_tokens``: the graph's ``[batch, seq]`` first-token mask, the rows on the
        first-token grids (``sink``, ``sink_out``); without it, the first columns of a longer call.
        Returns the quint8 output with ``out_qparams``, else float."""
        if (residual is not None) != self.residual:
            raise ValueError("pass a residual exactly when the module was built with residual=True")
        with quantized_tensors_quietly():
            if residual is not None:
                shape = (*x.shape[:-1], self.out_features)
                if tuple(residual.shape) != shape or residual.dtype != torch.float32:  # a broadcast: add outside
                    return self._run(x, None, first_tokens) + residual
                residual = residual.contiguous()  # the post-op reads it densely: a strided view gives wrong sums
            return self._run(x, residual, first_tokens)

    def _run(self, x: torch.Tensor, residual: torch.Tensor | None, first: torch.Tensor | None) -> torch.Tensor:
        packed = self._packed if self._packed is not None else self._pack()
        if self.sink is not None and self.engine == "onednn" and x.dtype in (torch.float32, torch.uint8):
            return self._onednn_sink(x, packed, residual, first)  # type: ignore[arg-type]
        if self.sink_out is not None:
            return self._onednn_sink_out(x, packed, first)  # type: ignore[arg-type]
        rows = first_rows(x, self.sink[0], first) if self.sink is not None and x.is_floating_point() else None
        if rows is not None:  # two GEMMs: every row on the main grid, the first tokens' again on theirs
            n, scale, zero_point = self.sink  # type: ignore[misc]
            y = self._gemm(x, packed, self.in_scale, self.in_zero_point)
            y[rows] = self._gemm(x[rows], packed, scale, zero_point)
            return y
        return self._gemm(x, packed, self.in_scale, self.in_zero_point, residual)

    def _gemm(self, x: torch.Tensor, packed: object, in_scale: float, in_zero_point: int,
              residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.engine == "onednn":
            y = self._onednn(x, packed, in_scale, in_zero_point, residual, self.out_qparams)  # type: ignore[arg-type]
            if self.out_qparams is None or self.codes_out:
                return y
            return torch._make_per_tensor_quantized_tensor(y, *self.out_qparams)
        if self.out_qparams is None:
            return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                self._clamp_to_grid(x, in_scale, in_zero_point).contiguous(), in_scale, in_zero_point, packed)
        if not x.is_quantized:
            x = self.quantize_input(x)
        return torch.ops.quantized.linear(x, packed, *self.out_qparams)

    def _onednn(self, x: torch.Tensor, packed: tuple, in_scale: float, in_zero_point: int,
                residual: torch.Tensor | None, out: tuple[float, int] | None) -> torch.Tensor:
        """One oneDNN GEMM. ``x``: float, quint8, or plain uint8 codes of the input grid;
        ``residual``: a contiguous float tensor added to the output by the kernel; ``out``: the
        uint8 grid to requantize to (plain codes returned), or None for a float output."""
        x = self._uint8_input(x, in_scale, in_zero_point)
        weight, w_scale, w_zero_point, _ = packed
        out_scale, out_zero_point, dtype = (1.0, 0, self.out_dtype) if out is None else (*out, torch.uint8)
        post = ("gelu", [], self.gelu) if self.gelu is not None else ("none", [], "")
        if residual is not None:
            return torch.ops.onednn.qlinear_pointwise.binary(x, in_scale, in_zero_point, weight, w_scale, w_zero_point,
                                                             residual, self.bias, out_scale, out_zero_point, dtype,
                                                             1.0, 0, "add", 1.0, *post)
        return torch.ops.onednn.qlinear_pointwise(x, in_scale, in_zero_point, weight, w_scale, w_zero_point,
                                                  self.bias, out_scale, out_zero_point, dtype, *post)

    def _onednn_sink(self, x: torch.Tensor, packed: tuple, residual: torch.Tensor | None = None,
                     first: torch.Tensor | None = None) -> torch.Tensor:
        """A first-token-grid input (float, or the codes :func:`two_grid_codes` gives): one GEMM
        reads every row on the main grid, then the first tokens' rows (``first``) are made right.

        - Float output, nothing fused: corrected in closed form,
          ``y0 = s0/s (y0' - b) + b + s0 (z - z0) sum_k W[:, k] w_scale`` (a few small ops:
          cheaper than a GEMM call).
        - A GELU, a requantization or a residual add in the GEMM: computed again from their own
          codes and grid by a GEMM of batch x n rows with the same post-ops (requantized to the
          output's first-token grid) and written over them. (A fused residual would enter the
          closed form as ``y0' - r0``: the first token's residual-stream values reach 1e3-1e4 on
          SmolLM2, and that difference loses the digits the correction scales up.)"""
        n, scale0, zero_point0 = self.sink  # type: ignore[misc]
        codes = x if x.dtype == torch.uint8 else self.input_codes(x, first)
        y = self._onednn(codes, packed, self.in_scale, self.in_zero_point, residual, self.out_qparams)
        rows = first_rows(codes, n, first)
        if rows is None:
            return y
        if self.out_qparams is None and self.gelu is None and residual is None:
            offset = self.bias if self.bias is not None else 0.0
            head = (y[rows] - offset) * (scale0 / self.in_scale) + offset
            y[rows] = head + (scale0 * (self.in_zero_point - zero_point0)) * packed[3]
            return y
        head_residual = None if residual is None else residual[rows].contiguous()
        y[rows] = self._onednn(codes[rows].contiguous(), packed, scale0, zero_point0, head_residual,
                               self.sink_out[1:] if self.sink_out else self.out_qparams)
        return y

    def _onednn_sink_out(self, x: torch.Tensor, packed: tuple, first: torch.Tensor | None = None) -> torch.Tensor:
        """One input grid, a first-token output grid (MiniLM's GELU outputs): one GEMM requantizes
        every row to the main output grid, a ``batch x n`` GEMM over the first input rows (same
        post-ops) to the first positions' grid, written over them. Plain uint8 codes out."""
        n = self.sink_out[0]  # type: ignore[index]
        codes = self._uint8_input(x)  # once: the first rows' GEMM reads them too
        y = self._onednn(codes, packed, self.in_scale, self.in_zero_point, None, self.out_qparams)
        rows = first_rows(codes, n, first)
        if rows is not None:
            y[rows] = self._onednn(codes[rows].contiguous(), packed, self.in_scale, self.in_zero_point, None,
                                   self.sink_out[1:])  # type: ignore[index]
        return y

    def _uint8_input(self, x: torch.Tensor, scale: float | None = None, zero_point: int | None = None
                     ) -> torch.Tensor:
        """``x`` (float, quint8 or uint8 codes) as plain uint8 codes of one input grid."""
        if x.dtype == torch.uint8:
            return x
        return uint8_codes(x if x.dtype == torch.quint8 else self.quantize_input(x, scale, zero_point))

    def input_codes(self, x: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """The plain uint8 codes of a float input on this Linear's grid (grids, with a first-token
        one: on the rows ``first`` marks)."""
        n, scale0, zero_point0 = self.sink if self.sink is not None else (0, self.in_scale, self.in_zero_point)
        return two_grid_codes(x, n, self.in_scale, self.in_zero_point, scale0, zero_point0, self.in_qmin, self.in_qmax,
                              first)

    def quantize_input(self, x: torch.Tensor, scale: float | None = None, zero_point: int | None = None
                       ) -> torch.Tensor:
        """``x`` on this Linear's input grid (or the given one), as a quint8 tensor (clamped first
        on a narrower grid)."""
        scale = self.in_scale if scale is None else scale
        zero_point = self.in_zero_point if zero_point is None else zero_point
        return torch.quantize_per_tensor(self._clamp_to_grid(x, scale, zero_point).contiguous(), scale, zero_point,
                                         torch.quint8)

    def _clamp_to_grid(self, x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        return clamp_to_grid(x, scale, zero_point, self.in_qmin, self.in_qmax)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_packed"] = None  # engine- and CPU-specific: packed again after loading
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("gelu", None)  # saved before GELU fusion and first-token grids existed
        state.setdefault("sink", None)
        state.setdefault("residual", False)
        state.setdefault("codes_out", False)
        state.setdefault("sink_out", None)
        state.setdefault("row_blocks", 1)  # saved before merged GEMMs kept their parts' rows
        state.setdefault("out_dtype", torch.float32)
        if state["sink_out"] is not None and len(state["sink_out"]) == 2:  # saved as (scale, zero point)
            state["sink_out"] = (state["sink"][0], *state["sink_out"])
        super().__setstate__(state)

    def extra_repr(self) -> str:
        out = f"uint8 out (scale {self.out_qparams[0]:.3g})" if self.out_qparams else "float out"
        out += " in bfloat16" if not self.out_qparams and self.out_dtype == torch.bfloat16 else ""
        out += " as plain codes" if self.out_qparams and self.codes_out else ""
        gelu = f", GELU ({self.gelu}) fused" if self.gelu is not None else ""
        sink = f", first {self.sink[0]} token(s) on their own input grid" if self.sink is not None else ""
        sink += f", first {self.sink_out[0]} token(s) requantized to their own grid" if self.sink_out else ""
        residual = ", residual add fused" if self.residual else ""
        return f"{self.in_features} -> {self.out_features}, {self.engine}, {out}{gelu}{sink}{residual}"
