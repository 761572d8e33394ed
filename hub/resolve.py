"""The one model resolver: what a ``--model`` argument (or the Python API's model argument) names.

Every command and ``load_model`` go through ``resolve_model``, so they accept the same forms and
fail with the same errors:

- ``builtin:NAME``: a built-in tiny model;
- a local diffusers model folder (config.json + safetensors) or pipeline folder (model_index.json;
  the model is its ``transformer`` subfolder unless ``subfolder`` says otherwise);
- a converted CLEAR folder (clear_config.json + the model) or a CLEAR-layers folder
  (clear_config.json + clear_layers.safetensors, applied to the base model it names);
- a Hub id (OWNER/NAME, with ``revision`` and ``subfolder``) of any of the above; only configs are
  fetched to decide, weights when the model is loaded (the huggingface_hub cache and
  HF_HUB_OFFLINE=1 work as usual).

Resolving reads configs only; loading keeps the dtype the weights are stored in unless asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clear_surgery.surgery import BUILTIN_PREFIX, builtin_class, builtin_names, load_builtin
from clear_surgery.surgery.core.dtypes import parse_dtype  # noqa: F401 (re-exported)
from clear_surgery.surgery.core.errors import InvalidValueError

from .checkpoint import (CLEAR_CONFIG_NAME, LAYERS_FORMAT, read_headers, read_json, read_tensor_specs, stored_dtype,
                         weight_files)
from .clear_layers import LAYERS_FILE, load_clear_layers, read_layers_folder
from .converted import load_converted, model_class, read_clear_config
from .download import hub_file, hub_snapshot, looks_like_path
from .safetensors_io import read_tensor

BUILTIN, DIFFUSERS, CONVERTED, LAYERS = "builtin", "diffusers", "converted", "layers"


class ModelLoadError(InvalidValueError):
    pass


@dataclass
class ModelRef:
    """What a model argument resolved to (configs read, no weights loaded)."""

    kind: str  # builtin | diffusers | converted | layers
    source: str  # as given
    model_class: str
    folder: Path | None = None  # local folder: the model's (diffusers, converted) or the layers folder
    pipeline: str | None = None  # local folder or Hub id of a pipeline around the model (diffusers kind)
    repo_id: str | None = None  # Hub identity
    revision: str | None = None
    subfolder: str | None = None
    meta: dict | None = field(default=None, repr=False)  # clear_config.json of a CLEAR folder

    @property
    def is_clear(self) -> bool:
        return self.kind in (CONVERTED, LAYERS)

    def describe(self) -> str:
        return {BUILTIN: f"the built-in {self.model_class}", DIFFUSERS: f"a dense {self.model_class}",
                CONVERTED: f"a converted CLEAR {self.model_class}",
                LAYERS: f"CLEAR layers for a {self.model_class}"}[self.kind]

    def base(self) -> "ModelRef":
        """The dense base model a CLEAR folder was made from (itself for a dense model)."""
        if not self.is_clear:
            return self
        base = self.meta.get("base_model") or {}
        if not base.get("id"):
            raise ModelLoadError(f"{self.source}: clear_config.json records no base model")
        return resolve_recorded_base(base, self.folder, f"{self.source}'s clear_config.json")

    def record(self) -> dict:
        """How saved CLEAR folders name this model as their base (clear_config.json's base_model)."""
        if self.is_clear:
            return dict(self.meta.get("base_model") or {})
        if self.repo_id:
            identity = self.repo_id
        elif self.kind == DIFFUSERS:  # a local folder: saved relative to the CLEAR folder (portable_record)
            identity = str(Path(self.pipeline or self.folder).resolve())
        else:
            identity = self.source
        return {"id": identity, "revision": self.revision, "subfolder": self.subfolder,
                "model_class": self.model_class}

    def local_folder(self) -> Path:
        """The local folder of the model's files (a Hub model's are downloaded here, once)."""
        if self.folder is None and self.repo_id:
            patterns = [f"{self.subfolder}/*"] if self.subfolder else None
            root = hub_snapshot(self.repo_id, self.revision, patterns)
            self.folder = root / self.subfolder if self.subfolder else root
        if self.folder is None:
            raise ModelLoadError(f"{self.source} ({self.describe()}) has no files")
        return self.folder


    def pipeline_folder(self) -> Path | None:
        """The local folder of the pipeline around the model (a Hub pipeline is downloaded whole)."""
        if self.pipeline is None:
            return None
        if self.repo_id and self.pipeline == self.repo_id:
            return hub_snapshot(self.repo_id, self.revision)
        return Path(self.pipeline)

    def read_tensors(self, names) -> dict[str, torch.Tensor]:
        """The tensors with these names that the model's files hold (a layers folder: its layers file)."""
        files = [self.folder / LAYERS_FILE] if self.kind == LAYERS else weight_files(self.local_folder())
        wanted = set(names)
        return {n: read_tensor(h, n) for h in read_headers(files) for n in h.tensors if n in wanted}


def _class_of(config_path: Path) -> str:
    name = read_json(config_path).get("_class_name")
    return model_class(name, str(config_path)).__name__


def _local(folder: Path, source: str, subfolder: str | None, hub: dict) -> ModelRef:
    if subfolder is None and (folder / CLEAR_CONFIG_NAME).is_file():
        meta = read_clear_config(folder, None)
        if meta["format"] == LAYERS_FORMAT:
            read_layers_folder(folder)
            return ModelRef(LAYERS, source, meta.get("model_class", "?"), folder=folder, meta=meta, **hub)
        return ModelRef(CONVERTED, source, meta.get("model_class", "?"), folder=folder, meta=meta, **hub)
    pipeline = None
    if (folder / "model_index.json").is_file():  # a pipeline: the model is one of its subfolders
        subfolder, pipeline = subfolder or "transformer", hub.get("repo_id") or str(folder)
    model_dir = folder / subfolder if subfolder else folder
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} is not a model folder: no config.json (diffusers model), model_index.json "
                             f"(pipeline) or {CLEAR_CONFIG_NAME} (CLEAR folder)")
    hub = {**hub, "subfolder": subfolder}
    return ModelRef(DIFFUSERS, source, _class_of(model_dir / "config.json"), folder=model_dir, pipeline=pipeline, **hub)


