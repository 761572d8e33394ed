"""``convert``: a model (any form the resolver takes) to a converted CLEAR folder or CLEAR layers.

A model that lives in files (a local or cached Hub folder, a CLEAR folder) is converted without
loading it: the analysis and the rewrite's re-trace check run on a meta-device instance of its
class, every shard's header is checked against that class, and the output folder gets the same
tensors (hard links where the filesystem allows, else streamed copies). Only what changes is
rewritten, one tensor at a time: ``--dtype`` casts, ``--clear-layers`` replaces the attention
tensors the layers file holds (``--layers-mode delta``: adds what they changed in their base model
instead), ``--format layers`` reads just the tensors it writes. Built-in models
live in memory and are saved from there. The output folder is written atomically either way.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clear_surgery.hub import load_model, resolve_model, save_clear_layers, save_converted
from clear_surgery.hub.atomic import atomic_directory, write_json
from clear_surgery.hub.checkpoint import INDEX_NAME, check_specs, read_headers, read_json, skeleton, weight_files
from clear_surgery.hub.clear_layers import (DEFAULT_TRAINED, LAYERS_FILE, ClearLayersError, LayersSource,
                                            add_layer_change, apply_layer_deltas, apply_layer_tensors, check_layer_fit,
                                            file_provenance, layer_shapes, layers_meta, resolve_layers, select_names)
from clear_surgery.hub.converted import clear_meta, finish_folder, model_class, write_clear_tensors
from clear_surgery.hub.checkpoint import portable_record
from clear_surgery.hub.resolve import BUILTIN, LAYERS, ModelLoadError, ModelRef, resolve_recorded_base
from clear_surgery.hub.safetensors_io import read_header, read_tensor
from clear_surgery.hub.streaming import changes_shard, link_or_copy, rewrite_shard, write_tensors
from clear_surgery.surgery import AnalysisReport, ClearConfig, apply_clear, clear_tensors, get_clear_state, is_clear_tensor
from clear_surgery.surgery.core.errors import InvalidValueError

from .arguments import check_layers_mode

FORMATS = ("full", "layers")


@dataclass
class ConvertResult:
    out: Path
    analysis: AnalysisReport  # after the rewrite: every converted site traced as clear::attention
    sites: list[str]
    streamed: bool  # converted from files without loading the model
    linked: int = 0  # output shards hard-linked to the input's
    copied: int = 0  # ... copied byte for byte
    rewritten: int = 0  # ... rewritten (cast or CLEAR layers replaced)


def default_radius(ref: ModelRef, layers: LayersSource | None) -> float:
    """The radius when none is given: the CLEAR layers' (their folder's config, an official file's name), or
    the CLEAR folder's."""
    if layers is not None:
        return layers.radius
    if ref.is_clear:
        return ref.meta["config"]["radius"]
    raise ValueError("--radius is required (or --clear-layers with a clear_local_<r> file, or a CLEAR folder)")


def default_down_factor(ref: ModelRef, layers: LayersSource | None) -> int | None:
    """The "down" variant's factor when none is given: the CLEAR layers' (folder config, official file name), or
    the CLEAR folder's; None: plain CLEAR."""
    if layers is not None:
        return layers.down_factor
    return ref.meta["config"].get("down_factor") if ref.is_clear else None


# what a conversion does, in order (the weights of a model in files are written during the second)
CONVERT_STAGES = ("reading the model", "analyzing, rewriting, verifying", "writing")


def layers_base_ref(layers: LayersSource, base: str | None = None) -> ModelRef:
    """The model CLEAR layers were made from: ``base`` if given, else the one their folder records."""
    if base is not None:
        return resolve_model(base)
    record = (layers.meta or {}).get("base_model") or {}
    if not record.get("id"):
        raise InvalidValueError(f"CLEAR layers {layers.describe()} do not record the model they were made from: "
                                "give it with --layers-base")
    return resolve_recorded_base(record, layers.file.parent, f"the CLEAR layers' {layers.file.parent / 'clear_config.json'}")


