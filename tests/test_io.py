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


def test_a_refused_chmod_leaves_no_descriptor_or_temporary_file(tmp_path, monkeypatch):
    """FAT mounts refuse chmod: atomic_path raised before its cleanup, leaking the descriptor and
    the temporary file; permissions are best effort, the write goes on."""
    def refuse(fd, mode):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(io.os, "fchmod", refuse)
    open_before = len(os.listdir("/proc/self/fd"))
    io.write_text_atomic(tmp_path / "config.yaml", "x: 1\n")
    assert (tmp_path / "config.yaml").read_text() == "x: 1\n" and os.listdir(tmp_path) == ["config.yaml"]
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_the_hash_caches_tell_a_rewrite_with_the_same_size_and_mtime_apart(tmp_path):
    """Keyed by size and mtime only, a same-size rewrite within one mtime tick (or with a restored
    mtime: cp -p, tar) got the old hash back."""
    import gzip
    path = tmp_path / "lexicon.txt"
    io.write_text_atomic(path, "a A\n")
    mtime = path.stat().st_mtime_ns
    first = io.file_sha256(path)
    io.write_text_atomic(path, "b B\n")
    os.utime(path, ns=(mtime, mtime))
    assert io.file_sha256(path) != first
    # gzip is told by its bytes, not its name: a .gz link to a blob is its content's hash too
    (tmp_path / "blob").write_bytes(gzip.compress(b'{"id": "a"}\n', mtime=1))
    (tmp_path / "plain.jsonl.gz").write_bytes(gzip.compress(b'{"id": "a"}\n', mtime=2))
    (tmp_path / "cuts.jsonl.gz").symlink_to(tmp_path / "blob")
    assert io.content_sha256(tmp_path / "cuts.jsonl.gz") == io.content_sha256(tmp_path / "plain.jsonl.gz")


def test_the_same_object_saved_twice_has_the_same_bytes(tmp_path):
    """Given a path, torch.save names its archive's folder after the file, atomic_path's random
    temporary name: two saves of the same weights differed, and the recipe's check of a model
    'written again with the same weights' (by its SHA-256) never matched."""
    import torch
    from sslasr.utils.io import save_torch_atomic
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "num_updates": 3}
    save_torch_atomic(state, tmp_path / "a" / "model_final.pt")
    save_torch_atomic(state, tmp_path / "b" / "model_final.pt")
    assert (tmp_path / "a/model_final.pt").read_bytes() == (tmp_path / "b/model_final.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a/model_final.pt")["model"]["w"], state["model"]["w"])
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["model_final.pt"]  # no temporary file left
