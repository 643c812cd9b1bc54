"""The ``optiscope`` command: help with examples, one-line errors, and the demo / compare / report /
tensorboard commands end to end (the demo also under a real pseudo-terminal)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optiscope import load_run
from optiscope.cli import main

COMMANDS = ["demo", "compare", "watch", "report", "tensorboard", "export", "bench"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\x1b[=>]")
ROOT = Path(__file__).resolve().parents[1]
SAMPLED = sorted({*range(1, 25, 3), 6, 24})  # the demo below: every=3, freeze_probe=6, 24 steps


def _run(*argv: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``optiscope argv`` in a child process with stdout and stderr captured (not a terminal)."""
    env = dict(os.environ, COLUMNS="120", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "optiscope.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"optiscope {command}" in out.split("examples:")[1]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def _one_line_error(capsys, argv: list[str], code: int, *expected: str) -> str:
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    err = capsys.readouterr().err.strip()
    assert status == code, err
    assert "\n" not in err and "Traceback" not in err, err
    for text in expected:
        assert text in err
    return err


def test_bad_input_is_one_line_with_the_reason(tmp_path, capsys):
    missing = tmp_path / "nope"
    _one_line_error(capsys, ["report", str(missing)], 1, str(missing), "does not exist")
    _one_line_error(capsys, ["watch", str(missing), "--once"], 1, str(missing))
    _one_line_error(capsys, ["tensorboard", str(missing)], 1, str(missing))
    _one_line_error(capsys, ["demo", "--optimizer", "adamm"], 1, "'adamm'", "adamw")
    _one_line_error(capsys, ["compare", "--optimizers", "adamw,lion"], 1, "'lion'")
    _one_line_error(capsys, ["demo", "--steps", "0"], 2, "--steps")
    _one_line_error(capsys, ["demo", "--steps", "many"], 2, "'many'")
    _one_line_error(capsys, ["dmeo"], 2, "dmeo")
    _one_line_error(capsys, ["watch", str(tmp_path), "--sort-by", "loss"], 1, "'loss'")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "runlog.jsonl").write_text("")
    _one_line_error(capsys, ["report", str(empty)], 1, "no samples")
    (empty / "runlog.jsonl").write_text(json.dumps({"type": "meta", "optimizer": "x"}) + "\n")
    _one_line_error(capsys, ["report", str(empty)], 1, "no samples")
    _one_line_error(capsys, ["watch", str(empty), "--once"], 1, "no samples")
    not_a_run = tmp_path / "plain"
    not_a_run.mkdir()
    _one_line_error(capsys, ["report", str(not_a_run)], 1, "runlog.jsonl")


def test_a_bug_keeps_its_traceback_and_debug_shows_every_one(tmp_path, monkeypatch, capsys):
    """Only the errors about the user's input are one line: an error that is not (here a
    ValueError from inside the report writer) propagates with its traceback, and ``--debug``
    raises the user's-input errors too, before or after the command."""
    from optiscope.dashboards import report

    from runs import train_run

    run_dir = train_run(tmp_path / "run", steps=2)

    def broken(*args, **kwargs):
        raise ValueError("a bug in the report writer")

    monkeypatch.setattr(report, "write_report", broken)
    with pytest.raises(ValueError, match="a bug in the report writer"):
        main(["report", str(run_dir), "--no-png"])
    missing = tmp_path / "nope"
    for argv in (["--debug", "report", str(missing)], ["report", str(missing), "--debug"]):
        with pytest.raises(Exception, match="does not exist") as raised:
            main(argv)
        assert not isinstance(raised.value, SystemExit)
    _one_line_error(capsys, ["report", str(missing)], 1, "does not exist")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``optiscope demo`` with stdout redirected: a short run, plain lines."""
    root = tmp_path_factory.mktemp("demo")
    proc = _run("demo", "--steps", "24", "--every", "3", "--out", str(root / "run"), cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "run", proc


def test_demo_leaves_a_complete_run_directory(demo_run):
    run_dir, proc = demo_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"runlog.jsonl", "meta.json", "report.html", "trends.png"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    run = load_run(run_dir)
    steps, loss = run.series("loss")
    assert list(steps) == SAMPLED  # every=3, the freeze probe's step and the last step
    assert loss[-1] < loss[0], "the model learns"
    assert run.meta["optimizer_name"] == "AdamW"
    assert run.meta["freeze_probe"] == 6
    assert "blocks.0.qkv.weight" in run.scopes("grad_norm")
    assert "val_loss" in run.metrics()


def test_demo_off_a_terminal_prints_one_plain_line_per_sample(demo_run):
    run_dir, proc = demo_run
    assert not ANSI.search(proc.stdout), "no escape codes when stdout is not a terminal"
    steps = [int(m) for m in re.findall(r"^\s*step\s+(\d+)", proc.stdout, re.M)]
    assert steps == SAMPLED, proc.stdout
    assert "report.html" in proc.stdout


def test_demo_under_a_terminal_shows_the_live_dashboard(tmp_path):
    """A real pseudo-terminal: the live view (header, layer table, memory) is drawn in place."""
    env = dict(os.environ, COLUMNS="140", LINES="60", TERM="xterm-256color",
               PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "optiscope.cli", "demo", "--steps", "40",
                             "--every", "2", "--out", str(tmp_path / "run")],
                            stdin=follower, stdout=follower, stderr=follower, env=env,
                            cwd=tmp_path, close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 240
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(leader)
    raw = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, raw[-3000:]
    assert "\x1b[" in raw, "a terminal gets the live view, drawn with escape codes"
    text = ANSI.sub("", raw)
    for expected in ("AdamW", "blocks.0.qkv.weight", "grad", "AdamW fp32", "report.html"):
        assert expected in text, expected
    # Drawn in place: the cursor moves up to redraw; plain lines never do.
    assert re.search(r"\x1b\[\d*A", raw)


def test_compare_overlays_the_optimizers_in_one_report(tmp_path):
    proc = _run("compare", "--optimizers", "adamw,adafactor", "--steps", "12", "--every", "4",
                "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "cmp"
    for name in ("adamw", "adafactor"):
        assert (out / name / "runlog.jsonl").exists()
    html = (out / "report.html").read_text()
    assert "adamw" in html and "adafactor" in html
    assert (out / "trends.png").stat().st_size > 10_000
    state = {n: load_run(out / n).series("state_bytes")[1][-1] for n in ("adamw", "adafactor")}
    assert state["adafactor"] < state["adamw"] / 2, state
    assert "bytes/param" in proc.stdout


def test_report_and_tensorboard_commands_rebuild_from_the_run_log(demo_run, tmp_path, capsys):
    run_dir, _ = demo_run
    assert main(["report", str(run_dir), str(run_dir), "--names", "a,b",
                 "-o", str(tmp_path / "two.html")]) == 0
    assert (tmp_path / "two.html").stat().st_size > 1_000_000
    assert (tmp_path / "two.png").exists()
    _one_line_error(capsys, ["report", str(run_dir), "--names", "a,b"], 1, "2 names for 1 runs")
    assert main(["tensorboard", str(run_dir), "--out", str(tmp_path / "tb")]) == 0
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
