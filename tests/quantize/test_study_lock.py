"""One process at a time per out dir (issue 7, defect 3: two runs on one out dir).

A child process holds the study lock; the CLI in this process is refused with one line
naming it (pid, command, start time), exit 2, having changed nothing in the out dir. A
lock left by a SIGKILLed process is recovered. ``tuneqn report`` works while the lock is
held. ORT's temporary ``<model>-inferred.onnx`` never lands next to the shared model.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import write_study

from tuneqn.controller.cli import main

HOLDER = """
import sys
from pathlib import Path
from tuneqn.controller.config import load_config
from tuneqn.controller.study import Study

study = Study(load_config(Path(sys.argv[1])), command="holder-of-the-lock")
print("locked", flush=True)
if sys.stdin.readline().strip() == "analyze":
    study.prepare()
    study.analyze_all()
study.close()
print("closed", flush=True)
"""


class Holder:
    """A child process that opens the Study (taking its lock) and waits for a line on stdin."""

    def __init__(self, study_toml: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(study_toml)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.expect("locked")

    def expect(self, word: str, timeout: float = 120.0) -> None:
        """Wait (with a deadline) until the child prints ``word``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], deadline - time.monotonic())
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.strip() == word:
                return
        self.proc.kill()
        _, err = self.proc.communicate()
        pytest.fail(f"holder never printed {word!r}: {err[-2000:]}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, line: str = "") -> int:
        self.send(line)
        return self.proc.wait(timeout=300)


@pytest.fixture
def holder_factory() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for h in made:
        if h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait()


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_mtime_ns, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], holder: Holder) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"pid {holder.proc.pid}" in err and "holder-of-the-lock" in err and "started" in err, err
    return err


@pytest.mark.heavy
def test_second_run_is_refused_before_touching_anything(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], holder_factory: list[Holder]
) -> None:
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images")
    out = tmp_path / "out"
    assert main(["analyze", str(study)]) == 0
    holder = Holder(study)
    holder_factory.append(holder)
    before = _snapshot(out)
    for argv in (["analyze", str(study), "--fresh", "--candidates"], ["tune", str(study), "--fresh"]):
        _refused(capsys, argv, holder)
        assert _snapshot(out) == before, argv
    # export only reads (no lock): it answers while the study is in use (here: nothing was built yet)
    assert main(["export", str(out), "--candidate", "0", "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "--candidate" in err and "in use" not in err, err
    assert not (out / "agents").exists()  # tune started no local agent
    assert not (tmp_path / "x.onnx").exists()
    assert holder.finish() == 0
    assert main(["analyze", str(study), "--candidates"]) == 0


@pytest.mark.heavy
def test_first_run_finishes_unharmed(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], holder_factory: list[Holder]
) -> None:
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images")
    holder = Holder(study)  # the first run: holds the lock on a fresh out dir, then analyzes
    holder_factory.append(holder)
    _refused(capsys, ["analyze", str(study), "--fresh"], holder)
    assert holder.finish("analyze") == 0
    assert (tmp_path / "out" / "layers.json").is_file()
    assert main(["report", str(tmp_path / "out")]) == 0


@pytest.mark.heavy
def test_lock_of_a_killed_process_is_recovered(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], holder_factory: list[Holder]
) -> None:
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images")
    holder = Holder(study)
    holder_factory.append(holder)
    _refused(capsys, ["analyze", str(study)], holder)
    os.kill(holder.proc.pid, signal.SIGKILL)
    holder.proc.wait(timeout=60)
    assert (tmp_path / "out" / "tuneqn.lock").exists()  # left behind, but no longer locked
    assert main(["analyze", str(study)]) == 0


@pytest.mark.heavy
def test_report_works_while_a_run_holds_the_lock(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], holder_factory: list[Holder]
) -> None:
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images")
    assert main(["analyze", str(study)]) == 0
    holder = Holder(study)
    holder_factory.append(holder)
    capsys.readouterr()
    assert main(["report", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.json").is_file()
    assert holder.finish() == 0


def test_lock_in_process(tmp_path: Path, assets: Path) -> None:
    """A second Study on the same out dir is refused in the same process too; close() releases."""
    from tuneqn.controller.common.errors import UserError
    from tuneqn.controller.config import load_config
    from tuneqn.controller.study import Study, StudyBusy

    cfg = load_config(write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images"))
    with Study(cfg, command="first") as first:
        with pytest.raises(StudyBusy, match=rf"pid {os.getpid()} \(first, started "):
            Study(cfg)
        assert first.lock.held
    assert issubclass(StudyBusy, UserError)
    Study(cfg).close()


def test_quantizer_never_writes_next_to_the_shared_model(tmp_path: Path, assets: Path) -> None:
    """ORT writes ``<model>-inferred.onnx`` beside the file it quantizes and deletes it: two runs
    given the shared ``models/<name>.onnx`` collide on it (FileNotFoundError). A folder squatting
    that name proves nothing is written there."""
    study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images")
    (tmp_path / "out" / "models" / "cnn-inferred.onnx").mkdir(parents=True)
    assert main(["analyze", str(study), "--candidates"]) == 0
    assert main(["analyze", "--mode", "dynamic", str(study), "--out", str(tmp_path / "out")]) == 0


def test_scratch_of_a_killed_run_is_removed(tmp_path: Path, assets: Path) -> None:
    from tuneqn.controller.config import load_config
    from tuneqn.controller.study import SCRATCH_PREFIX, Study

    cfg = load_config(write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images"))
    stale = tmp_path / "out" / f"{SCRATCH_PREFIX}dead"
    (stale / "t1").mkdir(parents=True)
    with Study(cfg) as study:
        assert not stale.exists()
        study.prepare()
        a = study.quantizer_input("cnn")
        assert a.read_bytes() == study.models["cnn"].path.read_bytes()
        assert a.parent.parent.name.startswith(SCRATCH_PREFIX)
    assert not a.exists() and not list((tmp_path / "out").glob(f"{SCRATCH_PREFIX}*"))
