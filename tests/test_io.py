"""atomic_path reaches the disk before and after its rename; killed saves' temporary files are found."""

import os
import stat

from sslasr.utils import io
from sslasr.utils.io import atomic_path, remove_temp_files


def test_atomic_path_syncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", info.st_ino, stat.S_ISDIR(info.st_mode)))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace",))
        replace(src, dst)

    monkeypatch.setattr(io.os, "fsync", recording_fsync)
    monkeypatch.setattr(io.os, "replace", recording_replace)
    with atomic_path(tmp_path / "checkpoint_last.pt") as tmp:
        tmp.write_bytes(b"weights")
    file_ino, dir_ino = (tmp_path / "checkpoint_last.pt").stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", file_ino, False), ("replace",), ("fsync", dir_ino, True)]


def test_remove_temp_files_takes_only_the_named_files_leftovers(tmp_path):
    for name in (".checkpoint_last.pt.k2j3.tmp.pt", ".model_valid_12.pt.x9.tmp.pt", ".model_valid_3.pt.a.tmp.pt",
                 ".other.pt.q1.tmp.pt", "checkpoint_last.pt", "model_valid_12.pt"):
        (tmp_path / name).write_bytes(b"")
    assert remove_temp_files(tmp_path, "model_valid_*.pt") == 2
    assert remove_temp_files(tmp_path, "checkpoint_last.pt") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.q1.tmp.pt", "checkpoint_last.pt",
                                                          "model_valid_12.pt"]
