"""Distillation recipes: a TOML file with [model] [clear] [data] [train] [loss] [output] tables,
validated as a whole before any work starts (every problem is reported in one error)."""

from __future__ import annotations

import dataclasses
import numbers
import tomllib
from dataclasses import dataclass, field
from pathlib import Path


from clear_surgery.hub import DEFAULT_TRAINED, resolve_model
from clear_surgery.hub.download import looks_like_path
from clear_surgery.surgery import BUILTIN_PREFIX, ClearConfig, runtime_backend
from clear_surgery.surgery.core.dtypes import parse_dtype
from clear_surgery.surgery.core.checks import number_problem
from clear_surgery.surgery.core.errors import InvalidValueError
from clear_surgery.surgery.tools.arguments import read_toml
from clear_surgery.surgery.tools.image_metrics import CONDITIONS

RECIPE_VERSION = 1
OFFICIAL_ATTENTION_LAYERS = "official"  # single-stream blocks with index % 4 == 0, as the official code


SAMPLE_GLOB = "sample-*.safetensors"  # cached teacher samples in a data folder


class RecipeError(InvalidValueError):
    pass


def count_samples(folder: Path) -> int:
    return len(list(Path(folder).glob(SAMPLE_GLOB)))


@dataclass
class ModelSection:
    teacher: str  # Hub id, local diffusers folder or builtin:NAME (the dense model)
    subfolder: str | None = None
    revision: str | None = None
    dtype: str | None = None  # dtype the frozen weights are loaded in (None: as stored)
    # heal inside a ControlNet pipeline: the teacher is the dense model with this ControlNet, the student the
    # CLEAR one with the same ControlNet, whose own attention is dense, zero-shot CLEAR (both frozen), or CLEAR
    # with its attention tensors (train.trained's selection) trained along with the model's ("trained")
    controlnet: str | None = None
    controlnet_attention: str = "dense"
    # the share of training batches that run with the ControlNet (the others heal on the model alone, on the same
    # samples): 1 heals for the ControlNet pipeline only, 0.5 alternates (both relatives at once)
    controlnet_share: float = 1.0


@dataclass
class ClearSection:
    radius: float
    backend: str = "auto"
    token_layout: str = "raster"
    tile_shape: list[int] | None = None
    radius_overrides: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)
    down_factor: int | None = None  # the pooled-key variant: spatial_weight is trained too (DEFAULT_TRAINED)


@dataclass
class DataSection:
    folder: str | None = None  # cache of samples; default <output.dir>/data
    prompts: list[str] | None = None  # generate samples with the teacher pipeline from these ...
    prompt_file: str | None = None  # ... or from this file, one prompt per line
    num_samples: int = 0
    height: int = 1024
    width: int = 1024
    inference_steps: int = 28
    guidance: float | None = 3.5
    generate_batch_size: int = 1
    max_sequence_length: int = 512
    holdout: int = 8  # last samples, never trained on: the held-out evaluation set
    seed: int = 0
    control_images: str | None = None  # with model.controlnet: a folder of images (or one), cycled over the samples
    condition: str = "gray"  # the ControlNet's condition made from each control image: gray | edges
    controlnet_scale: float = 1.0

    @property
    def generates(self) -> bool:
        return bool(self.prompts or self.prompt_file)


@dataclass
class TrainSection:
    steps: int
    batch_size: int = 1  # per process and micro-batch
    gradient_accumulation_steps: int = 1
    trained: list[str] = field(default_factory=lambda: list(DEFAULT_TRAINED))
    optimizer: str = "adamw"
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "constant"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"  # fp32 | bf16 (bf16 autocast, trained tensors kept in fp32)
    gradient_checkpointing: bool = False
    timestep_sampling: str = "logit_normal"  # logit_normal | uniform
    timestep_shift: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0: only before and after training


@dataclass
class LossSection:
    flow_matching: float = 1.0
    teacher_output: float = 0.5  # lambda: MSE(student output, teacher output)
    attention: float = 0.5  # mu: MSE of attention outputs of attention_layers
    attention_layers: str | list[str] = OFFICIAL_ATTENTION_LAYERS  # "official" or module-name patterns


@dataclass
class OutputSection:
    dir: str


