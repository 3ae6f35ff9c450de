"""An exported ONNX model run by ONNX Runtime, called like the model it came from."""

from __future__ import annotations

import os
import types

import torch

from ..errors import ExportError


class OnnxRuntimeModel:
    """``model(**inputs)`` runs the ONNX file in an ONNX Runtime CPU session and returns its
    outputs as attributes (``.last_hidden_state``, ``.logits``: torch tensors), so the
    evaluators and the speed benchmark call it as they call a torch model. ``threads``: ORT's
    intra-op threads (default: ORT's choice, one per core)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ExportError("running an ONNX model needs the onnxruntime package: pip install 'outlierfx[onnx]'") \
                from exc
        options = ort.SessionOptions()
        # ORT's worker threads busy-wait after each run by default: in one process beside torch
        # (interleaved benchmark rounds) they took the cores from the next model (MiniLM's int8
        # onednn measured 0.506x FP32 beside ORT, 0.40x alone). Idle workers sleep instead.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, **inputs: torch.Tensor) -> types.SimpleNamespace:
        missing = sorted(set(self.input_names) - set(inputs))
        if missing:
            raise ExportError(f"{self.path} takes inputs {self.input_names}; missing {missing}")
        feed = {name: inputs[name].detach().cpu().numpy() for name in self.input_names}
        values = self.session.run(self.output_names, feed)
        return types.SimpleNamespace(**{name: torch.from_numpy(v) for name, v in zip(self.output_names, values)})

    def eval(self) -> OnnxRuntimeModel:  # called like a torch module by the benchmarks
        return self
