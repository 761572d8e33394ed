"""``clear-surgery push-to-hub``: validate a CLEAR folder and upload it."""

from __future__ import annotations

from typing import Optional

import typer

from clear_surgery.surgery.core.errors import ClearSurgeryError, InvalidValueError

from .app import app, check_sources, fail, model_argument, one_line, resolve, user_errors


@app.command("push-to-hub")
def push_to_hub(
    source: Optional[str] = typer.Argument(None, metavar="[MODEL]", help="the same as --model (kept for one release)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="a CLEAR folder (converted model or CLEAR "
                                                                    "layers), local or on the Hub"),
    repo_id: str = typer.Option(..., "--repo-id", help="OWNER/NAME on the Hub"),
    private: bool = typer.Option(False, help="create the repo private"),
    revision: Optional[str] = typer.Option(None, help="branch to push to (created if needed)"),
    commit_message: Optional[str] = typer.Option(None, help="commit message"),
    dry_run: bool = typer.Option(False, help="list what would be uploaded, with sizes, and stop"),
):
    """Validate a CLEAR folder and upload it (token from HF_TOKEN or `hf auth login`, never printed)."""
    with user_errors():
        model = model_argument(model, source)
        from clear_surgery.hub.download import check_repo_id, require_reachable

        check_repo_id("--repo-id", repo_id)
        check_sources(model)
        if not dry_run:
            require_reachable(repo_id, upload=True)
        from clear_surgery.hub.push import push_to_hub as push

        ref = resolve(model)
        if not ref.is_clear:
            raise InvalidValueError(f"{model} is {ref.describe()}: push-to-hub uploads a CLEAR folder (run "
                                    "clear-surgery convert first)")
    try:
        result = push(ref.folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                      dry_run=dry_run)
    except Exception as err:
        if not _from_hub_client(err):
            raise
        fail(f"{type(err).__name__}: {one_line(err).splitlines()[0]}")  # huggingface_hub's messages carry no token
    if dry_run:
        typer.echo(result.describe())
        typer.echo(f"dry run: nothing uploaded to {repo_id}")
    else:
        typer.echo(f"uploaded {model} to {repo_id}" + (f": {result.commit_url}" if result is not None else ""))


def _from_hub_client(err: BaseException) -> bool:
    """An error of the Hub, the network or the user's files, not of clear-surgery's code."""
    return isinstance(err, (ClearSurgeryError, ValueError, OSError)) or \
        type(err).__module__.split(".")[0] in ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3")
