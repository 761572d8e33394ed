"""Every ``$ clear-surgery ...`` command README.md shows, run as a newcomer would: in a fresh working
directory outside the checkout (commands that read ``recipes/`` run from the checkout's root, as README
says), in README's order; each output line README shows (progress bars and ``...`` elided) must appear in
the command's output, and a command README shows failing must fail with exit code 2.

    python recipes/readme/walkthrough.py [--readme README.md] [--keep DIR]    # exit 1 when anything differs
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
NETWORK = "on a machine without a network"  # README's note on the one command that needs no Hub


def commands(readme: str) -> list[tuple[str, list[str]]]:
    """(command, README's output lines) for every ``$ clear-surgery`` line of README's text blocks."""
    found, current = [], None
    for block in re.findall(r"```text\n(.*?)```", readme, flags=re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("$ "):
                command = line[2:]
                while command.rstrip().endswith("\\"):
                    i += 1
                    command = command.rstrip()[:-1] + " " + lines[i].strip()
                current = (command, [])
                found.append(current)
            elif current is not None:
                current[1].append(line)
            i += 1
        current = None
    return [(c, out) for c, out in found if c.startswith("clear-surgery ")]


def shown(lines: list[str]) -> list[str]:
    """README's output lines a run must reproduce: not progress bars, not ``...`` (elided output)."""
    return [" ".join(line.split()) for line in lines if line.strip() and line.strip() != "..." and "█" not in line]


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(command.split("  #")[0])
    env = dict(os.environ, COLUMNS="200", HF_HUB_OFFLINE="0")
    exe = shutil.which("clear-surgery") or sys.exit("clear-surgery is not installed")
    return subprocess.run([exe, *argv[1:]], cwd=cwd, capture_output=True, text=True, env=env, timeout=1800)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=CHECKOUT / "README.md")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="readme-walkthrough-"))
    work.mkdir(parents=True, exist_ok=True)
    differ = 0
    for command, out in commands(args.readme.read_text()):
        cwd = CHECKOUT if "recipes/" in command else work
        done = run(command, cwd)
        text = done.stdout + done.stderr
        got = {" ".join(line.split()) for line in text.splitlines()}
        expected = shown(out)
        fails = any(line.startswith("error:") for line in expected)
        missing = [line for line in expected if line not in got]
        ok = not missing and (done.returncode == 2 if fails else done.returncode == 0)
        differ += not ok
        print(f"{'ok  ' if ok else 'DIFF'} [{'checkout' if cwd == CHECKOUT else 'elsewhere'}] "
              f"exit {done.returncode}: {command[:150]}", flush=True)
        for line in missing:
            print(f"      README shows: {line}")
        if missing or not ok:
            print("      got:\n" + "\n".join("        " + line for line in text.splitlines()[-12:]))
    for name in ("runs", "transfer-report", "loc", "kprof"):  # outputs written into the checkout
        if (CHECKOUT / name).exists() and args.keep is None:
            shutil.rmtree(CHECKOUT / name)
    if args.keep is None:
        shutil.rmtree(work)
    print(f"{differ} command(s) differ from README")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
