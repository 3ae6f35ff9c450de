"""Int8 weights laid out the way ONNX Runtime's QDQ fusions read them: ``DequantizeLinear -> MatMul``.

torch.onnx writes a Linear ``x @ W^T`` as ``DequantizeLinear(W codes, axis=0) -> Transpose ->
MatMul``. ONNX Runtime folds that Transpose into the int8 initializer and fuses the rest into
one int8 GEMM (``MatMulIntegerToFloat``) only where the dequantize has a single reader; a weight
that two GEMMs read (a ``+sink`` Linear's first-token rows run their own GEMM on the same weight)
kept its Transpose and ran as a float MatMul on dequantized weights. Storing the codes
transposed (``[in, out]``, one scale per column: ``axis=1``) removes the Transpose, so every
GEMM reads a dequantized initializer directly, the form ONNX Runtime's QDQ rules expect.
"""

from __future__ import annotations

from typing import Any


def fold_weight_transposes(model: Any) -> int:
    """Rewrite ``DequantizeLinear(int8 W, axis=0) -> Transpose(perm=[1, 0])`` in the ONNX
    ``ModelProto`` ``model`` as ``DequantizeLinear(int8 W^T, axis=1)``, in place; returns how
    many Transposes went. A dequantize that other nodes still read is kept for them."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    transposed: dict[str, str] = {}  # codes initializer -> its transposed copy
    folded: dict[int, Any] = {}  # index of a Transpose -> the dequantize that replaces it
    for index, node in enumerate(graph.node):
        dq = producers.get(node.input[0]) if node.op_type == "Transpose" and node.input else None
        if dq is None or not _per_row_int8_dequantize(dq, initializers) or _perm(node) != [1, 0]:
            continue
        codes = dq.input[0]
        if codes not in transposed:
            array = numpy_helper.to_array(initializers[codes]).T.copy()
            transposed[codes] = f"{codes}_transposed"
            graph.initializer.append(numpy_helper.from_array(array, transposed[codes]))
        folded[index] = helper.make_node("DequantizeLinear", [transposed[codes], *dq.input[1:]], list(node.output),
                                         name=f"{node.name}_dequantize", axis=1)
    nodes = [folded.get(index, node) for index, node in enumerate(graph.node)]  # graph order kept
    del graph.node[:]
    graph.node.extend(nodes)
    _remove_unread(graph)
    return len(folded)


def _per_row_int8_dequantize(node: Any, initializers: dict[str, Any]) -> bool:
    """An int8 2-D initializer dequantized with one scale per row (what a quantized Linear weight is)."""
    from onnx import TensorProto

    if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
        return False
    codes = initializers[node.input[0]]
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return codes.data_type == TensorProto.INT8 and len(codes.dims) == 2 and axis in (0, -2)


def _perm(node: Any) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _remove_unread(graph: Any) -> None:
    """Drop the dequantize nodes and initializers nothing reads any more."""
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "DequantizeLinear" and not set(n.output) & read]:
        graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(tensor)
