"""Find every attention site of a model by tracing it with torch.export.

A site is one attention call (SDPA or clear::attention) and the module that owns it. Joint
text+image sites are those whose query and key sequences are a concatenation of the text stream
and the image stream; their segment order is read from that concatenation in the graph.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import types
from collections import Counter, deque
from dataclasses import asdict, dataclass, field

import torch

import clear_surgery.plugins.op  # noqa: F401  registers clear::attention, read below

from .families import (EXAMPLE_GRID, EXAMPLE_TEXT_TOKENS, ModelFamily, example_inputs, family_for_class, family_of,
                       image_grid)
from .processors import clear_processor_for

aten = torch.ops.aten
SDPA_OPS = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
}
CLEAR_OP = torch.ops.clear.attention.default
CAT_OPS = {aten.cat.default, aten.concat.default}
# sites CLEAR converts by default: joint attention (text and image queries over text and image keys) and its
# image rows alone (image queries over the joined keys, no text queries: QwenImage 2.1, PRX, NucleusMoE)
JOINT_KINDS = ("joint", "image_query")


@dataclass
class AttentionSite:
    module: str  # fqn of the owning attention module
    kind: str  # joint | image_query | image | text | cross | other
    op: str  # sdpa | clear
    order: str | None  # text_first | image_first (joint sites)
    query_tokens: int
    key_tokens: int
    heads: int
    head_dim: int
    processor: str | None
    supported: bool
    reason: str | None = None
    packed: bool = False  # text and image were joined before the blocks (the family's PackedSequence)


@dataclass
class AnalysisReport:
    model_class: str
    text_tokens: int
    image_tokens: int
    sites: list[AttentionSite] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)  # compute ops, for rewrite verification
    # "torch.export" (the graph), or "run time" (the attention calls of one eager forward, for models
    # torch.export cannot trace; no op counts, so a rewrite of such a model cannot be verified)
    method: str = "torch.export"

    @property
    def joint_sites(self) -> list[AttentionSite]:
        return [s for s in self.sites if s.kind in JOINT_KINDS]

    def site(self, module: str) -> AttentionSite:
        matches = [s for s in self.sites if s.module == module]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} attention sites in module {module!r}")
        return matches[0]

    def describe(self) -> str:
        kinds = Counter(s.kind for s in self.sites)
        parts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        return f"{len(self.sites)} attention site{'' if len(self.sites) == 1 else 's'} ({parts})"

    def table(self) -> str:
        header = ("module", "kind", "op", "order", "q/k tokens", "heads x dim", "rewrite")
        rows = [header] + [
            (s.module, s.kind, s.op, s.order or "-", f"{s.query_tokens}/{s.key_tokens}",
             f"{s.heads}x{s.head_dim}", "CLEAR" if s.op == "clear" else "yes" if s.supported else f"no: {s.reason}")
            for s in self.sites
        ]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        title = (f"{self.model_class}: {self.describe()}; example call with {self.text_tokens} text "
                 f"and {self.image_tokens} image tokens" + ("" if self.method == "torch.export" else
                                                            f"; analyzed at {self.method}"))
        return "\n".join([title, *lines])

    def to_dict(self) -> dict:
        return {"model_class": self.model_class, "text_tokens": self.text_tokens,
                "image_tokens": self.image_tokens, "method": self.method, "sites": [asdict(s) for s in self.sites]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "AnalysisReport":
        sites = [AttentionSite(**s) for s in data["sites"]]
        return cls(data["model_class"], data["text_tokens"], data["image_tokens"], sites,
                   method=data.get("method", "torch.export"))


def _shape(node) -> tuple[int, ...]:
    return tuple(int(d) for d in node.meta["val"].shape)


def _owner(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>"
    return list(stack.values())[-1][0]


def _find_order(q_node, text: int, image: int, limit: int = 2000) -> str | None:
    """Nearest concatenation of a text and an image stream upstream of the query."""
    queue, seen = deque([q_node]), {q_node}
    while queue and len(seen) < limit:
        node = queue.popleft()
        if node.op == "call_function" and node.target in CAT_OPS:
            parts, dim = node.args[0], (node.args[1] if len(node.args) > 1 else 0)
            if len(parts) == 2 and all("val" in p.meta for p in parts):
                sizes = [_shape(p)[dim] for p in parts]
                if sizes == [text, image]:
                    return "text_first"
                if sizes == [image, text]:
                    return "image_first"
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return None


# Ops that only move or re-view data; everything else counts as compute when checking that a
# rewrite changed nothing but the attention call.
_LAYOUT_WORDS = ("view", "permute", "transpose", "reshape", "flatten", "unflatten", "expand", "contiguous",
                 "clone", "assert", "alias", "detach", "squeeze", "unsqueeze", "select", "slice", "split",
                 "getitem", "to.", "_to_copy", "lift_fresh", "t.default")


def _compute_op_counts(graph) -> dict[str, int]:
    counts = Counter()
    for node in graph.nodes:
        if node.op != "call_function" or node.target in SDPA_OPS or node.target == CLEAR_OP:
            continue
        name = str(node.target)
        if not any(word in name for word in _LAYOUT_WORDS):
            counts[name] += 1
    return dict(sorted(counts.items()))


@dataclass
class AttentionCall:
    """What the classification needs of one attention call, however it was observed."""

    is_clear: bool
    q_shape: tuple[int, ...]  # SDPA: (batch, heads, tokens, dim); clear::attention: (batch, tokens, heads, dim)
    k_shape: tuple[int, ...]
    module: str
    find_order: object  # () -> "text_first" | "image_first" | None: how text and image were joined
    find_key_order: object = lambda: None  # the same for the keys (calls whose queries are the image alone)


def _graph_call(node, text: int, image: int) -> AttentionCall:
    is_clear = node.target == CLEAR_OP
    q = node.args[0]
    if is_clear:
        order = key_order = (lambda: "text_first" if node.args[4] else "image_first")
    else:
        order = (lambda: _find_order(q, text, image))
        key_order = (lambda: _find_order(node.args[1], text, image))
    return AttentionCall(is_clear, _shape(q), _shape(node.args[1]), _owner(node), order, key_order)


def _classify(model, family: ModelFamily | None, call: AttentionCall, text: int, image: int) -> AttentionSite:
    is_clear, qs, ks, module = call.is_clear, call.q_shape, call.k_shape, call.module
    (q_len, heads), k_len = ((qs[1], qs[2]), ks[1]) if is_clear else ((qs[2], qs[1]), ks[2])
    try:
        processor = model.get_submodule(module).processor if module != "<root>" else None
    except AttributeError:
        processor = None
    order, reason = None, None
    packed = family.packed if family is not None else None
    packed = packed if packed and q_len == k_len and q_len > image and packed.covers(module) else None
    if packed:
        kind, order = "joint", packed.order  # the family declares the join the graph cannot show
    elif q_len == image and k_len == text + image and (order := call.find_key_order()):
        kind = "image_query"  # image queries over the joined text and image keys: CLEAR's image rows alone
    elif q_len != k_len:
        kind = "cross"
    elif q_len == text + image:
        order = call.find_order()
        kind = "joint" if order else "other"
    elif q_len == image:
        kind = "image"
    elif q_len == text:
        kind = "text"
    else:
        kind = "other"

    if is_clear:
        reason = "already CLEAR"
    elif kind not in JOINT_KINDS:
        reason = ("image queries over text+image keys (no text queries): not the CLEAR layout"
                  if kind == "cross" and q_len == image and k_len == text + image else None) or {
                  "cross": "cross-attention (queries and keys are different streams)",
                  "image": "image-only self-attention (dense unless --image-attention local)",
                  "text": "text-only attention"}.get(kind, "text and image arrive as one packed sequence (no "
                                                           "concatenation of two streams before attention)"
                                                     if q_len == text + image else
                                                     f"sequence of {q_len} tokens is not text+image")
    elif processor is None:
        reason = "no diffusers attention module owns this call"
    elif kind == "image_query":
        if family is None:  # the generic route needs the family to read each call's image grid
            reason = f"clear-surgery cannot read {type(model).__name__}'s image grid for the generic route"
    else:
        clear_cls = clear_processor_for(family, processor)
        if clear_cls is None and family is None:
            # the generic route (ClearSDPAProcessor) needs the family to read each call's image grid
            reason = (f"processor {type(processor).__name__} has no dedicated CLEAR version, and clear-surgery cannot "
                      f"read {type(model).__name__}'s image grid for the generic route")
        elif clear_cls is not None and ("text_first" if clear_cls.text_first else "image_first") != order:
            reason = f"segment order {order} differs from what {clear_cls.__name__} builds"
    return AttentionSite(module=module, kind=kind, op="clear" if is_clear else "sdpa", order=order,
                         query_tokens=q_len, key_tokens=k_len, heads=heads, head_dim=qs[-1],
                         processor=type(processor).__name__ if processor is not None else None,
                         supported=reason is None, reason=reason, packed=packed is not None)


def analyze(model: torch.nn.Module, example_inputs_: dict | None = None, *, text_tokens: int | None = None,
            image_tokens: int | None = None, grid: tuple[int, int] | None = None,
            family: ModelFamily | None = None, run_time_fallback: bool = True, grid_multiple: int = 1) -> AnalysisReport:
    """Trace ``model`` with torch.export on a small example call and report every attention site.
    Where torch.export cannot trace it (data-dependent shapes), the sites come from the SDPA calls of
    one eager forward (``report.method`` says which); ``run_time_fallback=False`` raises instead.

    For a known family the example call is built from the config (``family``: already resolved by
    the caller, else looked up); for other models pass ``example_inputs_`` (kwargs of forward) with
    the number of text and image tokens in it, and the image ``grid`` (needed once the model holds
    CLEAR layers). ``grid_multiple``: the example grid's sides are multiples of it (a model with the
    "down" variant pools blocks of that many tokens a side).
    """
    if example_inputs_ is None:
        family = family or family_of(model)  # clear error for an unknown model
        grid = (EXAMPLE_GRID[0] * grid_multiple, EXAMPLE_GRID[1] * grid_multiple)
        example_inputs_ = example_inputs(model, EXAMPLE_TEXT_TOKENS, grid, family=family)
        text_tokens, image_tokens = EXAMPLE_TEXT_TOKENS, grid[0] * grid[1]
    elif text_tokens is None or image_tokens is None:
        raise ValueError("with example inputs, also pass text_tokens and image_tokens")
    elif family is None:
        family = family_for_class(type(model).__name__)
    if family is not None and family.global_tokens is not None:  # registers and the like count as text
        text_tokens += family.global_tokens(model)
    report = AnalysisReport(type(model).__name__, text_tokens, image_tokens)
    with torch.no_grad(), image_grid(*grid) if grid else contextlib.nullcontext():
        try:
            if family is not None and family.fresh_for_trace is not None:
                family.fresh_for_trace(model)
            program = _export_quietly(model, example_inputs_)
        except Exception as err:  # data-dependent shapes and the like: watch one eager forward instead
            if not run_time_fallback:
                raise
            report.method = f"run time (torch.export: {type(err).__name__})"
            calls = attention_calls(model, example_inputs_, text_tokens, image_tokens)
        else:
            calls = [_graph_call(node, text_tokens, image_tokens) for node in program.graph.nodes
                     if node.op == "call_function" and (node.target in SDPA_OPS or node.target == CLEAR_OP)]
            report.op_counts = _compute_op_counts(program.graph)
    report.sites = [_classify(model, family, call, text_tokens, image_tokens) for call in calls]
    _mark_duplicate_owners(report)
    return report


class _CallRecorder(torch.overrides.TorchFunctionMode):
    """Records SDPA calls with the module that makes them, and how text and image were joined: the
    last two-way concatenation of a text-sized and an image-sized part inside that module, else the
    last one anywhere before the call (a model that joins the streams once, before its blocks).
    The graph analysis follows the query's own inputs; eager calls carry no lineage, so this is the
    nearest run-time equivalent."""

    def __init__(self, text: int, image: int, stack: list[str]):
        super().__init__()
        self.text, self.image, self.stack = text, image, stack
        self.calls: list[AttentionCall] = []
        self.order: dict[str | None, str] = {}  # module -> order; None: the last one anywhere

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        module = self.stack[-1] if self.stack else "<root>"
        if func in (torch.cat, torch.concat, torch.concatenate):
            parts = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if len(parts) == 2 and all(isinstance(p, torch.Tensor) and p.dim() > 0 for p in parts):
                sizes = [p.shape[dim] for p in parts]
                if sizes in ([self.text, self.image], [self.image, self.text]):
                    self.order[module] = self.order[None] = "text_first" if sizes[0] == self.text else "image_first"
        elif func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            order = self.order.get(module, self.order.get(None))
            # the same join serves the queries and the keys (eager tensors carry no lineage to tell them apart)
            self.calls.append(AttentionCall(False, tuple(q.shape), tuple(k.shape), module, lambda order=order: order,
                                            lambda order=order: order))
        return func(*args, **kwargs)


def attention_calls(model: torch.nn.Module, inputs: dict, text: int, image: int) -> list[AttentionCall]:
    """The attention calls of one eager forward of ``model`` (for models torch.export cannot trace)."""
    stack: list[str] = []

    def enter(name):
        return lambda module, args: stack.append(name)  # None: the call's arguments are kept

    def leave(module, args, output):
        stack.pop()  # returns None, so the module's output is kept

    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(enter(name)))
            hooks.append(module.register_forward_hook(leave))
    recorder = _CallRecorder(text, image, stack)
    try:
        with torch.no_grad(), recorder:
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return recorder.calls


def _export_quietly(model, inputs):
    """torch.export, without the partial graph it prints to stderr when it fails (a hundred lines of
    code per model; the exception says what failed). Whatever it writes on success passes through."""
    written = io.StringIO()
    helpers = {id(obj): (obj, dict(vars(obj))) for obj in _helper_objects(model)}
    try:
        # the analysis reads each node's module stack, never its Python stack trace
        with contextlib.redirect_stderr(written), without_stack_traces():
            program = torch.export.export(model, (), dict(inputs), strict=False)
    finally:
        _clear_method_caches(model)
        for obj, state in helpers.values():  # what they cached while tracing holds fake tensors
            vars(obj).clear()
            vars(obj).update(state)
    sys.stderr.write(written.getvalue())
    return program


@contextlib.contextmanager
def without_stack_traces():
    """torch.export without capturing the Python stack trace of every node: a quarter of an analysis trace's
    time (tiny FLUX on a CPU: 1.2 s against 0.9), for metadata the analysis never reads."""
    from torch.fx import config as fx_config

    before = getattr(fx_config, "do_not_emit_stack_traces", False)  # older torch: no such switch, no effect
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = before


def _helper_objects(model):
    """Plain objects the model's modules hold (not modules, tensors or functions), which may fill lazy caches on
    their first call (Z-Image's RoPE table)."""
    for module in model.modules():
        for value in vars(module).values():
            if hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, torch.Tensor, type,
                                                                     types.FunctionType, types.MethodType)):
                yield value


def _clear_method_caches(model) -> None:
    """Empty the functools.lru_cache of every method of the model's module classes: torch.export runs the model
    on fake tensors, and a cached method (NucleusMoE-Image's RoPE frequencies) would hand those to the next
    eager call."""
    for cls in {type(module) for module in model.modules()}:
        for attribute in vars(cls).values():
            if callable(getattr(attribute, "cache_clear", None)):
                attribute.cache_clear()


def _mark_duplicate_owners(report: AnalysisReport) -> None:
    # A processor swap converts every call of a module: two calls in one module must agree.
    owners = Counter(s.module for s in report.sites)
    for s in report.sites:
        if owners[s.module] > 1 and s.supported:
            s.supported, s.reason = False, f"module makes {owners[s.module]} attention calls"
