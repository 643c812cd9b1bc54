"""Following a run log that another process writes (`optiscope.dashboards.follow`).

The follower is fed a file written in pieces (a line torn mid-write and completed later), a
corrupt line, a truncated and a replaced file, and a run directory that appears after it
started. ``watch(once=True)`` must draw what the live dashboard draws, and ``watch`` runs end to
end in a pseudo-terminal while the test writes the run log, until SIGINT.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from rich.console import Console

from optiscope.dashboards import follow
from optiscope.dashboards.console import ConsoleDashboard
from optiscope.dashboards.follow import RunLogFollower, watch
from optiscope.dashboards.sink import RecordDecoder
from optiscope.monitor.runlog import RUNLOG, read_records
from runs import NAN_TENSOR, train_run

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


@pytest.fixture(scope="module")
def run_lines(tmp_path_factory) -> list[bytes]:
    """The lines (newline included) of a real run's log: 12 AdamW steps, a NaN at the last."""
    run = train_run(tmp_path_factory.mktemp("run"), steps=STEPS, nan_at=STEPS)
    return (run / RUNLOG).read_bytes().splitlines(keepends=True)


def first_sample(lines: list[bytes]) -> int:
    """The index of the first sample line (after the meta and however many scope lists)."""
    return next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "sample")


def recorder(width: int = 120) -> Console:
    return Console(record=True, width=width, force_terminal=False, color_system=None,
                   file=io.StringIO())


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def types(records) -> list[str]:
    return [r["type"] for r in records]


# ----------------------------------------------------------------------------------- follower
def test_torn_line_waits_for_its_newline(tmp_path, run_lines):
    log = tmp_path / RUNLOG
    meta, scopes, sample = run_lines[0], run_lines[2], run_lines[first_sample(run_lines)]
    assert json.loads(sample)["type"] == "sample"
    follower = RunLogFollower(tmp_path)
    append(log, meta + scopes + sample[:50])
    first = follower.poll()
    assert types(first.records) == ["meta", "scopes"] and not first.restarted and first.found
    assert follower.poll().records == [], "nothing new: the torn line is not returned"
    append(log, sample[50:-1])
    assert follower.poll().records == [], "still no newline"
    append(log, b"\n")
    assert follower.poll().records == [json.loads(sample)]
    assert follower.corrupt == 0


def test_corrupt_line_is_skipped_and_counted(tmp_path, run_lines):
    log = tmp_path / RUNLOG
    follower = RunLogFollower(log)
    append(log, run_lines[0] + b'{"type": "sample", "st\n' + b"\n" + run_lines[2])
    update = follower.poll()
    assert types(update.records) == ["meta", "scopes"]
    assert follower.corrupt == 1


def _follower_after(tmp_path, run_lines, n: int) -> tuple[Path, RunLogFollower]:
    """The run log holding the first ``n`` lines, and a follower that has read them."""
    log = tmp_path / RUNLOG
    follower = RunLogFollower(tmp_path)
    append(log, b"".join(run_lines[:n]))
    assert len(follower.poll().records) == n
    return log, follower


def test_truncated_file_starts_over(tmp_path, run_lines):
    log, follower = _follower_after(tmp_path, run_lines, 4)
    with open(log, "wb") as f:  # same inode, cut and rewritten
        f.write(run_lines[0])
    update = follower.poll()
    assert update.restarted and types(update.records) == ["meta"]
    assert follower.restarts == 1


def test_replaced_file_starts_over(tmp_path, run_lines):
    log, follower = _follower_after(tmp_path, run_lines, 3)
    new = tmp_path / "new.jsonl"
    new.write_bytes(b"".join(run_lines[:5]))  # longer than what was read: only the inode tells
    os.replace(new, log)
    update = follower.poll()
    assert update.restarted and len(update.records) == 5
    assert not follower.poll().restarted


def test_torn_tail_cut_by_a_resumed_writer_is_not_a_restart(tmp_path, run_lines):
    log = tmp_path / RUNLOG
    follower = RunLogFollower(tmp_path)
    append(log, run_lines[0] + run_lines[1][:20])  # a crash tore the second line
    assert types(follower.poll().records) == ["meta"]
    os.truncate(log, len(run_lines[0]))  # what RunLogWriter(resume=True) does
    append(log, run_lines[2])
    update = follower.poll()
    assert not update.restarted and types(update.records) == ["scopes"]