def base_tensors(ref: ModelRef, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the model ``ref`` (a built-in is built; files are read tensor by tensor)."""
    if ref.kind == BUILTIN:
        state = load_model(ref)[0].state_dict()
        return {n: state[n] for n in names if n in state}
    return ref.read_tensors(names)


def _delta(target: torch.Tensor, layer: torch.Tensor, base: torch.Tensor, name: str) -> torch.Tensor:
    if not target.shape == layer.shape == base.shape:
        raise ClearLayersError(f"{name}: target {tuple(target.shape)}, layers {tuple(layer.shape)}, base "
                               f"{tuple(base.shape)}")
    return add_layer_change(target, layer, base)


def convert(source: str | ModelRef, out: str | Path, config: ClearConfig | None = None, *,
            subfolder: str | None = None, revision: str | None = None, dtype: torch.dtype | None = None,
            clear_layers: str | Path | LayersSource | None = None, out_format: str = "full", overwrite: bool = False,
            max_shard_size: str | int = "10GB", link: bool = True, progress: bool = True, stage=None,
            allow_radius_change: bool = False, layers_mode: str = "replace",
            layers_base: str | None = None) -> ConvertResult:
    """Convert ``source`` to CLEAR and write ``out`` (``out_format`` full: the whole model; layers: the
    CLEAR layers). ``clear_layers``: a CLEAR-layers folder or a safetensors file (``resolve_layers``); they
    must be made for the model's architecture and, unless ``allow_radius_change``, for ``config``'s radius.
    ``config`` None: the radius comes from ``clear_layers`` or the CLEAR folder.
    ``link``: unchanged files of a model read from files are hard links to the source's (where the
    filesystem allows), else byte copies. ``layers_mode`` delta: the model's own attention tensors plus
    what the layers changed in the model they were made from (``layers_base``, default the one their
    folder records): how layers made on FLUX.1-dev carry over to FLUX.1-schnell. ``stage(name)``: called as
    each of CONVERT_STAGES starts (a progress display).
    """
    if out_format not in FORMATS:
        raise ValueError(f"--format must be full or layers, got {out_format!r}")
    check_layers_mode(layers_mode, clear_layers)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} already exists (pass --overwrite to replace it)")
    ref = source if isinstance(source, ModelRef) else resolve_model(source, subfolder=subfolder, revision=revision)
    layers = clear_layers
    if clear_layers is not None and not isinstance(clear_layers, LayersSource):
        layers = resolve_layers(clear_layers, revision)
    if layers is not None and ref.kind == LAYERS:
        raise ValueError(f"{ref.source} is a CLEAR-layers folder already: give --clear-layers or that folder, not both")
    config = config or ClearConfig(radius=default_radius(ref, layers), down_factor=default_down_factor(ref, layers))
    if layers is not None:
        layers.check_target(ref.model_class, config.radius, allow_radius_change=allow_radius_change,
                            down_factor=config.down_factor)
    layers_file = layers.file if layers is not None else None
    provenance = ((layers.meta or {}).get("training") or file_provenance(layers_file) if layers is not None
                  else (ref.meta or {}).get("training"))
    delta_base = layers_base_ref(layers, layers_base) if layers_mode == "delta" else None
    if delta_base is not None:
        # the base as the output folder can find it again (a local one relative to it)
        carried = portable_record({"id": delta_base.source}, out)["id"]
        provenance = {**(provenance or {}), "carried_by": {"mode": "delta", "layers_base": carried}}
    weights_ref, base_record = ref, portable_record(ref.record(), out)
    if ref.kind == LAYERS:  # the base model's weights with the folder's layers in place
        weights_ref, layers_file = ref.base(), ref.folder / LAYERS_FILE
    stage = stage or (lambda name: None)
    if weights_ref.kind == BUILTIN:
        return _convert_in_memory(weights_ref, out, config, dtype, layers_file, out_format, overwrite,
                                  max_shard_size, base_record, provenance, delta_base, stage)
    return _convert_files(weights_ref, out, config, dtype, layers_file, out_format, overwrite, base_record,
                          provenance, link, progress, delta_base, stage)


def _convert_in_memory(ref, out, config, dtype, layers_file, out_format, overwrite, max_shard_size, base_record,
                       provenance, delta_base, stage) -> ConvertResult:
    stage(CONVERT_STAGES[0])
    model, _ = load_model(ref, dtype=dtype)
    stage(CONVERT_STAGES[1])
    analysis = apply_clear(model, config, provenance=provenance)
    stage(CONVERT_STAGES[2])
    if delta_base is not None:
        apply_layer_deltas(model, layers_file, base_tensors(delta_base, list(layer_shapes(layers_file))))
    elif layers_file is not None:
        apply_layer_tensors(model, layers_file)
    if out_format == "layers":
        save_clear_layers(model, out, base_model=base_record, overwrite=overwrite)
    else:
        save_converted(model, out, base_model=base_record, overwrite=overwrite, max_shard_size=max_shard_size)
    return ConvertResult(out, analysis, list(get_clear_state(model).sites), streamed=False)


def _convert_files(ref, out, config, dtype, layers_file, out_format, overwrite, base_record, provenance, link,
                   progress, delta_base, stage) -> ConvertResult:
    stage(CONVERT_STAGES[0])
    folder = ref.local_folder()
    files = weight_files(folder)
    if not files:
        raise ModelLoadError(f"{folder} has no safetensors weights (clear-surgery reads safetensors only)")
    model_config = read_json(folder / "config.json")
    cls = model_class(model_config.get("_class_name"), str(folder / "config.json"))
    headers = read_headers(files)  # a truncated or damaged shard fails here, naming the file
    specs = {e.name: (e.shape, e.dtype) for h in headers for e in h.tensors.values()}
    meta_model = skeleton(cls, model_config)  # the model on the meta device: names and shapes, no memory
    check_specs(meta_model, specs, folder)
    replacements = {}
    source_of = {name: h for h in headers for name in h.tensors}
    own_names = []  # CLEAR's own tensors in the layers (spatial_weight): not in the stock shards
    if layers_file is not None:
        check_layer_fit({n: t.shape for n, t in meta_model.state_dict().items()}, layers_file, cls.__name__,
                        before_rewrite=True)
        layers = read_header(layers_file)
        own_names = [n for n in layers.tensors if is_clear_tensor(n)]
        replacements = {name: (lambda name=name: read_tensor(layers, name)) for name in layers.tensors
                        if name not in own_names}
    if delta_base is not None:  # one tensor of each of the three at a time
        if delta_base.kind == BUILTIN:
            held = base_tensors(delta_base, list(layers.tensors))
            base_of, read_base = held, (lambda name: held[name])
        else:
            base_of = {name: h for h in read_headers(weight_files(delta_base.local_folder())) for name in h.tensors}
            read_base = (lambda name: read_tensor(base_of[name], name))
        missing = sorted(set(replacements) - set(base_of))
        if missing:
            raise ClearLayersError(f"the layers' base {delta_base.source} lacks {len(missing)} of their tensors, "
                                   f"e.g. {missing[0]}")
        replacements = {name: (lambda name=name: _delta(read_tensor(source_of[name], name), read_tensor(layers, name),
                                                        read_base(name), name))
                        for name in replacements}
    with atomic_directory(out, overwrite) as tmp:
        link_or_copy(folder / "config.json", tmp / "config.json", link)
        counts = {}
        writer = None
        if out_format == "full":
            # The weights do not depend on the analysis: write them while it traces (an error in the
            # analysis stops the writer after its current shard and discards the folder).
            stop = threading.Event()
            writer = threading.Thread(target=_write_weights, args=(headers, folder, tmp, dtype, replacements, link,
                                                                   stop, counts, progress and out.name))
            writer.start()
        try:
            # analysis and the rewrite's re-trace check on the meta device: no weights, no compute
            stage(CONVERT_STAGES[1])
            analysis = apply_clear(meta_model, config, provenance=provenance)
            stage(CONVERT_STAGES[2])
        except BaseException:
            if writer is not None:
                stop.set()
                writer.join()
            raise
        state = get_clear_state(meta_model)
        own = clear_tensors(meta_model)  # initial values, or the layers' own after a fit check
        if own_names:
            wrong = [n for n in own_names if n not in own or tuple(own[n].shape) != tuple(layers.tensors[n].shape)]
            if wrong:
                raise ClearLayersError(f"CLEAR layers {layers_file.name}: {len(wrong)} of their CLEAR tensors do not fit "
                                       f"the converted {cls.__name__}, e.g. {wrong[0]}")
            own.update({n: read_tensor(layers, n).to(own[n].dtype) for n in own_names})
        if writer is not None:
            writer.join()
            if "error" in counts:
                raise counts["error"]
            dtypes = sorted({str(dtype or e.torch_dtype).removeprefix("torch.") for h in headers
                             for e in h.tensors.values()})
            write_clear_tensors(tmp, {n: t.to(dtype) if dtype else t for n, t in own.items()})
            meta = clear_meta(state, cls.__name__, base_record, dtype=dtypes)
        else:
            names = select_names(list(specs), state.sites, DEFAULT_TRAINED)
            write_tensors(tmp / LAYERS_FILE, names, source_of, dtype=dtype, replace=replacements,
                          metadata={"format": "pt"}, extra=own)
            shapes = {**{n: specs[n][0] for n in names}, **{n: tuple(t.shape) for n, t in own.items()}}
            meta = layers_meta(state, cls.__name__, DEFAULT_TRAINED, base_record, shapes)
        finish_folder(tmp, meta)
    return ConvertResult(out, analysis, list(state.sites), streamed=True, linked=counts.get("link", 0),
                         copied=counts.get("copy", 0), rewritten=counts.get("rewrite", 0))


def _write_weights(headers, folder: Path, tmp: Path, dtype, replacements, link: bool, stop: threading.Event,
                   counts: dict, progress) -> None:
    """Every shard into ``tmp``: rewritten where the conversion changes it, else linked or copied;
    then the index. Counts go into ``counts``, an exception into counts["error"] (run in a thread)."""
    try:
        for header in tqdm(headers, desc=f"writing {progress}", unit="shard", disable=not progress):
            if stop.is_set():
                return
            target = tmp / header.path.name
            if changes_shard(header, dtype, set(replacements)):
                rewrite_shard(header, target, dtype=dtype, replace=replacements)
                how = "rewrite"
            else:
                how = link_or_copy(header.path, target, link)
            counts[how] = counts.get(how, 0) + 1
        _write_index(folder, tmp, dtype is not None and counts.get("rewrite", 0) > 0, link)
    except BaseException as err:  # handed to the main thread
        counts["error"] = err


def _write_index(folder: Path, tmp: Path, sizes_changed: bool, link: bool) -> None:
    index = folder / INDEX_NAME
    if not index.is_file():
        return
    if not sizes_changed:
        link_or_copy(index, tmp / INDEX_NAME, link)
        return
    data = read_json(index)  # same file names; the total size follows the new dtype
    total = sum(e.nbytes for f in set(data["weight_map"].values()) for e in read_header(tmp / f).tensors.values())
    data.setdefault("metadata", {})["total_size"] = total
    write_json(tmp / INDEX_NAME, data)
