"""The ``moepath`` entry point: what Ctrl-C tells the user, per command."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from moepath.cli.main import interrupted_message, main


@pytest.mark.parametrize(("args", "expected"), [
    (["trace", "model", "--out", "t"], "moepath: interrupted; committed samples are kept; "
                                       "re-run with --resume to finish the trace"),
    (["compare", "c1", "c2"], "moepath: interrupted; finished checkpoint traces and committed "
                              "samples are kept; re-run the same command to continue"),
    (["demo"], "moepath: interrupted; a trained testbed, finished checkpoint traces and "
               "committed samples are kept; re-run the same command to continue"),
    (["eval", "model"], "moepath: interrupted; the requests traced so far are kept in a trace "
                        "marked failed (no scores); an eval cannot be resumed: re-run with "
                        "--force to start it over"),
    (["merge", "p0", "p1"], "moepath: interrupted; the parts are untouched; re-run with --force "
                            "to start the merge over"),
    (["metrics", "t", "--json"], "moepath: interrupted"),
    ([], "moepath: interrupted"),
])
def test_ctrl_c_says_what_the_command_kept_and_how_to_continue(args, expected):
    assert interrupted_message(args) == expected


def open_for_writing_once_read(fifo, timeout_s: float = 60) -> int:
    """Open ``fifo`` for writing as soon as a reader has opened it (raises after timeout_s)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.time() > deadline:
                raise
            time.sleep(0.05)


def test_sigint_to_moepath_trace_exits_130_telling_to_resume(tmp_path):
    """A real Ctrl-C, delivered while ``moepath trace`` waits for its samples (a FIFO)."""
    samples = tmp_path / "s.jsonl"
    os.mkfifo(samples)
    process = subprocess.Popen(
        [sys.executable, "-m", "moepath.cli.main", "trace", str(tmp_path / "model"),
         "--samples", str(samples), "--out", str(tmp_path / "out")],
        stderr=subprocess.PIPE, text=True,
        # as in a terminal: a shell's background job (CI) would pass SIGINT on ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    writer = open_for_writing_once_read(samples)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        # the signal went to another thread (pyarrow's); end of file wakes the main one,
        # which then raises the KeyboardInterrupt
        os.close(writer)
        writer = None
        _, stderr = process.communicate(timeout=60)
    finally:
        if writer is not None:
            os.close(writer)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == interrupted_message(["trace"])


def test_a_w_and_b_service_inherited_from_the_parent_is_not_joined(monkeypatch):
    """moepath's W&B run lives in a service of its own: one inherited from a training script
    would keep the run of a killed moepath open, and refuse its restart ("is in use")."""
    monkeypatch.setenv("WANDB_SERVICE", "3-12345-tcp-localhost-40000")
    monkeypatch.setattr(sys, "argv", ["moepath", "--help"])
    with pytest.raises(SystemExit):
        main()
    assert "WANDB_SERVICE" not in os.environ
