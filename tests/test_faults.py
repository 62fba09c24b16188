"""train.py killed at any moment keeps the previous model loadable and leaves no temp file after
the next run; SIGTERM cleans up on its way out; a second run on a busy folder stops with one line."""
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_script
from models.model_file import load_model
from test_files import hold_in_another_process

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")

TEMP_NAME = re.compile(r"\.best\.pdparams\.(\d+)\.\w+\.tmp\Z")


def train_args(demo_root, save_path):
    return ["--data_path", demo_root, "--category", "demo", "--backbone", "mobilenet_v2", "--val", "False",
            "--save_path", save_path]


def start_train(demo_root, save_path, stderr=subprocess.DEVNULL):
    return subprocess.Popen([sys.executable, str(Path(ROOT) / "train.py"), *map(str, train_args(demo_root, save_path))],
                            stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT)


def wait_for(condition, run, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.poll() is None, f"train.py ended (exit {run.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.005)


def holds_lock(folder, run):
    lock = folder / ".padim.lock"
    return lambda: lock.exists() and lock.read_text().split()[:1] == [str(run.pid)]


def temp_files(folder):
    return [p for p in folder.iterdir() if TEMP_NAME.match(p.name)]


def saving(folder, run):
    """True once ``run``'s temp model file exists and holds data: it is in the middle of the save."""
    def size(path):
        try:
            return path.stat().st_size
        except FileNotFoundError:   # renamed into place meanwhile
            return 0

    def check():
        return any(TEMP_NAME.match(p.name).group(1) == str(run.pid) and size(p) > (1 << 20) for p in temp_files(folder))
    return check


def assert_refused_as_busy(result, holder_pid, folder):
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: another run (pid {holder_pid}) is writing {folder}; "
                                     f"wait for it or use another --save_path")


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def previous_model(trained, tmp_path):
    """A save path whose demo folder holds a model from an earlier run: (save_path, model path, sha256)."""
    model = tmp_path / "out" / "demo" / "best.pdparams"
    model.parent.mkdir(parents=True)
    shutil.copyfile(trained[0] / "demo" / "best.pdparams", model)
    return tmp_path / "out", model, sha256(model)


def test_killed_runs_keep_the_previous_model_and_the_next_run_removes_their_temp_files(previous_model, demo_root):
    save_path, model, previous_hash = previous_model
    folder = model.parent
    seed = random.randrange(1 << 30)
    moments = ["save", random.Random(seed).uniform(0.0, 4.0)]
    for moment in moments:
        run = start_train(demo_root, save_path)
        try:
            if moment == "save":
                wait_for(saving(folder, run), run, "save")
            else:   # seconds into the fit (the run holds the folder from just before the fit)
                wait_for(holds_lock(folder, run), run, "lock")
                time.sleep(moment)
        finally:
            run.kill()
            run.wait()
        if moment == "save":
            assert temp_files(folder), "the kill did not land in the save"
            assert sha256(model) == previous_hash
        load_model(model)   # the previous model, or a complete new one if the kill came after the rename
    before = os.stat(model).st_ino
    for name in ("metrics.json", "scores.csv", "demo_0.png", "roc_curve.png", "val.log"):
        (folder / name).write_text("the previous model's")
    finished = run_script("train.py", *train_args(demo_root, save_path))
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert temp_files(folder) == [], f"random kill moments from seed {seed}: {moments}"
    assert os.stat(model).st_ino != before   # a new model was renamed into place
    load_model(model)
    left = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert left == ["best.pdparams", "train.log", "val.log"]   # no results of the previous model beside it


def test_sigterm_during_the_save_exits_with_one_line_and_removes_its_temp_file(previous_model, demo_root, tmp_path):
    save_path, model, previous_hash = previous_model
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as stderr:
        run = start_train(demo_root, save_path, stderr)
        try:
            wait_for(saving(model.parent, run), run, "save")
            run.send_signal(signal.SIGTERM)
            run.wait(timeout=60)
        finally:
            run.kill()
            run.wait()
    assert run.returncode == 128 + signal.SIGTERM
    assert errors.read_text().strip().splitlines()[-1] == "stopped by SIGTERM"
    assert temp_files(model.parent) == []
    assert sha256(model) == previous_hash


def test_a_second_train_on_a_busy_folder_stops_with_one_line_and_the_first_model_is_intact(demo_root, tmp_path):
    save_path = tmp_path / "out"
    folder = save_path / "demo"
    first = start_train(demo_root, save_path)
    try:
        wait_for(holds_lock(folder, first), first, "lock")
        first.send_signal(signal.SIGSTOP)   # keeps the first inside its fit while the second starts
        try:
            second = run_script("train.py", *train_args(demo_root, save_path))
        finally:
            first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
        first.wait()
    assert_refused_as_busy(second, first.pid, folder)
    assert load_model(folder / "best.pdparams").meta.category == "demo"
    assert temp_files(folder) == []


def test_val_on_a_folder_another_run_writes_stops_with_one_line_and_leaves_the_model(previous_model, demo_root):
    save_path, model, previous_hash = previous_model
    holder = hold_in_another_process(model.parent)
    try:
        result = run_script("val.py", "--data_path", demo_root, "--category", "demo", "--save_path", save_path)
    finally:
        holder.kill()
        holder.wait()
    assert_refused_as_busy(result, holder.pid, model.parent)
    assert sha256(model) == previous_hash
    assert sorted(p.name for p in model.parent.iterdir() if not p.name.startswith(".")) == ["best.pdparams"]


FULL_DISK = """
import builtins, runpy, sys
import utils.files
# The atomic writers' temp files go to /dev/full, which answers every write with ENOSPC.
utils.files.open = lambda name, mode="r", *args, **kwargs: builtins.open("/dev/full", mode)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_at_the_save_is_one_line_and_keeps_the_previous_model(previous_model, demo_root):
    save_path, model, previous_hash = previous_model
    result = subprocess.run([sys.executable, "-c", FULL_DISK, "train.py", *map(str, train_args(demo_root, save_path))],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: cannot write {model}: no space left on the device"
    assert "Traceback" not in result.stderr
    assert sha256(model) == previous_hash and temp_files(model.parent) == []


@pytest.mark.parametrize("save_path, cause", [
    ("a_file/out", "{tmp}/a_file is a file, not a folder"),
    # Refused even to root, unlike a chmod 0555 folder (EPERM for root, EACCES for others).
    ("/sys/fs/padim_output", "(operation not permitted|permission denied)"),
])
def test_a_save_path_that_cannot_be_written_is_one_line_before_the_fit(demo_root, tmp_path, save_path, cause):
    (tmp_path / "a_file").write_text("")
    result = run_script("train.py", *train_args(demo_root, tmp_path / save_path))
    folder = tmp_path / save_path / "demo"
    assert result.returncode == 2
    assert re.fullmatch(f"error: cannot write {re.escape(str(folder))}: {cause.format(tmp=re.escape(str(tmp_path)))}",
                        result.stderr.strip()), result.stderr
