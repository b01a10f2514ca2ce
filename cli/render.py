"""The output layer: Rich tables and progress on stderr, data (JSON, tables) on stdout."""

from __future__ import annotations

import json
import shlex
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

stdout = Console()
stderr = Console(stderr=True)


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr, printed as is (no markup, no wrapping)."""
    stderr.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


def skipped_lines(sample_set) -> None:
    """With ``--skip-bad-lines``: how many lines (Parquet: rows) of the samples file were
    skipped, and the first, on stderr."""
    if sample_set.skipped_lines:
        unit = "row" if sample_set.format == "parquet" else "line"
        stderr.print(f"skipped {len(sample_set.skipped_lines)} bad {unit}(s) "
                     f"(first: {unit} {sample_set.skipped_lines[0]})")


def print_json(data) -> None:
    """Exactly one JSON object on stdout (pipe-friendly)."""
    sys.stdout.write(json.dumps(data, indent=2, default=_default) + "\n")


def _default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    """A table whose first column names the rows (group, sample, step), left-aligned, and
    whose other columns are right-aligned.

    The names are never cut short: on a narrow terminal a name wraps, by characters where
    it has no spaces (with Rich's default ellipsis ``moepath_arith_a`` and
    ``moepath_arith_b`` both read ``moepath_…``). Rich narrows the widest column first,
    so the values keep their width; a value cut short ends in an ellipsis, never folds
    into what would read as two values."""
    result = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        result.add_column(column, justify="left" if i == 0 else "right",
                          overflow="fold" if i == 0 else "ellipsis")
    for row in rows:
        result.add_row(*[fmt(v) for v in row])
    return result


def fmt(value, digits: int = 4) -> str:
    """A number for a table: ``digits`` significant digits, or whole with thousands
    separators from 10,000 on (no exponent)."""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


class SampleProgress:
    """A Rich progress bar of samples with samples/s, prompt tokens/s and ETA, on stderr.

    ``start(total, done)`` once the engine is up (``done``: resumed samples);
    ``advance(samples, tokens)`` with the counts of this run so far (prompt tokens).
    """

    def __init__(self, description: str = "tracing"):
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=stderr)
        self._task = self._progress.add_task(description, total=None, rate="")
        self._done_before = 0
        self._started = time.perf_counter()

    def begin(self, description: str) -> None:
        """Start over for the next unit of work (e.g. the next checkpoint)."""
        self._progress.reset(self._task, total=None, description=description, rate="")

    def start(self, total: int, done: int) -> None:
        if done:
            stderr.print(f"resuming: {done} sample(s) already traced")
        self._done_before, self._started = done, time.perf_counter()
        self._progress.update(self._task, total=total, completed=done)

    def advance(self, samples: int, tokens: int) -> None:
        seconds = max(time.perf_counter() - self._started, 1e-9)
        self._progress.update(
            self._task, completed=self._done_before + samples,
            rate=f"{samples / seconds:.1f} samples/s {tokens / seconds:,.0f} prompt tok/s")

    def __enter__(self) -> SampleProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()


class CompareProgress:
    """``moepath compare``'s progress on stderr: skipped lines, the plan, one line per
    checkpoint and a :class:`SampleProgress` bar while tracing. Implements every method of
    ``patches.comparison.CompareProgress`` (not imported: this module loads no library)."""

    _ACTIONS = {"skip": "complete, skipped", "start": "starting engine",
                "reload": "reloading weights in place",
                "spread": "{parts} part(s) over the cluster's engines"}

    def __init__(self) -> None:
        self._bar: SampleProgress | None = None

    def samples_read(self, sample_set) -> None:
        skipped_lines(sample_set)

    def plan(self, plan) -> None:
        shape = plan.shape
        stderr.print(table(
            f"{len(plan.checkpoints)} checkpoints ({shape.architecture}, {shape.num_experts} "
            f"experts, top-{shape.top_k}), {plan.num_samples} samples",
            ["#", "checkpoint", "step"],
            [[i + 1, c.name, plan.steps[c.name]] for i, c in enumerate(plan.checkpoints)]))

    def tracing(self) -> SampleProgress:
        self._bar = SampleProgress()
        return self._bar

    def checkpoint(self, event) -> None:
        stderr.print(f"[bold]checkpoint {event.index + 1}/{event.total}[/] {event.name}: "
                     f"{self._ACTIONS[event.action].format(parts=event.parts)}")
        if event.action != "skip":  # one bar for every checkpoint on a cluster
            self._bar.begin("all checkpoints" if event.action == "spread" else event.name)

    def start(self, total: int, done: int) -> None:
        self._bar.start(total, done)

    def advance(self, samples: int, tokens: int) -> None:
        self._bar.advance(samples, tokens)


def compare_summary(result) -> None:
    """Terminal summary of a ``patches.comparison.CompareResult``: the trajectory of the first
    group (``all`` unless --memorised-only) and the correlations, one row per group, on
    stdout; notes and the files written on stderr (report.md has every group's table)."""
    from ..tracer.compare import ALL
    from ..tracer.correlation import TABLE1_ROWS

    analysis = result.analysis
    metrics = analysis.metrics
    group = ALL if (metrics["group"] == ALL).any() else metrics["group"].iloc[0]
    wide = metrics[metrics["group"] == group].pivot(index="step", columns="metric",
                                                    values="value").reset_index()
    columns = [c for c in ("n_samples", *TABLE1_ROWS) if c in wide.columns]
    stdout.print(table(f"metrics of group '{group}' by checkpoint",
                       ["step", *columns], wide[["step", *columns]].values.tolist()))
    if analysis.table1 is not None:
        by_group = analysis.table1.T  # rows: groups; columns: metrics
        stdout.print(table(
            "correlation with scores (pearson / spearman; too small: not a finding)",
            ["group", *map(str, by_group.columns)],
            [[group, *values] for group, values in zip(by_group.index, by_group.values.tolist(),
                                                        strict=True)]))
        _verdicts(analysis.correlations, TABLE1_ROWS)
    for note in analysis.notes:
        stderr.print(f"note: {note}")
    stderr.print(f"wrote into {result.out}: {', '.join(path.name for path in result.files)} "
                 f"(report.md has every group)")


def _verdicts(correlations, metrics) -> None:
    """The verdicts of the correlations of ``metrics`` that are not too small (the others'
    are "cannot tell", in report.md); a line saying so when none is left."""
    shown = correlations[correlations["metric"].isin(list(metrics))
                         & correlations["too_small"].isna() & correlations["note"].isna()]
    if shown.empty:
        stdout.print("verdict: cannot tell: no correlation has enough checkpoints and samples "
                     "to be a finding (report.md gives each one's verdict)", markup=False,
                     highlight=False, soft_wrap=True)
        return
    lines = [f"  {r.group} / {r.metric} (pearson {r.pearson:.3f}): {r.verdict}"
             for r in shown.itertuples()]  # lines, not a table: a verdict is never cut short
    stdout.print("\n".join(["verdicts against a null that keeps the metric's trend:", *lines]),
                 markup=False, highlight=False, soft_wrap=True)


class WatchView:
    """``moepath watch``'s view on stderr: one line per checkpoint state change and report
    update (also in a log file), and on a terminal a live table of every checkpoint with
    the bar of the one being traced. Implements ``patches.watch.WatchProgress``."""

    _STYLE = {"waiting": "yellow", "tracing": "cyan", "done": "green", "failed": "red"}
    _ACTIONS = {"skip": "complete, skipped", "start": "starting engine",
                "reload": "reloading weights in place",
                "spread": "{parts} part(s) over the cluster's engines"}

    def __init__(self) -> None:
        from rich.live import Live

        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=stderr)
        self._task = None
        self._started = time.perf_counter()
        self._seen: dict[str, str] = {}
        self._status = None
        self._live = (Live(console=stderr, refresh_per_second=2, get_renderable=self._render)
                      if stderr.is_terminal else None)

    def __enter__(self) -> WatchView:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()

    def samples_read(self, sample_set) -> None:
        skipped_lines(sample_set)

    def status(self, status) -> None:
        self._status = status
        for name, entry in status.checkpoints.items():
            shown = f"{entry.state}{' (deleted)' if entry.deleted else ''}"
            if self._seen.get(name) != shown:
                self._seen[name] = shown
                reason = f": {entry.reason}" if entry.state == "failed" and entry.reason else ""
                stderr.print(f"{name} (step {entry.step}): {shown}{reason}", markup=False,
                             highlight=False, soft_wrap=True)

    def tracing(self, name: str, step: int):
        from contextlib import contextmanager

        @contextmanager
        def bar():
            self._task = self._bar.add_task(f"{name}", total=None, rate="")
            try:
                yield
            finally:
                self._bar.remove_task(self._task)
                self._task = None

        return bar()

    def checkpoint(self, name: str, action: str) -> None:
        stderr.print(f"{name}: {self._ACTIONS[action]}", markup=False, highlight=False)

    def start(self, total: int, done: int) -> None:
        if done:
            stderr.print(f"resuming: {done} sample(s) already traced")
        self._started = time.perf_counter()
        self._bar.update(self._task, total=total, completed=done)
        self._done = done

    def advance(self, samples: int, tokens: int) -> None:
        seconds = max(time.perf_counter() - self._started, 1e-9)
        self._bar.update(self._task, completed=self._done + samples,
                         rate=f"{samples / seconds:.1f} samples/s")

    def updated(self, analysis, files) -> None:
        count = analysis.metrics["checkpoint"].nunique()
        stderr.print(f"updated metrics, report and plots over {count} checkpoint(s) "
                     f"({files[-1]})", markup=False, highlight=False, soft_wrap=True)

    def warning(self, message: str) -> None:
        warn(message)

    def tracker(self, name: str, failure) -> None:
        if failure is None:
            stderr.print(f"tracker {name} works again: every value it lacked is stored",
                         markup=False, highlight=False, soft_wrap=True)
        else:
            warn(f"{failure.describe()}; fix that (space, permissions): the watch goes on, "
                 f"and its next update, or the next watch, sends them once")

    def _render(self):
        from rich.console import Group

        rows = [] if self._status is None else [
            [name, entry.step, f"[{self._STYLE[entry.state]}]{entry.state}[/]"
             + (" (deleted)" if entry.deleted else ""), entry.reason or ""]
            for name, entry in sorted(self._status.checkpoints.items(),
                                      key=lambda item: (item[1].step or 0, item[0]))]
        view = Table(title="moepath watch", title_justify="left")
        for column in ("checkpoint", "step", "state", "why"):
            view.add_column(column, overflow="fold")
        for row in rows:
            view.add_row(*map(str, row))
        failing = [] if self._status is None else [
            f"[red]tracker {name} failing[/] since {entry['since']}: {escape(entry['error'])}; "
            f"{entry['unsent']} value(s) unsent"
            for name, entry in self._status.trackers.items() if entry.get("error")]
        parts = [view, *map(Text.from_markup, failing)]
        return Group(*parts, self._bar) if self._task is not None else Group(*parts)


def watch_summary(result) -> None:
    """How a ``patches.watch.WatchResult`` ended, on stderr: counts by state, failing
    trackers and where."""
    states = [entry.state for entry in result.status.checkpoints.values()]
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("done", "waiting", "failed")
                       if s in states) or "no checkpoint yet"
    failing = "".join(f"; tracker {name} failing ({entry['unsent']} value(s) unsent)"
                      for name, entry in result.status.trackers.items() if entry["error"])
    stderr.print(f"watch {result.status.state}: {counts}; traced now: "
                 f"{', '.join(result.traced) or 'none'}{failing}; status in "
                 f"{result.out / 'status.json'}", markup=False, highlight=False, soft_wrap=True)


def command_line() -> str:
    """This process's ``moepath`` command line, shell-quoted (for reports)."""
    return "moepath " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def human_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"
