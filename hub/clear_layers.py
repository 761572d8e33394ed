"""CLEAR layers: only the tensors CLEAR changes (by default the attention q/k/v/out projections of
every converted site), saved with clear_config.json naming the base model and radius. This is the
form that transfers between models of one architecture (FLUX.1-dev -> schnell); the official CLEAR
releases (clear_local_{8,16,32}.safetensors, and clear_local_{8,16}_down_4.safetensors with each
attention's ``processor.spatial_weight`` of the pooled-key variant) are this form too, without the config."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from clear_surgery.surgery import ClearConfig, apply_clear, family_for_class, remove_clear
from clear_surgery.surgery.core.state import is_clear_tensor, require_clear_state

from .atomic import atomic_directory
from .checkpoint import LAYERS_FORMAT, ClearFolderError, listed, portable_record
from .converted import backend_to_run, finish_folder, folder_meta, read_clear_config
from .download import looks_like_path, resolve_file, resolve_folder
from .layer_tensors import ClearLayersError, apply_layer_tensors, check_layer_fit, layer_shapes  # noqa: F401 (re-exported)
from .safetensors_io import read_header, read_tensor, write_file

LAYERS_FILE = "clear_layers.safetensors"
# the official releases' file names carry the radius, and the pooling factor of the "down" variant
OFFICIAL_NAME = re.compile(r"clear_local_(\d+)(?:_down_(\d+))?")
logger = logging.getLogger("clear_surgery")
# What the official code trains: attention q/k/v/out projections in all blocks (and the "down"
# variant's spatial_weight, which only a model converted with down_factor has).
DEFAULT_TRAINED = ("{site}.to_q.*", "{site}.to_k.*", "{site}.to_v.*", "{site}.to_out.0.*",
                   "{site}.processor.spatial_weight")


def select_names(names, sites, patterns=DEFAULT_TRAINED) -> list[str]:
    """The tensor names the patterns select; '{site}' stands for each converted attention module."""
    expanded = [p.format(site=s) for p in patterns for s in sites] if any("{site}" in p for p in patterns) \
        else list(patterns)
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in expanded)]
    if not chosen:
        raise ClearLayersError(f"the trained-tensor patterns {list(patterns)} select no tensor of the model")
    return chosen


def trained_names(model, patterns=DEFAULT_TRAINED) -> list[str]:
    """State-dict names of a CLEAR model that the patterns select."""
    return select_names(model.state_dict(), require_clear_state(model, "select its CLEAR layers").sites, patterns)


def layers_meta(state, model_class_name: str, trained, base_model: dict | None, tensors: dict) -> dict:
    """The clear_config.json of a CLEAR-layers folder."""
    return folder_meta(LAYERS_FORMAT, state, model_class_name, base_model, trained=list(trained),
                       tensors={n: list(shape) for n, shape in tensors.items()})


def save_clear_layers(model, out: str | os.PathLike, *, trained=DEFAULT_TRAINED, base_model: dict | None = None,
                      overwrite: bool = False) -> Path:
    """Write the CLEAR layers of ``model`` (the tensors ``trained`` selects) as a folder; how they were
    made (the model's CLEAR state's provenance) goes into clear_config.json and the model card."""
    state = require_clear_state(model, "save its CLEAR layers")
    names = trained_names(model, trained)
    tensors = model.state_dict()
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        write_file(tmp / LAYERS_FILE, [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names],
                   lambda n: tensors[n], metadata={"format": "pt"})
        finish_folder(tmp, layers_meta(state, type(model).__name__, trained, portable_record(base_model or {}, out),
                                       {n: tuple(tensors[n].shape) for n in names}))
    return out


def add_layer_change(target: torch.Tensor, layer: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``target + (layer - base)`` in float64, back in the target's dtype: what a layer tensor changed in
    its base model, carried to another model's tensor."""
    wide = dict(device=target.device, dtype=torch.float64)  # files are read on the CPU; the model may be on a GPU
    return (target.double() + layer.to(**wide) - base.to(**wide)).to(target.dtype)


