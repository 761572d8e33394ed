"""Launching a command on several processes: relaunch it under torchrun, join the process group torchrun
describes, and split a pipeline's CLEAR models over the processes (patch parallelism)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist

from clear_surgery.surgery import enable_patch_parallel, get_clear_state
from clear_surgery.surgery.core.errors import InvalidValueError


def relaunch_under_torchrun(nproc: int, option: str, argv: list[str], module: str) -> int:
    """Run ``python -m module argv`` again under torchrun with ``nproc`` processes (``option`` and its value
    dropped from ``argv``); returns torchrun's exit code."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *args]
    return subprocess.call(command, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))


def init_from_torchrun() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1; NCCL with one GPU per process, else
    gloo); True when this call started it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def join_patch_parallel(pipe) -> int:
    """Under torchrun: join the group, move the pipeline to this process's GPU (if any) and split the
    CLEAR models' image rows over the processes. Returns this process's rank (0 alone)."""
    init_from_torchrun()
    if not dist.is_initialized():
        return 0
    if dist.get_rank() > 0:
        pipe.set_progress_bar_config(disable=True)
    if torch.cuda.is_available():
        pipe.to(f"cuda:{torch.cuda.current_device()}")
    for name in ("transformer", "controlnet"):
        model = getattr(pipe, name, None)
        if model is not None:
            if get_clear_state(model) is None:
                raise InvalidValueError(f"patch parallel needs CLEAR attention: the pipeline's {name} is dense "
                                        "(give a CLEAR folder, or --radius to convert it)")
            enable_patch_parallel(model)
    return dist.get_rank()
