"""What every command shares: the Typer app, one ``error:`` line for bad input, source checks,
the stage counter, the model resolver."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

import typer

from clear_surgery.surgery.core.errors import ClearSurgeryError, InvalidValueError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Linearize diffusion transformers with CLEAR local attention.")

MODEL_HELP = ("builtin:NAME, a local diffusers model or pipeline folder, a converted CLEAR folder, a CLEAR-layers "
              "folder, or a Hub id of any of these")
INVOCATION: list[str] = []  # the arguments main() was called with (to relaunch a command under torchrun)


def command_line():
    """The command group of ``app`` with help that shows what to type, not Python types: an option that takes
    a value shows its flag in capitals (``--model MODEL``), a flag, ``--help`` and a positional argument
    nothing more."""
    group = typer.main.get_command(app)
    for command in [group, *group.commands.values()]:
        for param in command.params:
            if param.param_type_name == "argument":
                param.display_type_rich = lambda ctx: None  # its name is already shown (``[MODEL]``)
            elif param.metavar is None:
                flag = next((o for o in param.opts if o.startswith("--")), param.name)
                param.metavar = "" if param.is_flag else flag.lstrip("-").upper().replace("-", "_")
        command.get_help_option = _plain_help(command.get_help_option)
    return group


def _plain_help(get_help_option):
    def plain(ctx):
        option = get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    return plain


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, ClearSurgeryError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return " ".join(str(err).split()) or type(err).__name__


@contextlib.contextmanager
def user_errors():
    """One ``error: ...`` line and exit code 2 for what the user's input or machine causes: clear-surgery's
    own errors, bad values (ValueError) and files, paths, disks and networks (OSError). Anything else is
    a bug and keeps its traceback."""
    try:
        yield
    except (ClearSurgeryError, ValueError, OSError) as err:
        fail(one_line(err))


def quiet_libraries() -> None:
    """Library notices a user cannot act on (set before the libraries are imported)."""
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(torchvision|TorchScript|torch.jit).*")
    # torchao (imported by diffusers when installed) reports its optional GPU libraries and enum registrations
    for name in ("diffusers", "transformers", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                 "huggingface_hub", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_LOGS", "-onnx")  # torch sets its loggers' levels itself, from this
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def check_sources(model: str | None, file: str | None = None) -> None:
    """Fail within seconds (before torch is imported) when a model or file argument can only come from an
    unreachable Hub and the local cache does not have it."""
    from clear_surgery.hub.download import require_reachable
    from clear_surgery.hub.resolve import check_not_bare_builtin

    if model:
        check_not_bare_builtin(model)
        require_reachable(model)
    if file:
        require_reachable(file, file=True)


@contextlib.contextmanager
def stages(desc: str, total: int | None = None):
    """A stage counter on stderr: ``step(message, n)`` shows the stage starting; the bar's last line
    (written when it closes) is printed once, not again after the final step."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="stage", file=sys.stderr) as bar:
        def step(message: str, n: int = 1) -> None:
            bar.set_postfix_str(message, refresh=False)
            bar.update(n)
            bar.refresh()

        def finish(message: str | None = None) -> None:  # counted, shown by close()
            if message:
                bar.set_postfix_str(message, refresh=False)
            bar.n = bar.total if bar.total is not None else bar.n + 1

        step.finish = finish
        yield step


def resolve(model: str, subfolder=None, revision=None):
    from clear_surgery.hub.resolve import resolve_model  # read at each call (tests replace it)

    return resolve_model(model, subfolder=subfolder, revision=revision)


def model_argument(option: str | None, positional: str | None) -> str:
    """The model of a command that used to take it as a positional argument: --model, as every command does;
    the positional form still works, with a note, for one release."""
    if option is not None and positional is not None:
        raise InvalidValueError(f"give the model once: --model {option} or the positional {positional}, not both")
    if option is None and positional is None:
        raise InvalidValueError("missing --model: the model to use (" + MODEL_HELP + ")")
    if positional is not None:
        typer.echo(f"note: the model as a positional argument is deprecated; use --model {positional}", err=True)
    return option or positional
