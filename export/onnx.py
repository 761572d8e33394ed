"""ONNX: the converted model with every ``clear::attention`` as one ``ClearAttention`` node.

The node is in domain ``clear`` (op set 1). Inputs: q, k, v (batch, tokens, heads, head_dim) and a grid
carrier, a tensor shaped (rows, cols) of the image grid (built in the graph from the sizes of the model's
inputs, so one file serves every resolution; nothing reads its values). Attributes: ``radius``,
``text_first``, ``tile_h`` / ``tile_w`` (0: raster order), ``scale`` (0: 1 / sqrt(head_dim)) and
``plugin_namespace`` (TensorRT's ONNX parser uses it to find the ``clear::ClearAttention`` plugin). The text
length is the token count minus rows x cols. ``ReferenceEvaluator`` runs the file on CPU with
``reference_session``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clear_surgery.plugins import TokenLayout, reference_attention, schema
from clear_surgery.plugins.tensorrt_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE

DOMAIN, OP_TYPE, DOMAIN_VERSION = PLUGIN_NAMESPACE, PLUGIN_NAME, 1
OPSET = 18
MODEL_FILE = "model.onnx"
# attribute -> ONNX attribute type: the op schema's engine attributes (also the TensorRT plugin's fields)
ATTRIBUTES = schema.ENGINE_ATTRIBUTES


def register_schema() -> None:
    """Tell onnx (checker, shape inference) what a ClearAttention node is; once per process."""
    from onnx import defs

    if defs.has(OP_TYPE, DOMAIN):
        return
    param = defs.OpSchema.FormalParameter
    attributes = [defs.OpSchema.Attribute(name, getattr(defs.OpSchema.AttrType, kind), "")
                  for name, kind in ATTRIBUTES.items()]
    attributes.append(defs.OpSchema.Attribute("plugin_namespace", defs.OpSchema.AttrType.STRING, "", required=False))
    schema = defs.OpSchema(
        OP_TYPE, DOMAIN, DOMAIN_VERSION,
        "CLEAR attention: text queries see every key; an image query sees every text key and the image keys "
        "within the radius on the grid that the shape of the input 'grid' gives.",
        inputs=[param("q", "T"), param("k", "T"), param("v", "T"), param("grid", "T")],
        outputs=[param("out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "q, k, v, grid, out")],
        attributes=attributes)
    defs.register_schema(schema)


def _translation():
    """clear::attention -> one ClearAttention node (a plain traced function, as the exporter wants); a call
    an engine cannot serve is refused here, by argument name."""
    import onnxscript
    from onnxscript import opset18 as op

    clear = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    @schema.implements()
    def clear_attention(*args):
        call = schema.bind(args)
        schema.check_engine_call(call, "an ONNX ClearAttention node")
        one = op.Constant(value_ints=[1])
        shape = op.Concat(*(op.Reshape(call[name], one) for name in schema.GRID), axis=0)
        grid = op.Expand(op.CastLike(op.Constant(value_float=0.0), call["q"]), shape)
        return clear.ClearAttention(*(call[name] for name in schema.TENSOR_INPUTS), grid,
                                    **schema.engine_attributes(call), plugin_namespace=PLUGIN_NAMESPACE)

    return {torch.ops.clear.attention.default: clear_attention}


def export_onnx(module: torch.nn.Module, inputs: dict, dynamic_shapes: dict, out: Path, *,
                output_names: list[str]) -> Path:
    """Write ``module`` (a family's export wrapper around a CLEAR model) as ONNX into the folder ``out``;
    weights go to external data beside it above 2 GB. Checked with onnx's checker."""
    import onnx

    register_schema()
    path = Path(out) / MODEL_FILE
    with torch.no_grad(), schema.engine_errors_unwrapped():
        torch.onnx.export(module, (), str(path), kwargs=inputs, dynamic_shapes=dynamic_shapes, dynamo=True,
                          custom_translation_table=_translation(), input_names=list(inputs),
                          output_names=output_names, opset_version=OPSET, optimize=True, verbose=False)
    strip_build_metadata(path)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def strip_build_metadata(path: Path) -> None:
    """Drop the exporter's metadata_props (stack traces, class hierarchies, source locations: they hold the
    exporting machine's file system, project and site-packages paths) from the model, its nodes and its
    functions; weights in external data stay where they are."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def strip_nodes(nodes):
        for node in nodes:
            del node.metadata_props[:]
            for attribute in node.attribute:
                for graph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                    strip_graph(graph)

    def strip_graph(graph):
        del graph.metadata_props[:]
        strip_nodes(graph.node)

    del model.metadata_props[:]
    strip_graph(model.graph)
    for function in model.functions:
        del function.metadata_props[:]
        strip_nodes(function.node)
    onnx.save_model(model, str(path))


def clear_nodes(model) -> list:
    return [node for node in model.graph.node if node.op_type == OP_TYPE and node.domain == DOMAIN]


def node_attributes(node) -> dict:
    from onnx import helper

    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def reference_session(path: str | Path):
    """An ``onnx.reference.ReferenceEvaluator`` for an exported file: ClearAttention runs as the
    project's dense-mask reference (float64 inside), every other node as onnx's reference."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class ClearAttention(OpRun):
        op_domain = DOMAIN

        def _run(self, q, k, v, grid, radius=None, text_first=None, tile_h=None, tile_w=None, scale=None,
                 plugin_namespace=None):
            rows, cols = grid.shape
            layout = TokenLayout(q.shape[1] - rows * cols, bool(text_first), rows, cols,
                                 (int(tile_h), int(tile_w)) if tile_h else None)
            tensors = [torch.from_numpy(np.ascontiguousarray(t)).double() for t in (q, k, v)]
            out = reference_attention(*tensors, layout, float(radius), float(scale) or None)
            return (out.numpy().astype(q.dtype),)

    register_schema()
    return ReferenceEvaluator(str(path), new_ops=[ClearAttention])
