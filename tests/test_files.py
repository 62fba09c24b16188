"""Output files: atomic writes that leave nothing behind, disk errors as one line, one writer per
folder, and a new model without the previous model's results beside it."""
import builtins
import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

import utils.files as files
from conftest import ROOT
from utils.files import (FolderBusyError, OutputError, exclusive_folder, remove_previous_results,
                         write_atomically, write_text_atomically)


def hidden_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    ours = write_text_atomically(tmp_path / "ours.json", "{}")
    assert stat.S_IMODE(os.stat(ours).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    assert not hidden_files(tmp_path)   # no temp file left


def test_the_temp_file_is_named_after_its_target_and_writer(tmp_path):
    seen = []
    write_atomically(tmp_path / "model.bin", lambda stream: seen.extend(hidden_files(tmp_path)))
    assert len(seen) == 1 and seen[0].startswith(f".model.bin.{os.getpid()}.") and seen[0].endswith(".tmp")
    assert not hidden_files(tmp_path)


def test_a_full_disk_is_one_error_naming_the_file_and_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("previous")
    # /dev/full answers every write with ENOSPC, as a full disk does.
    monkeypatch.setattr(files, "open", lambda name, mode: builtins.open("/dev/full", mode), raising=False)
    with pytest.raises(OutputError) as caught:
        write_text_atomically(target, "x" * 100_000)
    assert str(caught.value) == f"cannot write {target}: no space left on the device"
    assert target.read_text() == "previous"
    assert not hidden_files(tmp_path)


@pytest.mark.parametrize("code, cause", [(errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied"),
                                         (errno.EDQUOT, "disk quota exceeded")])
def test_disk_errors_while_writing_become_one_line(tmp_path, code, cause):
    target = tmp_path / "scores.csv"

    def failing_write(stream):
        stream.write(b"partial")
        raise OSError(code, os.strerror(code))
    with pytest.raises(OutputError, match=f"^cannot write {target}: {cause}$"):
        write_atomically(target, failing_write)
    assert not target.exists() and not hidden_files(tmp_path)


def test_a_bug_in_the_writer_is_not_disguised_as_a_disk_error(tmp_path):
    def failing_write(stream):
        raise OSError(errno.EIO, "input/output error")
    with pytest.raises(OSError) as caught:
        write_atomically(tmp_path / "x.bin", failing_write)
    assert not isinstance(caught.value, OutputError) and not hidden_files(tmp_path)


def test_a_folder_where_the_file_should_be_is_refused_before_writing(tmp_path):
    (tmp_path / "best.pdparams").mkdir()
    calls = []
    with pytest.raises(OutputError, match="best.pdparams: it is a folder, not a file$"):
        write_atomically(tmp_path / "best.pdparams", calls.append)
    assert calls == [] and (tmp_path / "best.pdparams").is_dir() and not hidden_files(tmp_path)


def test_a_file_where_a_folder_should_be_is_named(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(OutputError, match=f"out/demo/metrics.json: {tmp_path / 'out'} is a file, not a folder$"):
        write_text_atomically(tmp_path / "out" / "demo" / "metrics.json", "{}")


def dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_stale_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".best.pdparams.{dead_pid()}.k2x9q_ab.tmp"
    live = tmp_path / f".best.pdparams.{os.getppid()}.a1b2c3d4.tmp"        # the pid is alive
    other_target = tmp_path / f".metrics.json.{dead_pid()}.zz99yy88.tmp"   # another file's temp
    locked = tmp_path / f".best.pdparams.{dead_pid()}.lockedxx.tmp"       # pid gone, lock held
    for path in (dead, live, other_target, locked):
        path.write_bytes(b"half a model")
    # A live writer whose pid this machine cannot see (another container) still holds its flock.
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        handle = os.open({str(locked)!r}, os.O_RDONLY)
        fcntl.flock(handle, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        write_text_atomically(tmp_path / "best.pdparams", "new")
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "best.pdparams").read_text() == "new"
    assert not dead.exists()
    assert live.exists() and other_target.exists() and locked.exists()


HOLD_FOLDER = """
import sys, time
from utils.files import exclusive_folder
with exclusive_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def hold_in_another_process(folder):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FOLDER, str(folder)], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_of_a_folder_stops_at_once_naming_the_first(tmp_path):
    holder = hold_in_another_process(tmp_path / "demo")
    try:
        start = time.monotonic()
        with pytest.raises(FolderBusyError) as caught:
            with exclusive_folder(tmp_path / "demo"):
                pytest.fail("two writers held one folder")
        assert time.monotonic() - start < 1
        assert str(caught.value) == (f"another run (pid {holder.pid}) is writing {tmp_path / 'demo'}; "
                                     f"wait for it or use another --save_path")
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_writer_releases_its_folder_and_a_waiting_one_gets_it(tmp_path):
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(FolderBusyError):
            with exclusive_folder(tmp_path, wait_seconds=0.3):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        with exclusive_folder(tmp_path, wait_seconds=10) as folder:
            assert (folder / files.LOCK_NAME).read_text().split()[0] == str(os.getpid())
    finally:
        holder.kill()
        holder.wait()


def test_a_process_may_nest_its_hold_on_a_folder(tmp_path):
    with exclusive_folder(tmp_path / "a"):
        with exclusive_folder(tmp_path / "a"):
            pass
        other = subprocess.run([sys.executable, "-c", HOLD_FOLDER, str(tmp_path / "a")], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert "FolderBusyError" in other.stderr   # still held after the inner block


def test_a_folder_to_be_read_is_not_created(tmp_path):
    with exclusive_folder(tmp_path / "missing", create=False):
        pass
    assert not (tmp_path / "missing").exists()


def test_a_new_model_removes_the_previous_results_and_keeps_logs(tmp_path):
    stale = ["metrics.json", "scores.csv", "roc_curve.png", "bottle_0.png", "bottle_82.png",
             "predict/good_000.png", "predict/test/good/000.png", "predict/predictions.csv"]
    kept = ["best.pdparams", "train.log", "val.log", "bottle_top.png", "screw_1.png", "notes.txt",
            "predict/notes.txt", "infer/good_000.png"]
    for name in stale + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    removed = remove_previous_results(tmp_path, "bottle")
    assert sorted(str(p.relative_to(tmp_path)) for p in removed) == sorted(stale)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


RUN_CLI = """
import os, signal, sys, time
from utils.cli import run_cli
from utils.files import write_atomically

def write(stream):
    stream.write(b"half")
    case = sys.argv[2]
    if case == "full":
        raise OSError(28, "No space left on device")
    os.kill(os.getpid(), signal.SIGTERM if case == "term" else signal.SIGINT)
    time.sleep(30)

def main():
    if sys.argv[2] == "oserror":   # raised outside the atomic writers, e.g. by a log file
        raise OSError(28, "No space left on device", sys.argv[1] + "/x")
    write_atomically(sys.argv[1] + "/out.bin", write)

run_cli(main)
"""


@pytest.mark.parametrize("case, code, line", [
    ("full", 2, "error: cannot write {folder}/out.bin: no space left on the device"),
    ("oserror", 2, "error: {folder}/x: no space left on the device"),
    ("term", 143, "stopped by SIGTERM"),
    ("int", 130, "interrupted")])
def test_the_command_line_reports_disk_errors_and_signals_in_one_line(tmp_path, case, code, line):
    result = subprocess.run([sys.executable, "-c", RUN_CLI, str(tmp_path), case], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == code
    assert result.stderr.strip() == line.format(folder=tmp_path)
    assert list(tmp_path.iterdir()) == []   # the temp file was removed
