"""
What a stage shows while it waits on its jobs: a line per unfinished run — iteration / max_iter,
loss and ETA while it trains, ``evaluating i/N`` while it is evaluated — and how many of the
stage's runs are done.

Everything is read from the run directories, so it works the same for local processes and Slurm
jobs on other machines (a shared file system): the training writes ``progress.json`` in its run
directory every few seconds (``pipeline.runs.train.ProgressFile``, a detectron2 hook), the
evaluation one in its evaluation directory (``pipeline.runs.evaluate.TimedModel``). On a terminal
the lines are a live ``rich`` table redrawn in place; otherwise (CI, Slurm logs, ``dvc repro``
piped) plain lines are printed at a lower rate.
"""
import datetime
import json
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from pipeline.runs.spec import DONE_FILE, METRICS_FILE, RunSpec, eval_dir

PROGRESS_FILE = "progress.json"  # in a run directory (training) and in an evaluation directory


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not there yet, or being replaced
        return None


def _eta(seconds: Optional[float]) -> str:
    return "ETA ?" if seconds is None else f"ETA {datetime.timedelta(seconds=round(seconds))}"


def run_status(run_dir: Path, eval_dirs: Sequence[Path]) -> Tuple[bool, str]:
    """(done, one line) for a run that trains in ``run_dir`` and is evaluated into ``eval_dirs``."""
    run_dir = Path(run_dir)
    pending = [d for d in map(Path, eval_dirs) if not (d / METRICS_FILE).is_file()]
    if not pending:
        return True, "done"
    if (run_dir / DONE_FILE).is_file():
        for i, d in enumerate(pending):
            state = _read(d / PROGRESS_FILE)
            if state:
                n = f" ({i + 1} of {len(pending)} evaluations)" if len(pending) > 1 else ""
                return False, f"evaluating {state['evaluating']}/{state['of']}{n}"
        return False, "trained; evaluation starting"
    state = _read(run_dir / PROGRESS_FILE)
    if not state:
        return False, "waiting to start"
    loss = "loss ?" if state.get("loss") is None else f"loss {state['loss']:.4g}"
    return False, f"iter {state['iter']}/{state['max_iter']}  {loss}  {_eta(state.get('eta_s'))}"


def render(jobs: Sequence[Tuple[str, Path, Sequence[Path]]]) -> List[str]:
    """The lines to show for ``jobs`` (name, run directory, evaluation directories): the count of
    runs done, then one line per run not done."""
    states = [(name, *run_status(run_dir, evals)) for name, run_dir, evals in jobs]
    lines = [f"{sum(done for _, done, _ in states)}/{len(states)} runs done"]
    lines += [f"  {name}: {line}" for name, done, line in states if not done]
    return lines


class StageProgress:
    """
    The display of a stage's jobs: call :meth:`update` as often as convenient while waiting and
    :meth:`close` at the end. On a terminal a ``rich`` live view refreshed at most every
    ``tty_every`` seconds; otherwise plain lines every ``plain_every`` seconds.
    """

    def __init__(self, requests: Sequence[Tuple[Path, List[RunSpec]]], tty_every: float = 2.0,
                 plain_every: float = 60.0, console=None):
        from rich.console import Console

        self.jobs = [(f"{specs[0].ablation} seed{specs[0].seed}", Path(d), [eval_dir(d, s) for s in specs])
                     for d, specs in requests]
        self.console = console or Console()
        self.every = tty_every if self.console.is_terminal else plain_every
        self._last: Optional[float] = None
        self._live = None

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self._last is not None and now - self._last < self.every:
            return
        self._last = now
        lines = render(self.jobs)
        if self.console.is_terminal:
            from rich.live import Live
            from rich.text import Text

            text = Text("\n".join(lines))
            if self._live is None:
                self._live = Live(text, console=self.console, auto_refresh=False, transient=False)
                self._live.start()
            self._live.update(text, refresh=True)
        else:
            stamp = time.strftime("%H:%M:%S")
            for line in lines:
                self.console.print(f"[{stamp} progress] {line}", markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        self.update(force=True)
        if self._live is not None:
            self._live.stop()
            self._live = None