@dataclass
class DistillRecipe:
    model: ModelSection
    clear: ClearSection
    data: DataSection
    train: TrainSection
    loss: LossSection
    output: OutputSection
    version: int = RECIPE_VERSION
    source: str = "<recipe>"  # file the recipe came from (for messages)

    def clear_config(self):
        """What the trained layers mean (saved with them); the backend is the run's own choice."""
        settings = dataclasses.asdict(self.clear)
        settings.pop("backend")
        return ClearConfig(**settings)

    @property
    def torch_dtype(self):
        return parse_dtype(self.model.dtype, "model.dtype")

    def teacher_ref(self):
        """The resolved model.teacher (a CLEAR folder's base model is the dense teacher)."""
        return resolve_model(self.model.teacher, subfolder=self.model.subfolder, revision=self.model.revision)

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir).expanduser()

    @property
    def data_folder(self) -> Path:
        return Path(self.data.folder).expanduser() if self.data.folder else self.output_dir / "data"

    def prompt_list(self) -> list[str]:
        if self.data.prompts:
            return list(self.data.prompts)
        lines = Path(self.data.prompt_file).expanduser().read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def training_fingerprint(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint."""
        data = self.to_dict()
        data["train"] = {k: v for k, v in data["train"].items() if k not in ("checkpoint_every", "keep_checkpoints",
                                                                              "log_every", "eval_every")}
        return {k: data[k] for k in ("model", "clear", "train", "loss")} | {"data": _data_identity(self.data)}


CONTROLNET_ATTENTION = ("dense", "clear", "trained")  # the ControlNet's own attention while the layers heal


def _data_identity(data: DataSection) -> dict:
    return {k: getattr(data, k) for k in ("height", "width", "holdout", "seed")}


SECTIONS = {"model": ModelSection, "clear": ClearSection, "data": DataSection, "train": TrainSection,
            "loss": LossSection, "output": OutputSection}


def _build(raw: dict, source: str, problems: list[str]) -> DistillRecipe | None:
    unknown = sorted(set(raw) - set(SECTIONS) - {"version"})
    if unknown:
        problems.append(f"unknown tables {unknown}; known: {sorted(SECTIONS)}")
    parts = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            problems.append(f"[{name}] must be a table")
            continue
        known = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        problems += [f"unknown key {name}.{k}" for k in sorted(set(table) - known)]
        problems += [f"missing {name}.{k}" + (" (or give --out)" if (name, k) == ("output", "dir") else "")
                     for k in sorted(required - set(table))]
        if required <= set(table):  # unknown keys aside, the values are still checked, in the same pass
            parts[name] = cls(**{k: v for k, v in table.items() if k in known})
    if len(parts) < len(SECTIONS):
        return None
    return DistillRecipe(**parts, version=raw.get("version", RECIPE_VERSION), source=source)


def _check(r: DistillRecipe, problems: list[str]) -> None:
    def number(where, value, *, integer=False, allow_zero=False):
        problem = number_problem(where, value, integer=integer, low=0, strict=not allow_zero)
        if problem:
            problems.append(problem)

    if r.version != RECIPE_VERSION:
        problems.append(f"recipe version {r.version} is not supported (this is {RECIPE_VERSION})")
    teacher = r.model.teacher
    if not isinstance(teacher, str) or not teacher:
        problems.append("model.teacher must name the dense model (Hub id, folder or builtin:NAME)")
    elif teacher.startswith(BUILTIN_PREFIX) or looks_like_path(teacher) or Path(teacher).expanduser().exists():
        try:  # local forms are checked now, by the resolver every command uses; Hub ids when loaded
            r.teacher_ref()
        except ValueError as err:
            problems.append(f"model.teacher: {err}")
    try:
        parse_dtype(r.model.dtype, "model.dtype")  # (absent: as stored)
    except ValueError as err:
        problems.append(str(err))
    try:
        r.clear_config()
        runtime_backend(r.clear.backend)
    except (ValueError, TypeError) as err:
        problems.append(f"[clear]: {err}")

    d = r.data
    if r.model.controlnet is not None:
        if not isinstance(r.model.controlnet, str) or not r.model.controlnet:
            problems.append("model.controlnet must name a ControlNet (Hub id, folder or builtin:NAME)")
        if d.generates and d.control_images is None:
            problems.append("model.controlnet needs data.control_images (the conditions of the samples it makes)")
    elif d.control_images is not None:
        problems.append("data.control_images needs model.controlnet")
    share = r.model.controlnet_share
    if isinstance(share, bool) or not isinstance(share, numbers.Real) or not 0 < share <= 1:
        problems.append(f"model.controlnet_share must be in (0, 1], got {share!r}")
    if r.model.controlnet_attention not in CONTROLNET_ATTENTION:
        problems.append(f"model.controlnet_attention must be one of {list(CONTROLNET_ATTENTION)}, got "
                        f"{r.model.controlnet_attention!r}")
    if d.condition not in CONDITIONS:
        problems.append(f"data.condition must be one of {list(CONDITIONS)}, got {d.condition!r}")
    number("data.controlnet_scale", d.controlnet_scale, allow_zero=True)
    if d.control_images is not None and not isinstance(d.control_images, str):
        problems.append(f"data.control_images must name a folder of images (or one image), got {d.control_images!r}")
    elif isinstance(d.control_images, str) and not Path(d.control_images).expanduser().exists():
        problems.append(f"data.control_images {d.control_images} does not exist")
    for key in ("height", "width", "inference_steps", "generate_batch_size", "max_sequence_length"):
        number(f"data.{key}", getattr(d, key), integer=True)
    number("data.holdout", d.holdout, integer=True, allow_zero=True)
    if d.prompts is not None and d.prompt_file is not None:
        problems.append("give data.prompts or data.prompt_file, not both")
    if d.generates:
        number("data.num_samples", d.num_samples, integer=True)
        if d.prompt_file and not Path(d.prompt_file).expanduser().is_file():
            problems.append(f"data.prompt_file {d.prompt_file} does not exist")
        elif d.num_samples and isinstance(d.holdout, int) and d.num_samples <= d.holdout:
            problems.append(f"data.num_samples ({d.num_samples}) must exceed data.holdout ({d.holdout})")
    elif d.folder is None:
        problems.append("[data] needs prompts (or prompt_file) to generate samples, or a folder of cached samples")
    else:
        folder = Path(d.folder).expanduser()
        count = count_samples(folder) if folder.is_dir() else 0
        if not folder.is_dir():
            problems.append(f"data.folder {folder} does not exist")
        elif count == 0:
            problems.append(f"data.folder {folder} holds no cached samples (sample-*.safetensors)")
        elif isinstance(d.holdout, int) and count <= d.holdout:
            problems.append(f"data.folder {folder} holds {count} samples, not more than "
                            f"data.holdout ({d.holdout})")

    t = r.train
    number("train.steps", t.steps, integer=True)
    number("train.batch_size", t.batch_size, integer=True)
    number("train.gradient_accumulation_steps", t.gradient_accumulation_steps, integer=True)
    number("train.learning_rate", t.learning_rate)
    number("train.weight_decay", t.weight_decay, allow_zero=True)
    number("train.warmup_steps", t.warmup_steps, integer=True, allow_zero=True)
    number("train.checkpoint_every", t.checkpoint_every, integer=True)
    number("train.keep_checkpoints", t.keep_checkpoints, integer=True)
    number("train.log_every", t.log_every, integer=True)
    number("train.eval_every", t.eval_every, integer=True, allow_zero=True)
    number("train.timestep_shift", t.timestep_shift)
    if t.max_grad_norm is not None:
        number("train.max_grad_norm", t.max_grad_norm)
    if not isinstance(t.seed, int):
        problems.append(f"train.seed must be an integer, got {t.seed!r}")
    choices = {"optimizer": ("adamw", "sgd"), "schedule": ("constant", "linear", "cosine"),
               "precision": ("fp32", "bf16"), "timestep_sampling": ("logit_normal", "uniform")}
    for key, allowed in choices.items():
        if getattr(t, key) not in allowed:
            problems.append(f"train.{key} must be one of {list(allowed)}, got {getattr(t, key)!r}")
    if not (isinstance(t.trained, list) and t.trained and all(isinstance(p, str) and p for p in t.trained)):
        problems.append(f"train.trained must be a non-empty list of parameter-name patterns, got {t.trained!r}")
    if not (isinstance(t.betas, list) and len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas)):
        problems.append(f"train.betas must be two numbers in [0, 1), got {t.betas!r}")

    loss = r.loss
    for key in ("flow_matching", "teacher_output", "attention"):
        number(f"loss.{key}", getattr(loss, key), allow_zero=True)
    if all(isinstance(getattr(loss, k), numbers.Real) and getattr(loss, k) == 0
           for k in ("flow_matching", "teacher_output", "attention")):
        problems.append("all loss weights are 0: nothing to train")
    layers = loss.attention_layers
    if layers != OFFICIAL_ATTENTION_LAYERS and not (isinstance(layers, list)
                                                    and all(isinstance(p, str) and p for p in layers)):
        problems.append(f"loss.attention_layers must be {OFFICIAL_ATTENTION_LAYERS!r} or a list of module-name "
                        f"patterns, got {layers!r}")
    if not isinstance(r.output.dir, str) or not r.output.dir:
        problems.append("output.dir must name the output folder (or give --out)")


def _set(raw: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or "." not in key:
        raise RecipeError(f"override {assignment!r} must look like table.key=value")
    table, name = key.strip().split(".", 1)
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # a bare word: take it as a string
    raw.setdefault(table, {})[name] = parsed


def parse_recipe(raw: dict, source: str = "<recipe>", overrides=(), base_dir: Path | None = None) -> DistillRecipe:
    """A validated recipe from a parsed TOML table; a relative data.prompt_file is taken relative to
    ``base_dir`` (the recipe file's folder)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for assignment in overrides:
        _set(raw, assignment)
    problems: list[str] = []
    recipe = _build(raw, source, problems)
    if recipe is not None and base_dir is not None:  # files the recipe names are relative to it
        for key in ("prompt_file", "control_images"):
            if isinstance(getattr(recipe.data, key), str):
                setattr(recipe.data, key, str(Path(base_dir) / Path(getattr(recipe.data, key)).expanduser()))
    if recipe is not None:
        _check(recipe, problems)
    if problems:
        raise RecipeError(f"recipe {source} is invalid:\n  " + "\n  ".join(problems))
    return recipe


def load_recipe(path: str | Path, overrides=()) -> DistillRecipe:
    """Read and validate a recipe; ``overrides`` are 'table.key=value' strings (values in TOML syntax)."""
    path = Path(path)
    return parse_recipe(read_toml(path, error=RecipeError), str(path), overrides, base_dir=path.parent)
