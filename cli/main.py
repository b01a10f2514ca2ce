"""The ``moepath`` command: assembles the commands and maps errors to one line.

Every library error (``moepath.tracer.errors.MoepathError``) and every OSError (a
path that cannot be read or written: a directory where a file goes, no
permission, a full disk) becomes one line on stderr and exit code 1;
``MOEPATH_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import typer

from moepath.tracer.errors import MoepathError

from . import (
    compare_cmd,
    demo_cmd,
    eval_cmd,
    merge_cmd,
    metrics_cmd,
    show_cmd,
    toy_cmd,
    trace_cmd,
)

app = typer.Typer(
    name="moepath",
    help="Trace Mixture-of-Experts routing inside vLLM and compute pathway metrics "
         "(arXiv 2506.21551).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for module in (trace_cmd, merge_cmd, metrics_cmd, show_cmd, compare_cmd, eval_cmd, demo_cmd,
               toy_cmd):
    module.register(app)


def main() -> None:
    # vLLM's INFO lines would bury the progress display; VLLM_LOGGING_LEVEL=INFO restores them
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        app()
    except (MoepathError, OSError) as exc:
        if os.environ.get("MOEPATH_DEBUG"):
            raise
        print(f"moepath: error: {_message(exc)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("moepath: interrupted; committed work is kept (re-run with --resume)",
              file=sys.stderr)
        sys.exit(130)


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
