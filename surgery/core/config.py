"""ClearConfig: what a CLEAR rewrite does, validated on construction (torchao-style).

It holds what the weights mean (radius, per-layer radii, targets, token layout, pooling) and is saved
with them; run-time choices (which backend runs the op) are not part of it, so a saved folder loads on
any machine (``apply_clear(..., backend=...)``, ``set_backend``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .checks import check_number
from .errors import InvalidValueError

CONFIG_VERSION = 2
# version 1 also recorded the backend, a run-time choice: read as the default backend of a loaded model
LEGACY_RUNTIME_KEYS = {1: ("backend",)}
IMAGE_ATTENTION = ("dense", "local")


@dataclass
class ClearConfig:
    """Settings of a CLEAR rewrite.

    radius: image keys within this Euclidean distance (strict) on the token grid stay visible.
    target_modules: fnmatch patterns of attention-module names to convert (default: every
        joint text-image attention site). exclude_modules: patterns to leave dense.
    image_attention: "dense" (default, as the paper: only joint attention converts) or "local": image-only
        self-attention sites (SD3.5's attn2) become CLEAR too, with no text segment (each image query sees
        the image tokens within its radius; ``radius_overrides`` apply to them as to any site).
    """

    radius: float
    target_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)
    radius_overrides: dict[str, float] = field(default_factory=dict)
    token_layout: str = "raster"
    tile_shape: list[int] | None = None
    down_factor: int | None = None
    image_attention: str = "dense"
    version: int = CONFIG_VERSION

    def __post_init__(self):
        for where, value in [("radius", self.radius), *((f"radius for {k!r}", v) for k, v in
                                                         dict(self.radius_overrides).items())]:
            check_number(where, value, low=0)  # inf would be dense attention, and is not valid JSON
        if not all(isinstance(k, str) and k for k in self.radius_overrides):
            raise InvalidValueError(f"radius_overrides keys must be module-name patterns, got {list(self.radius_overrides)}")
        self.radius_overrides = dict(self.radius_overrides)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(p, str) and p for p in value):
                raise InvalidValueError(f"{name} must be a list of non-empty module-name patterns, got {value!r}")
            setattr(self, name, list(value))
        if self.token_layout not in ("raster", "tiled"):
            raise InvalidValueError(f"token_layout (--token-layout) must be 'raster' or 'tiled', got "
                                    f"{self.token_layout!r}")
        if self.tile_shape is not None:
            if self.token_layout != "tiled":
                raise InvalidValueError("tile_shape needs token_layout='tiled'")
            if len(self.tile_shape) != 2 or not all(isinstance(t, int) and t > 0 for t in self.tile_shape):
                raise InvalidValueError(f"tile_shape must be two positive ints, got {self.tile_shape!r}")
            self.tile_shape = list(self.tile_shape)
        check_number("down_factor", self.down_factor, integer=True, low=2, strict=False,  # None: plain CLEAR
                     optional=True)
        if self.image_attention not in IMAGE_ATTENTION:
            raise InvalidValueError(f"image_attention (--image-attention) must be one of {', '.join(IMAGE_ATTENTION)}, "
                                    f"got {self.image_attention!r}")
        if self.version != CONFIG_VERSION:
            raise InvalidValueError(f"ClearConfig version {self.version} is not supported (this is {CONFIG_VERSION})")

    def radius_for(self, module: str) -> float:
        import fnmatch

        for pattern, radius in self.radius_overrides.items():
            if fnmatch.fnmatchcase(module, pattern):
                return radius
        return self.radius

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["image_attention"] == "dense":  # the default, left out: folders stay readable by earlier releases
            del data["image_attention"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ClearConfig":
        """A config as saved (any version this reads); run-time keys of older versions are left out
        (``saved_runtime_choices`` reads them)."""
        data = dict(data)
        legacy = LEGACY_RUNTIME_KEYS.get(data.get("version"), ())
        for key in legacy:
            data.pop(key, None)
        if data.get("version") in LEGACY_RUNTIME_KEYS:
            data["version"] = CONFIG_VERSION
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidValueError(f"unknown ClearConfig keys: {unknown}")
        return cls(**data)


def saved_runtime_choices(data: dict) -> dict:
    """The run-time choices an older saved config recorded beside its settings (e.g. {'backend': 'triton'})."""
    return {key: data[key] for key in LEGACY_RUNTIME_KEYS.get(data.get("version"), ()) if key in data}


def runtime_backend(requested: str | None, *, saved: bool = False) -> str:
    """The backend a model runs: ``requested`` if this machine has it. A backend a saved folder recorded
    (``saved``) that this machine lacks falls back to 'auto' with one warning; one asked for now is an error."""
    import warnings

    from clear_surgery.plugins import backend_names

    if requested is None or requested in backend_names():
        return requested or "auto"
    if saved:
        warnings.warn(f"the saved CLEAR config asks for backend {requested!r}, which this machine does not have "
                      f"({', '.join(backend_names())}): using 'auto'", stacklevel=3)
        return "auto"
    raise InvalidValueError(f"unknown backend {requested!r}; choose one of {backend_names()}")