def test_waits_for_a_run_directory_that_does_not_exist_yet(tmp_path, run_lines):
    run = tmp_path / "later" / "exp1"
    follower = RunLogFollower(run)
    assert follower.path == run / RUNLOG
    assert follower.poll() == ([], False, False, False)
    run.mkdir(parents=True)
    assert not follower.poll().found
    append(run / RUNLOG, run_lines[0])
    update = follower.poll()
    assert update.found and types(update.records) == ["meta"] and not update.restarted


def test_read_limit_returns_the_rest_with_more(tmp_path, run_lines):
    log = tmp_path / RUNLOG
    append(log, b"".join(run_lines))
    follower = RunLogFollower(log, chunk_bytes=4096)  # the meta line alone is longer
    polls, records = 0, []
    while True:
        update = follower.poll()
        polls += 1
        records += update.records
        if not update.more:
            break
    assert records == list(read_records(log)) and polls > 2


def test_polling_an_unchanged_file_does_not_open_it(tmp_path, run_lines, monkeypatch):
    log = tmp_path / RUNLOG
    append(log, b"".join(run_lines))
    follower = RunLogFollower(tmp_path)
    follower.poll()
    opened = []
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a))
    assert follower.poll() == ([], False, False, True) and opened == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="chunk_bytes must be an integer >= 1, got 0"):
        RunLogFollower(tmp_path, chunk_bytes=0)
    with pytest.raises(ValueError, match="poll_interval must be a number of seconds > 0, got 0"):
        watch(tmp_path, poll_interval=0)
    with pytest.raises(ValueError, match="timeout must be .* got -1"):
        watch(tmp_path, timeout=-1)


# ----------------------------------------------------------------------------------- watch
def test_watch_once_draws_what_the_live_dashboard_draws(tmp_path, run_lines):
    (tmp_path / RUNLOG).write_bytes(b"".join(run_lines))
    live = recorder()
    dashboard = ConsoleDashboard(live, live=True, title=str(tmp_path))
    RecordDecoder(dashboard).feed(read_records(tmp_path / RUNLOG))
    dashboard.close()

    once = recorder()
    assert watch(tmp_path, console=once, once=True) == 0
    text = once.export_text()
    assert text == live.export_text()
    assert f"optiscope · {tmp_path}" in text and NAN_TENSOR in text and "alerts · 1" in text


def test_watch_once_without_a_run_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"no run log at '{tmp_path / RUNLOG}'")
                       + ".*leave out once=True"):
        watch(tmp_path, console=recorder(), once=True)
    (tmp_path / RUNLOG).write_bytes(b'{"type": "meta", "optim')  # torn first line
    with pytest.raises(ValueError, match="holds no complete record yet"):
        watch(tmp_path, console=recorder(), once=True)


def test_watch_off_a_terminal_prints_lines_and_times_out(tmp_path, run_lines):
    console = recorder()
    assert watch(tmp_path / "missing", console=console, poll_interval=0.01, timeout=0.05) == 1
    text = console.export_text()
    assert text.startswith(f"waiting for {tmp_path / 'missing' / RUNLOG} ...")
    assert "no run log appeared" in text

    (tmp_path / RUNLOG).write_bytes(b"".join(run_lines))
    console = recorder()
    assert watch(tmp_path, console=console, poll_interval=0.01, timeout=0.1) == 0
    lines = console.export_text().splitlines()
    assert lines[0].startswith("AdamW (torch backend)")
    assert [line.split()[1] for line in lines if line.startswith("step ")] == \
        [str(s) for s in range(1, STEPS + 1)]
    assert sum(line.startswith("alert  ") for line in lines) == 1


def test_watch_starts_over_when_the_run_log_is_replaced(tmp_path, run_lines, monkeypatch):
    """Each of watch's sleeps between polls runs the next scripted change; the last is Ctrl-C."""
    log = tmp_path / RUNLOG
    replacement = tmp_path / "replacement.jsonl"
    replacement.write_bytes(b"".join(run_lines[:first_sample(run_lines) + 1]))  # its 1st sample
    script = [lambda: append(log, b"".join(run_lines)),
              lambda: None,
              lambda: os.replace(replacement, log),
              lambda: None]

    def sleep(seconds):
        if not script:
            raise KeyboardInterrupt
        script.pop(0)()

    monkeypatch.setattr(follow.time, "sleep", sleep)
    console = recorder()
    assert watch(tmp_path, console=console, poll_interval=0.01) == 0
    lines = console.export_text().splitlines()
    assert lines[0] == f"waiting for {log} ..."
    replaced = lines.index(f"{log} was replaced: following the new run")
    steps = [line.split()[1] for line in lines if line.startswith("step ")]
    assert steps == [str(s) for s in range(1, STEPS + 1)] + ["1"]
    assert lines[replaced + 1].startswith("AdamW (torch backend)"), "the new run is described"
    assert lines[replaced + 2].startswith("step 1  loss ") and "alerts" not in lines[replaced + 2]