def _hub(repo_id: str, subfolder: str | None, revision: str | None) -> ModelRef:
    hub = {"repo_id": repo_id, "revision": revision}
    if subfolder is None:
        clear = hub_file(repo_id, CLEAR_CONFIG_NAME, revision, required=False)
        if clear is not None:  # a CLEAR folder on the Hub: small next to its use, fetched whole
            return _local(hub_snapshot(repo_id, revision), repo_id, None, hub)
        if hub_file(repo_id, "model_index.json", revision, required=False) is not None:
            subfolder = "transformer"
    config = hub_file(repo_id, f"{subfolder}/config.json" if subfolder else "config.json", revision)
    snapshot = re.search(r"snapshots/([0-9a-f]{40})", str(config))
    pipeline = repo_id if subfolder == "transformer" else None
    return ModelRef(DIFFUSERS, repo_id, _class_of(config), pipeline=pipeline, repo_id=repo_id,
                    revision=snapshot.group(1) if snapshot else revision, subfolder=subfolder)


def resolve_recorded_base(record: dict, folder: Path | None, where: str, option: str = "--layers-base") -> ModelRef:
    """The base model a CLEAR folder records: a path relative to the folder (``portable_record``) is resolved
    against it, then its absolute hint; anything else as the resolver takes it. A record that names nothing
    reachable fails with where it came from and how to give the base instead."""
    kwargs = dict(subfolder=record.get("subfolder"), revision=record.get("revision"))
    if record.get("relative_to") == "folder" and folder is not None:
        candidates = [(Path(folder) / record["id"]).resolve(), record.get("absolute_hint")]
        for candidate in filter(None, candidates):
            if Path(candidate).is_dir():
                return resolve_model(str(candidate), **kwargs)
        raise ModelLoadError(f"{where} records its base model as {record['id']!r} relative to {folder} "
                             f"({candidates[0]}, once {record.get('absolute_hint')}): no such folder; give the base "
                             f"model with {option}")
    try:
        return resolve_model(record["id"], **kwargs)
    except ModelLoadError as err:
        raise ModelLoadError(f"{where} records its base model as {record['id']!r}: {err}; give the base model with "
                             f"{option}") from err


def resolve_model(source: str, *, subfolder: str | None = None, revision: str | None = None) -> ModelRef:
    """What ``source`` names; reads configs only. One ModelLoadError (or a ValueError subclass naming
    the file at fault) for anything that is not a model."""
    if not isinstance(source, str) or not source:
        raise ModelLoadError("no model given")
    if source.startswith(BUILTIN_PREFIX):
        if source not in builtin_names():
            raise ModelLoadError(f"unknown built-in model {source!r}; available: {builtin_names()}")
        if revision is not None:
            raise ModelLoadError(f"--revision {revision}: {source} is built in, it has no revisions (they are for "
                                 "Hub ids)")
        return ModelRef(BUILTIN, source, builtin_class(source))
    path = Path(source).expanduser()
    if path.is_dir():
        return _local(path, source, subfolder, {})
    if path.is_file():
        raise ModelLoadError(f"--model takes a model folder, not a file: {source} (give its folder, "
                             f"{path.parent or '.'})")
    if looks_like_path(source) or path.exists():
        raise ModelLoadError(f"no such model folder: {source}")
    check_not_bare_builtin(source)
    return _hub(source, subfolder, revision)


def check_not_bare_builtin(source: str) -> None:
    """A built-in's name without its prefix is neither a folder nor a Hub id (OWNER/NAME): say so at once."""
    if f"{BUILTIN_PREFIX}{source}" in builtin_names() and not Path(source).expanduser().exists():
        raise ModelLoadError(f"{source!r} is not a folder or a Hub id (OWNER/NAME): did you mean "
                             f"{BUILTIN_PREFIX}{source}?")


def load_model(source: str | ModelRef, *, subfolder: str | None = None, revision: str | None = None,
               dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, ModelRef]:
    """The model ``source`` names, in eval mode, in its stored dtype unless ``dtype`` is given; a CLEAR
    folder comes back with its CLEAR attention applied (``get_clear_state`` reads it)."""
    ref = source if isinstance(source, ModelRef) else resolve_model(source, subfolder=subfolder, revision=revision)
    if ref.kind == BUILTIN:
        model = load_builtin(ref.source, dtype)
    elif ref.kind == CONVERTED:
        model = load_converted(ref.folder, dtype=dtype)
    elif ref.kind == LAYERS:
        base, _ = load_model(ref.base(), dtype=dtype)
        model = load_clear_layers(base, ref.folder)
    else:
        folder = ref.local_folder()
        files = weight_files(folder)
        if not files:
            raise ModelLoadError(f"{folder} has no safetensors weights (clear-surgery loads safetensors only)")
        stored = stored_dtype(read_tensor_specs(files))  # also checks every header
        model = model_class(ref.model_class).from_pretrained(folder, torch_dtype=dtype or stored,
                                                             low_cpu_mem_usage=True, use_safetensors=True)
    return model.eval(), ref
