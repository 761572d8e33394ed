"""Heal a CLEAR model against its dense teacher (the paper's distillation).

One model in memory: the student is the teacher with CLEAR processors; the teacher's forward
swaps the dense processors back in and, through ``functional_call``, its original copies of the
trained tensors (the only extra memory). Loss = w_fm * flow matching + lambda * MSE(student
output, teacher output) + mu * MSE of chosen layers' attention outputs.

Multi-GPU: start with ``torchrun --nproc_per_node N -m clear_surgery.surgery.cli distill ...``;
every process trains on its own slice of each global batch under DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clear_surgery.hub import load_model, resolve_model, save_clear_layers, trained_names
from clear_surgery.surgery import apply_clear, dense_attention, get_clear_state, is_clear_tensor

from ..launch import init_from_torchrun
from .data import SampleCache, collate, generate_samples, samples_family
from .losses import AttentionCapture, DistillError, attention_layer_names, sample_sigmas
from .metrics import METRICS_FILE, MetricsLog, plot_metrics
from .recipe import DistillRecipe
from .state import TrainingState, checkpoints, load_checkpoint, restore_rng, rng_state, save_checkpoint

LAYERS_FOLDER = "clear-layers"
CONTROLNET_LAYERS_FOLDER = "clear-layers-controlnet"  # the ControlNet's own, when its attention trains too
CONTROLNET_PREFIX = "controlnet."  # its tensors' names among the trained ones (optimizer, checkpoints)
EVAL_SEED_OFFSET = 7919


@contextlib.contextmanager
def swapped_tensors(module, tensors: dict[str, torch.Tensor]):
    """``module`` runs with ``tensors`` in place of its parameters of those names inside the block (no grad: a
    frozen copy's forward without a second module in memory)."""
    params = dict(module.named_parameters())
    kept = {name: params[name].data for name in tensors}
    try:
        for name, value in tensors.items():
            params[name].data = value
        yield module
    finally:
        for name, value in kept.items():
            params[name].data = value


def lr_lambda(train):
    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
        if train.schedule == "linear":
            return max(0.0, 1 - progress)
        if train.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


class Distiller:
    """Owns the model, data, optimizer and loop of one distillation run."""

    def __init__(self, recipe: DistillRecipe, *, model=None, dataset=None, device=None, progress: bool = True):
        self.recipe, self.progress = recipe, progress
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = torch.device(device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                                              else "cpu"))
        self.out = recipe.output_dir
        t = recipe.train
        self.autocast = t.precision == "bf16"
        self.start_from = None  # a CLEAR folder given as model.teacher: the student starts from its tensors
        self.model = model if model is not None else self._load_model()
        self.family = samples_family(self.model)
        self.controlnet = self._load_controlnet() if recipe.model.controlnet else None
        self._controlnet_now = True  # this step's batches run with the ControlNet (model.controlnet_share)
        self._prepare_parameters()
        self.dataset = dataset if dataset is not None else SampleCache(recipe.data_folder)
        self.train_set, self.eval_set = self._split(self.dataset)
        layers = attention_layer_names(self.model, recipe.loss.attention_layers) if recipe.loss.attention else []
        self.capture = AttentionCapture(self.model, layers)
        self.student = self.model
        if self.world > 1:
            self.student = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        params = [self.trained[n] for n in self.trained_names]
        if t.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=tuple(t.betas),
                                               weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t))
        self.state = TrainingState(0, 0)
        self._orders: dict[int, list[int]] = {}
        global_batch = t.batch_size * self.world * t.gradient_accumulation_steps
        self.fingerprint = {**recipe.training_fingerprint(), "global_batch": {"size": global_batch}}

    # --- set-up ---------------------------------------------------------------------------------

    def _load_model(self):
        """The dense teacher (a CLEAR folder's base model) with CLEAR processors: the student."""
        ref = self.recipe.teacher_ref()
        model, _ = load_model(ref.base(), dtype=self.recipe.torch_dtype)  # None: as stored
        apply_clear(model, self.recipe.clear_config(), backend=self.recipe.clear.backend, verify=False)  # convert verifies; here it costs a trace
        self.start_from = ref if ref.is_clear else None  # its tensors are the student's starting point
        return model.to(self.device)

    def _load_controlnet(self):
        """The ControlNet beside the model (teacher and student alike); its own attention dense, or CLEAR at the
        recipe's settings: zero-shot (frozen), or trained with the model's tensors (_prepare_parameters)."""
        from ..controlnets import load_controlnet

        controlnet = load_controlnet(self.recipe.model.controlnet, self.model, "model.controlnet")
        if self.recipe.model.controlnet_attention in ("clear", "trained"):
            apply_clear(controlnet, self.recipe.clear_config(), backend=self.recipe.clear.backend, verify=False)
        return controlnet.requires_grad_(False).eval().to(self.device)

    @property
    def controlnet_trains(self) -> bool:
        return self.controlnet is not None and self.recipe.model.controlnet_attention == "trained"

    def _controlled(self, inputs: dict, batch: dict) -> tuple[dict, dict]:
        """(the teacher's, the student's) transformer inputs with the ControlNet's residuals (the inputs as they are
        without a ControlNet, or on a step without it). The teacher's ControlNet runs dense, so the two differ
        only where the student's ControlNet is CLEAR."""
        if self.controlnet is None or not self._controlnet_now:
            return inputs, inputs

        def residuals():
            return self.family.controlnet_residuals(self.controlnet, inputs, batch, self.recipe.data.controlnet_scale)

        clear = get_clear_state(self.controlnet) is not None
        with self._amp():
            # the dense side's ControlNet also keeps its original attention tensors (as the teacher does)
            with torch.no_grad(), dense_attention(self.controlnet) if clear else contextlib.nullcontext(), \
                    swapped_tensors(self.controlnet, self.controlnet_teacher_tensors):
                teacher = {**inputs, **residuals()}
            if not clear:
                return teacher, teacher
            # a trained ControlNet's residuals carry the gradient to its tensors
            with contextlib.nullcontext() if self.controlnet_trains else torch.no_grad():
                return teacher, {**inputs, **residuals()}

    def _prepare_parameters(self):
        model = self.model
        self.trained_names = trained_names(model, self.recipe.train.trained)
        named = dict(model.named_parameters())
        not_params = [n for n in self.trained_names if n not in named]
        if not_params:
            raise DistillError(f"train.trained selects buffers, which cannot be trained: {not_params[:5]}")
        model.requires_grad_(False)
        self.frozen_dtype = next(iter(named.values())).dtype
        # The teacher keeps the original values; the student trains fp32 master copies (bf16 runs autocast).
        # CLEAR's own tensors (the "down" variant's spatial_weight) belong to CLEAR processors, which the
        # dense teacher does not run.
        self.teacher_tensors = {n: named[n].detach().clone() for n in self.trained_names if not is_clear_tensor(n)}
        if self.start_from is not None:
            with torch.no_grad():
                for name, value in self.start_from.read_tensors(self.trained_names).items():
                    named[name].copy_(value)
        for n in self.trained_names:
            named[n].data = named[n].data.float()
            named[n].requires_grad_(True)
        self.trained = {n: named[n] for n in self.trained_names}
        self.controlnet_teacher_tensors = {}
        if self.controlnet_trains:  # the ControlNet's attention tensors, by the same selection, beside the model's
            own = dict(self.controlnet.named_parameters())
            names = trained_names(self.controlnet, self.recipe.train.trained)
            self.controlnet_teacher_tensors = {n: own[n].detach().clone() for n in names if not is_clear_tensor(n)}
            for n in names:
                own[n].data = own[n].data.float()
                own[n].requires_grad_(True)
                self.trained[CONTROLNET_PREFIX + n] = own[n]
            self.trained_names = list(self.trained)
        if self.recipe.train.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()

    def _split(self, dataset):
        holdout = self.recipe.data.holdout
        if len(dataset) <= holdout:
            raise DistillError(f"{len(dataset)} samples cannot leave {holdout} held out for evaluation")
        if isinstance(dataset, SampleCache):
            return dataset.split(holdout)
        n = len(dataset) - holdout
        return (torch.utils.data.Subset(dataset, range(n)), torch.utils.data.Subset(dataset, range(n, len(dataset))))

    # --- one step -------------------------------------------------------------------------------

    def _amp(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _teacher(self, inputs):
        with torch.no_grad(), self._amp(), dense_attention(self.model), self.capture.record() as attn:
            out = torch.func.functional_call(self.model, self.teacher_tensors, (), inputs, strict=False)[0]
        return out, dict(attn)

    def _batch(self, indices, dataset) -> dict:
        return {k: v.to(self.device) for k, v in collate([dataset[i] for i in indices]).items()}

    def _noised(self, batch, generators):
        """Flow-matching inputs; each sample's noise and timestep come from its own generator."""
        x0 = batch["latents"].float()
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(self.device)
        sigma = torch.cat([sample_sigmas(self.recipe.train, 1, g) for g in generators]).to(self.device)
        s = sigma.view(-1, *[1] * (x0.dim() - 1))
        noisy = ((1 - s) * x0 + s * noise).to(batch["latents"].dtype)
        inputs = self.family.model_inputs(self.model, batch, noisy, sigma, self.recipe.data.guidance)
        return inputs, noise - x0

    def _generators(self, seed: int, positions) -> list[torch.Generator]:
        # Noise is a function of (seed, sample position): the same for any number of processes and
        # after a resume, without carrying generator states around.
        return [torch.Generator().manual_seed(seed * 1_000_003 + p) for p in positions]

    def losses(self, batch, generators) -> dict[str, torch.Tensor]:
        w = self.recipe.loss
        inputs, target = self._noised(batch, generators)
        teacher_inputs, inputs = self._controlled(inputs, batch)
        teacher_out, teacher_attn = self._teacher(teacher_inputs) if (w.teacher_output or w.attention) else (None, {})
        with self._amp(), self.capture.record() as attn:
            out = self.student(**inputs)[0]
        parts = {"flow_matching": F.mse_loss(out.float(), target.float())}
        if w.teacher_output:
            parts["teacher_output"] = F.mse_loss(out.float(), teacher_out.float())
        if w.attention and attn:
            parts["attention"] = torch.stack([F.mse_loss(attn[n].float(), teacher_attn[n].float())
                                              for n in attn]).mean()
        parts["loss"] = sum(getattr(w, k) * v for k, v in parts.items())
        return parts

    def _positions(self, micro: int) -> range:
        """This process's slice of micro-batch ``micro`` of the current step in the sample stream."""
        batch = self.recipe.train.batch_size
        start = self.state.samples_seen + (micro * self.world + self.rank) * batch
        return range(start, start + batch)

    def _indices(self, positions) -> list[int]:
        """Samples at these stream positions (a fresh shuffled order each epoch)."""
        n = len(self.train_set)
        out = []
        for position in positions:
            epoch, i = divmod(position, n)
            if epoch not in self._orders:
                generator = torch.Generator().manual_seed(self.recipe.train.seed + epoch)
                self._orders = {epoch: torch.randperm(n, generator=generator).tolist()}
            out.append(self._orders[epoch][i])
        return out

    def step(self) -> dict[str, float]:
        """One optimizer step over gradient_accumulation_steps micro-batches per process."""
        t = self.recipe.train
        accum = t.gradient_accumulation_steps
        share = self.recipe.model.controlnet_share  # step k runs with it when floor((k + 1) share) > floor(k share)
        self._controlnet_now = math.floor((self.state.step + 1) * share) > math.floor(self.state.step * share)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(accum):
            positions = self._positions(micro)
            batch = self._batch(self._indices(positions), self.train_set)
            last = micro == accum - 1
            # DDP: all-reduce gradients once, after the last micro-batch
            sync = self.student.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
            with sync:
                parts = self.losses(batch, self._generators(t.seed, positions))
                (parts["loss"] / accum).backward()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) / accum
        if self.world > 1 and self.controlnet_trains:  # the ControlNet is not inside DDP: average its gradients
            for name, param in self.trained.items():
                if name.startswith(CONTROLNET_PREFIX) and param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= self.world
        if t.max_grad_norm is not None:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(list(self.trained.values()), t.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        self.state.samples_seen += t.batch_size * self.world * accum
        if self.world > 1:  # report the mean over processes
            tensor = torch.tensor(list(totals.values()), device=self.device)
            dist.all_reduce(tensor)
            totals = dict(zip(totals, (tensor / self.world).tolist()))
        return totals

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean MSE between student and teacher velocity on the held-out samples, with fixed noise
        and timesteps (the same every call, so values are comparable across the run)."""
        total, count = 0.0, 0
        self._controlnet_now = True  # held out: the ControlNet pipeline's samples, with the ControlNet
        for i in range(len(self.eval_set)):
            batch = self._batch([i], self.eval_set)
            inputs, _ = self._noised(batch, self._generators(self.recipe.train.seed + EVAL_SEED_OFFSET, [i]))
            teacher_inputs, student_inputs = self._controlled(inputs, batch)
            teacher, _ = self._teacher(teacher_inputs)
            with self._amp():
                student = self.model(**student_inputs)[0]
            total += float(F.mse_loss(student.float(), teacher.float()))
            count += 1
        return total / count

    # --- the run --------------------------------------------------------------------------------

    def resume(self) -> bool:
        found = checkpoints(self.out)
        if not found:
            return False
        state, trained, optim, rng = load_checkpoint(found[-1], self.fingerprint)
        with torch.no_grad():
            for name, value in trained.items():
                self.trained[name].copy_(value)
        self.optimizer.load_state_dict(optim["optimizer"])
        self.scheduler.load_state_dict(optim["scheduler"])
        restore_rng(rng)
        self.state = state
        return True

    def _save(self):
        rng = rng_state()
        if self.rank == 0:
            save_checkpoint(self.out, self.state, self.trained, self.optimizer, self.scheduler, rng,
                            self.fingerprint, self.recipe.train.keep_checkpoints)
        if self.world > 1:
            dist.barrier()

    def run(self, *, resume: bool = False) -> Path | None:
        from tqdm.auto import tqdm

        t = self.recipe.train
        log = MetricsLog(self.out, enabled=self.rank == 0)
        resumed = resume and self.resume()
        if resumed:
            log.truncate_after(self.state.step)
        else:
            log.reset()
            log.write({"step": 0, "eval/student_teacher_mse": self.evaluate()})
        bar = tqdm(total=t.steps, initial=self.state.step, desc="distill", unit="step",
                   disable=not self.progress or self.rank != 0)
        while self.state.step < t.steps:
            started = time.perf_counter()
            values = self.step()
            values["step_time_s"] = time.perf_counter() - started
            values["lr"] = self.scheduler.get_last_lr()[0]
            if self.device.type == "cuda":
                values["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            step = self.state.step
            if step % t.log_every == 0 or step == t.steps:
                log.write({"step": step, **{f"train/{k}" if k not in ("lr",) else k: v for k, v in values.items()}})
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                log.write({"step": step, "eval/student_teacher_mse": self.evaluate()})
            if step % t.checkpoint_every == 0 or step == t.steps:
                self._save()
            bar.update()
            bar.set_postfix(loss=f"{values['loss']:.4g}")
        bar.close()
        final = self.evaluate()
        log.write({"step": self.state.step, "eval/student_teacher_mse": final})
        log.close()
        if self.rank == 0:
            plot_metrics(self.out)
        return self.save_layers(final) if self.rank == 0 else None

    def save_layers(self, final_mse: float) -> Path:
        """OUT/clear-layers (the model's); with a trained ControlNet also OUT/clear-layers-controlnet, its own
        (written first: the model's folder marks the run finished)."""
        self.capture.remove()
        zero_shot = MetricsLog.first_eval(self.out)
        for param in self.trained.values():  # back to the model's own dtype for release
            param.data = param.data.to(self.frozen_dtype)
        provenance = self.provenance(zero_shot, final_mse)
        if self.controlnet_trains:
            get_clear_state(self.controlnet).provenance = provenance
            save_clear_layers(self.controlnet, self.out / CONTROLNET_LAYERS_FOLDER, trained=self.recipe.train.trained,
                              base_model=resolve_model(self.recipe.model.controlnet).record(), overwrite=True)
        get_clear_state(self.model).provenance = provenance
        return save_clear_layers(self.model, self.out / LAYERS_FOLDER, trained=self.recipe.train.trained,
                                 base_model=self.recipe.teacher_ref().base().record(), overwrite=True)

    def provenance(self, zero_shot_mse: float, final_mse: float) -> dict:
        """How the CLEAR layers were made, for clear_config.json and the model card."""
        settings = self.recipe.to_dict()
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        return {"method": "distillation", "teacher": self.recipe.model.teacher, "recipe": Path(self.recipe.source).name,
                "recipe_sha256": digest, "recipe_settings": settings, "steps": self.state.step,
                "metrics": {"zero_shot_student_teacher_mse": zero_shot_mse, "eval_student_teacher_mse": final_mse},
                **({"controlnet": {"model": self.recipe.model.controlnet,
                                   "attention": self.recipe.model.controlnet_attention,
                                   "share_of_batches": self.recipe.model.controlnet_share,
                                   "condition": self.recipe.data.condition,
                                   "scale": self.recipe.data.controlnet_scale}} if self.controlnet is not None else {})}


def check_output(recipe: DistillRecipe, *, resume: bool, overwrite: bool) -> None:
    out = recipe.output_dir
    if (out / LAYERS_FOLDER).exists() and not overwrite:
        raise DistillError(f"{out / LAYERS_FOLDER} already exists: this run is finished (pass --overwrite to "
                           "train again)")
    if checkpoints(out) and not resume and not overwrite:
        raise DistillError(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, "
                           "or --overwrite to start over")


def distill(recipe: DistillRecipe, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
            device=None) -> Path | None:
    """Generate (or reuse) the teacher samples, train, save CLEAR layers to <output.dir>/clear-layers."""
    import shutil

    check_output(recipe, resume=resume, overwrite=overwrite)
    started = init_from_torchrun()
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if overwrite and rank == 0:
            for name in (LAYERS_FOLDER, CONTROLNET_LAYERS_FOLDER, "checkpoints", METRICS_FILE, "tensorboard"):
                path = recipe.output_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if recipe.data.generates and rank == 0:
            generate_samples(recipe, device=device, progress=progress)
        if dist.is_initialized():
            dist.barrier()
        recipe.output_dir.mkdir(parents=True, exist_ok=True)
        (recipe.output_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
        return Distiller(recipe, device=device, progress=progress).run(resume=resume)
    finally:
        if started:
            dist.destroy_process_group()
