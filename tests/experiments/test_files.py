"""Tests of kanvolution.experiments.files: atomic writes and the run-folder lock."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kanvolution.experiments.files import (
    LOCK_FILE,
    RunFolderError,
    RunLock,
    atomic_write,
    is_locked,
    prepare_folder,
    write_json,
)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"a": 1})

    def half(f):
        f.write('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half, mode="w")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_second_lock_is_refused_until_the_first_is_released(tmp_path):
    assert is_locked(tmp_path) is None  # no lock file: a folder of the time before locks
    with RunLock(tmp_path):
        assert is_locked(tmp_path) is True
        with pytest.raises(RunFolderError, match=r"in use by another run \(pid \d+\)"):
            RunLock(tmp_path).acquire()
    assert is_locked(tmp_path) is False
    with RunLock(tmp_path):  # free again
        pass


def test_the_lock_dies_with_its_process(tmp_path):
    code = f"""
import sys, time
from kanvolution.experiments.files import RunLock
RunLock({str(tmp_path)!r}).acquire()
print("locked", flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(proc.pid)
        with pytest.raises(RunFolderError, match=str(proc.pid)):
            RunLock(tmp_path).acquire()
        proc.kill()  # SIGKILL: no clean-up code runs, the OS drops the lock
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert is_locked(tmp_path) is False
    RunLock(tmp_path).acquire().release()


def test_prepare_folder_refuses_files(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        prepare_folder(tmp_path / "f")
    with pytest.raises(RunFolderError, match="a part of this path is a file"):
        prepare_folder(tmp_path / "f" / "run")
    assert prepare_folder(tmp_path / "a" / "b").is_dir()