def apply_layer_deltas(model, path: str | os.PathLike, base_tensors: dict[str, torch.Tensor], *,
                       shared_only: bool = False) -> list[str]:
    """Add to ``model``'s tensors what the layers changed in the model they were made from
    (``layers - base_tensors``), instead of replacing them: how layers carry over to a relative whose
    own attention weights moved away from the base in its training (a task vector, as LoRAs are
    carried). ``shared_only``: just the tensors ``model`` has under the same name and shape (a
    ControlNet holding copies of some of the base's blocks). CLEAR's own tensors (spatial_weight) have no
    base and are copied. Every name and shape is checked first;
    on a mismatch nothing is changed. Returns the names written."""
    path = Path(path)
    header = read_header(path)
    state = model.state_dict()
    names = list(header.tensors)
    if shared_only:
        names = [n for n in names if n in state and tuple(state[n].shape) == tuple(header.tensors[n].shape)]
    else:
        check_layer_fit({n: tuple(t.shape) for n, t in state.items()}, path, type(model).__name__)
    own = [n for n in names if is_clear_tensor(n)]  # CLEAR's own tensors have no base: copied as they are
    names = [n for n in names if n not in own]
    missing = sorted(n for n in names if n not in base_tensors)
    if missing:
        raise ClearLayersError(f"the base model lacks {len(missing)} of the layers' tensors: " + listed(missing))
    wrong = [n for n in names if tuple(base_tensors[n].shape) != tuple(header.tensors[n].shape)]
    if wrong:
        raise ClearLayersError("the base model's tensors differ in shape from the layers': " + listed(wrong))
    with torch.no_grad():
        for name in names:
            state[name].copy_(add_layer_change(state[name], read_tensor(header, name), base_tensors[name]))
        for name in own:
            state[name].copy_(read_tensor(header, name).to(state[name].dtype))
    return sorted(names + own)


