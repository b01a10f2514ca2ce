"""The ``moepath`` command: assembles the commands and maps errors to one line.

Every library error (``moepath.tracer.errors.MoepathError``) and every OSError (a
path that cannot be read or written: a directory where a file goes, no
permission, a full disk) becomes one line on stderr and exit code 1;
``MOEPATH_DEBUG=1`` shows the traceback instead. Ctrl-C exits with code 130 and
one line saying what the interrupted command kept and how to continue.
"""

from __future__ import annotations

import os
import sys

import typer

from ..tracer.errors import MoepathError
from . import (
    compare_cmd,
    demo_cmd,
    eval_cmd,
    merge_cmd,
    metrics_cmd,
    show_cmd,
    toy_cmd,
    trace_cmd,
    watch_cmd,
)

app = typer.Typer(
    name="moepath",
    help="Trace Mixture-of-Experts routing inside vLLM and compute pathway metrics.\n\n"
         "The metrics are those of arXiv 2506.21551.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for module in (trace_cmd, merge_cmd, metrics_cmd, show_cmd, compare_cmd, watch_cmd, eval_cmd,
               demo_cmd, toy_cmd):
    module.register(app)


def main() -> None:
    # vLLM's INFO lines would bury the progress display; VLLM_LOGGING_LEVEL=INFO restores them
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # A parent that uses W&B (a training script starting `moepath watch`) passes its service
    # in WANDB_SERVICE. moepath's run must not live in it: killed, moepath would leave its
    # run open there, and every restart would fail with "run ID ... is in use".
    os.environ.pop("WANDB_SERVICE", None)
    try:
        app()
    except (MoepathError, OSError) as exc:
        if os.environ.get("MOEPATH_DEBUG"):
            raise
        print(f"moepath: error: {_message(exc)}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, SystemExit) as exc:
        if not _is_ctrl_c(exc):
            raise
        print(interrupted_message(sys.argv[1:]), file=sys.stderr)
        sys.exit(130)


def _is_ctrl_c(exc: BaseException) -> bool:
    """True for a KeyboardInterrupt, or an exit it caused: Typer turns Ctrl-C into a silent
    ``SystemExit(130)`` raised while handling the KeyboardInterrupt."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# What an interrupted command leaves, and how to continue it; commands that leave
# nothing to continue from (metrics, show, toy-model) have no entry.
_ON_INTERRUPT = {
    "trace": "committed samples are kept; re-run with --resume to finish the trace",
    "compare": "finished checkpoint traces and committed samples are kept; re-run the same "
               "command to continue",
    "watch": "traced checkpoints and committed samples are kept, status.json says what is "
             "done; re-run the same command to continue",
    "demo": "a trained testbed, finished checkpoint traces and committed samples are kept; "
            "re-run the same command to continue",
    "eval": "the requests traced so far are kept in a trace marked failed (no scores); an "
            "eval cannot be resumed: re-run with --force to start it over",
    "merge": "the parts are untouched; re-run with --force to start the merge over",
}


def interrupted_message(args: list[str]) -> str:
    """The line printed on Ctrl-C, for the command that ``args`` (argv without the program)
    names: ``interrupted_message(["trace", "m", "--resume"])`` tells to re-run with --resume."""
    command = next((arg for arg in args if not arg.startswith("-")), None)
    hint = _ON_INTERRUPT.get(command)
    return f"moepath: interrupted; {hint}" if hint else "moepath: interrupted"


def _message(exc: MoepathError | OSError) -> str:
    """The error's line: a library error's own message, or an OSError's path(s) and reason."""
    paths = [f"'{p}'" for p in (getattr(exc, "filename", None), getattr(exc, "filename2", None))
             if p is not None]
    if not paths:
        return str(exc)
    return (f"{' -> '.join(paths)}: {exc.strerror or exc}; check the path, and that it may be "
            "read or written")


if __name__ == "__main__":
    main()