# ----------------------------------------------------------------------------------- pty
_ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]"
                   rb"|\x1b[=>78]")


class PtyChild:
    """A Python child on a pseudo-terminal of a fixed size, its output read without blocking."""

    def __init__(self, code: str, *args: str, rows: int = 60, cols: int = 120):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {k: v for k, v in os.environ.items()
               if k not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE")}
        env.update(TERM="xterm-256color", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=slave,
                                     stdout=slave, stderr=slave, env=env, cwd=ROOT,
                                     start_new_session=True)
        os.close(slave)
        self.master = master
        self.output = b""

    def text(self) -> str:
        """Everything printed so far, escape sequences stripped."""
        return _ANSI.sub(b"", self.output).replace(b"\r", b"").decode("utf-8", "replace")

    def read_until(self, *needles: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while not all(n in self.text() for n in needles):
            if time.monotonic() > deadline or not self._read(deadline - time.monotonic()):
                missing = [n for n in needles if n not in self.text()]
                raise AssertionError(f"{missing} never appeared; the terminal showed:\n"
                                     f"{self.text()[-3000:]}")
        return self.text()

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], max(0.0, min(timeout, 0.5)))
        if not ready:
            return self.proc.poll() is None
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.output += data
        return bool(data)

    def finish(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self._read(deadline - time.monotonic()) and time.monotonic() < deadline:
            pass
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.mark.skipif(not hasattr(pty, "openpty"), reason="needs a pseudo-terminal")
def test_watch_in_a_terminal_follows_a_growing_run_until_sigint(tmp_path, run_lines):
    run = tmp_path / "exp1"  # does not exist yet
    child = PtyChild("import sys\nfrom optiscope.dashboards.follow import watch\n"
                     "sys.exit(watch(sys.argv[1], poll_interval=0.05))", str(run))
    try:
        child.read_until(f"waiting for {run / RUNLOG} ...")
        run.mkdir()
        samples = [i for i, line in enumerate(run_lines) if b'"sample"' in line]
        head, rest = run_lines[: samples[2]], run_lines[samples[2]:]
        torn = rest[0]
        append(run / RUNLOG, b"".join(head) + torn[: len(torn) // 2])
        shown = child.read_until("AdamW (torch backend)", "head.weight", "step 2 ")
        assert "step 3 " not in shown, "the torn third sample was drawn"

        append(run / RUNLOG, torn[len(torn) // 2:] + b"".join(rest[1:]))
        # A frame reaches the terminal in several reads: wait for every part the test judges,
        # not for the first ones and then judge a half-drawn frame.
        child.read_until(f"step {STEPS} ", "alerts · 1", f"{NAN_TENSOR} (1 inf/NaN)",
                         "non-finite gradient entries in 1 tensor(s)", "1.00× AdamW fp32",
                         "… 9 more layers")

        child.proc.send_signal(signal.SIGINT)
        assert child.finish() == 0
        assert "Traceback" not in child.text() and "KeyboardInterrupt" not in child.text()
    finally:
        child.close()


def test_names_with_rich_markup_are_drawn_literally(tmp_path, capsys):
    """A scalar, tensor or state-key name is the user's text, not rich markup: ``optiscope watch
    --once`` draws "[/]loss" as it is instead of failing on a closing tag with nothing to close."""
    import torch

    from optiscope import OptimizerMonitor
    from optiscope.cli import main

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("[bold]enc[/bold]", torch.nn.Linear(4, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with OptimizerMonitor(opt, model=model, log_dir=tmp_path, console=False, tensorboard=False,
                          report=False) as mon:
        for _ in range(3):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    # log_scalar refuses such names; a run log written by something else may still hold them
    lines = (tmp_path / "runlog.jsonl").read_text().splitlines()
    ids = [r["id"] for r in map(json.loads, lines)
           if r.get("type") == "scopes" and r["names"] == ["global"]]
    with open(tmp_path / "runlog.jsonl", "a") as f:
        f.write(json.dumps({"type": "sample", "step": 3, "values": {
            "[/]loss": [ids[0], [1.5]], "[red]acc[/red]": [ids[0], [0.25]]}}) + "\n")
    capsys.readouterr()
    assert main(["watch", str(tmp_path), "--once"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\[/\]loss +1\.5 ", out), out
    assert re.search(r"\[red\]acc\[/red\] +0\.25 ", out), out
    assert "[bold]enc[/bold].bias" in out, out