def file_provenance(path: Path) -> dict:
    """How CLEAR tensors imported from a file were made: the file, by name and content hash."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"method": "imported CLEAR layers", "file": path.name, "sha256": digest.hexdigest()}


def official_settings(filename: str) -> tuple[int, int | None]:
    """clear_local_16.safetensors -> (16, None); clear_local_8_down_4.safetensors -> (8, 4)."""
    name = Path(filename).name
    match = OFFICIAL_NAME.search(name)
    if not match or ("down" in name and not match.group(2)):
        raise ClearLayersError(f"cannot read the radius from {name!r} (expected clear_local_<r>.safetensors or "
                               "clear_local_<r>_down_<f>.safetensors); pass --radius (and --down-factor)")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None


def official_radius(filename: str) -> int:
    """clear_local_16.safetensors -> 16 (clear_local_8_down_4.safetensors -> 8)."""
    return official_settings(filename)[0]


@dataclass(frozen=True)
class LayersSource:
    """What ``--clear-layers`` named: the safetensors file, and the clear_config.json of the CLEAR-layers
    folder it belongs to (None for a bare file such as the official clear_local_16.safetensors)."""

    file: Path
    meta: dict | None = None

    @property
    def base_model(self) -> str | None:
        """The model the layers were made from, as their folder records it (None for a bare file)."""
        return ((self.meta or {}).get("base_model") or {}).get("id")

    @property
    def radius(self) -> float:
        """The radius the layers were made for: the folder's config, else the official file name's."""
        return self.meta["config"]["radius"] if self.meta else official_radius(self.file.name)

    @property
    def down_factor(self) -> int | None:
        """The pooling factor of the "down" variant the layers were made for (None: plain CLEAR)."""
        if self.meta:
            return self.meta["config"].get("down_factor")
        return official_settings(self.file.name)[1] if OFFICIAL_NAME.search(self.file.name) else None

    def describe(self) -> str:
        return str(self.file.parent if self.meta else self.file)

    def check_target(self, model_class_name: str, radius: float, *, allow_radius_change: bool = False,
                     down_factor: int | None = None) -> None:
        """Refuse layers made for another architecture, for another variant (plain CLEAR or "down" with
        another factor), or (unless allowed) for another radius."""
        if self.down_factor != down_factor:
            def variant(f):
                return f"the 'down' variant with factor {f}" if f else "plain CLEAR"

            raise ClearLayersError(f"CLEAR layers {self.describe()} were made for {variant(self.down_factor)}, not "
                                   f"{variant(down_factor)}: " + (f"pass --down-factor {self.down_factor}"
                                                                  if self.down_factor else "drop --down-factor"))
        made_for = (self.meta or {}).get("model_class")
        if made_for and made_for != model_class_name:
            theirs, ours = family_for_class(made_for), family_for_class(model_class_name)
            if theirs is None or theirs is not ours:
                raise ClearLayersError(f"CLEAR layers {self.describe()} were made for a {made_for}; the target is a "
                                       f"{model_class_name} (another architecture)")
        named = OFFICIAL_NAME.search(self.file.name)
        made_at = self.meta["config"]["radius"] if self.meta else official_radius(self.file.name) if named else None
        if made_at is not None and made_at != radius:
            if not allow_radius_change:
                raise ClearLayersError(f"CLEAR layers {self.describe()} were made for r={made_at:g}, not r={radius:g}: "
                                       "drop --radius, or pass --allow-radius-change to use them at another radius")
            logger.warning("using CLEAR layers made for r=%g at r=%g (--allow-radius-change)", made_at, radius)


def resolve_layers(source: str | os.PathLike, revision: str | None = None) -> LayersSource:
    """``--clear-layers``: a CLEAR-layers folder (local or a Hub id), a layers file inside one, a bare
    safetensors file (local or OWNER/REPO/FILENAME on the Hub)."""
    path = Path(source).expanduser()
    text = str(source)
    if path.is_dir() or (not path.exists() and text.count("/") == 1 and not looks_like_path(text)
                         and not text.endswith(".safetensors")):
        folder = resolve_folder(source, revision)
        if not (folder / "clear_config.json").is_file():
            raise ClearFolderError(f"{source} is not a CLEAR-layers folder: no clear_config.json")
        return LayersSource(folder / LAYERS_FILE, read_layers_folder(folder))
    file = resolve_file(text, revision)
    if file.name == LAYERS_FILE and (file.parent / "clear_config.json").is_file():
        return LayersSource(file, read_layers_folder(file.parent))
    read_header(file)  # a damaged or truncated file is named now, not after the model is read
    if "down" in file.name:
        official_settings(file.name)  # a pooled-key file whose factor cannot be read is refused now
    return LayersSource(file)


def read_layers_folder(folder: Path) -> dict:
    """clear_config.json of a CLEAR-layers folder, checked against its layers file's header."""
    meta = read_clear_config(folder, LAYERS_FORMAT)
    path = Path(folder) / LAYERS_FILE
    if not path.is_file():
        raise ClearFolderError(f"{folder} has no {LAYERS_FILE}")
    if set(layer_shapes(path)) != set(meta.get("tensors", {})):
        raise ClearFolderError(f"{path} does not hold the tensors {Path(folder) / 'clear_config.json'} lists")
    return meta


def load_clear_layers(model, source: str | os.PathLike, *, verify: bool = False, revision: str | None = None,
                      backend: str | None = None):
    """Apply a CLEAR-layers folder (local or Hub repo) to a dense base model: attention, then tensors.
    Every name and shape is checked first; on a mismatch the model is left as it was. ``backend``: the
    run-time choice (None: what an older folder recorded if this machine has it, else 'auto')."""
    folder = resolve_folder(source, revision)
    meta = read_layers_folder(folder)
    check_layer_fit({n: tuple(t.shape) for n, t in model.state_dict().items()}, folder / LAYERS_FILE,
                    type(model).__name__, before_rewrite=True)
    apply_clear(model, ClearConfig.from_dict(meta["config"]), backend=backend_to_run(meta["config"], backend),
                verify=verify, provenance=meta.get("training"))
    try:
        apply_layer_tensors(model, folder / LAYERS_FILE)
    except Exception:
        remove_clear(model)
        raise
    return model
