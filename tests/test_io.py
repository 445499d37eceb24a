"""Writing the output: the evaluation's file bind into a read-only directory, symlinks, mode, bytes."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_task, write_task

from l2l_peft.io import save_predictions

# Inside a user + mount namespace (root there ignores chmod, but not a read-only mount): make
# $DIR read-only, bind the writable $FILE onto $DIR/result.pkl as the evaluation's
# `--bind $RESULT_PATH:$INTERNAL_RESULT_PATH` does, prove the directory is read-only, then run "$@".
_FILE_BIND = r"""
set -e
if [ "$READ_ONLY" = 1 ]; then mount --bind "$DIR" "$DIR"; mount -o remount,bind,ro "$DIR"; fi
mount --bind "$FILE" "$DIR/result.pkl"
if [ "$READ_ONLY" = 1 ] && touch "$DIR/probe" 2>/dev/null; then echo "directory still writable"; exit 99; fi
exec "$@"
"""


def _namespaces_allowed() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _namespaces_allowed(), reason="unshare -rm (user + mount namespaces) not permitted here")
@pytest.mark.parametrize("read_only", [True, False], ids=["read-only-dir", "writable-dir"])
def test_cli_writes_a_file_bound_into_a_directory(tmp_path, vit_dir, read_only):
    """read-only: no temp file can be created beside the output (EROFS); writable: the bound file is
    a mount point that a rename cannot replace (EBUSY). Both must write the bound file in place."""
    task = write_task(make_task(n_support=6, n_query=5)[0], tmp_path / "task.pkl")
    bound, result = tmp_path / "out", tmp_path / "host-result.pkl"
    bound.mkdir()
    (bound / "result.pkl").touch()  # the bind's mount point
    result.touch()
    env = {**os.environ, "DIR": str(bound), "FILE": str(result), "READ_ONLY": str(int(read_only))}
    command = [sys.executable, "-m", "l2l_peft", str(task), str(bound / "result.pkl"), "--model", str(vit_dir)]
    command += ["--max-steps", "2", "--min-steps", "1", "--cpu", "--strict"]
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", _FILE_BIND, "sh", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "wrote the file in place" in done.stdout
    probabilities = pickle.loads(result.read_bytes())  # the host side of the bind got the output
    assert probabilities.shape == (5, 3) and torch.allclose(probabilities.sum(1), torch.ones(5))
    assert (bound / "result.pkl").stat().st_size == 0  # outside the namespace: the mount point untouched
    assert sorted(p.name for p in bound.iterdir()) == ["result.pkl"]


def test_writes_through_a_symlink(tmp_path):
    real = tmp_path / "real.pkl"
    real.write_bytes(b"old")
    link = tmp_path / "link.pkl"
    link.symlink_to(real)
    save_predictions(torch.ones(2, 3), link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert torch.equal(pickle.loads(real.read_bytes()), torch.ones(2, 3))


def test_new_file_gets_the_umask_mode_and_existing_keeps_its_own(tmp_path):
    old = os.umask(0o027)
    try:
        save_predictions(torch.ones(1, 1), tmp_path / "new.pkl")
    finally:
        os.umask(old)
    assert (tmp_path / "new.pkl").stat().st_mode & 0o777 == 0o640
    existing = tmp_path / "existing.pkl"
    existing.touch(mode=0o664)
    existing.chmod(0o664)
    save_predictions(torch.ones(1, 1), existing)
    assert existing.stat().st_mode & 0o777 == 0o664


def test_equal_tensors_give_identical_bytes(tmp_path):
    """torch keys a pickled storage by its memory address; two live copies have different ones."""
    values = torch.rand(7, 3, generator=torch.Generator().manual_seed(0))
    first, second = values.clone(), values.clone()  # both alive: distinct storages and addresses
    save_predictions(first, tmp_path / "a.pkl")
    save_predictions(second[:, :], tmp_path / "b.pkl")
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()
    assert torch.equal(pickle.loads((tmp_path / "a.pkl").read_bytes()), values)


def test_a_view_is_saved_without_the_rest_of_its_storage(tmp_path):
    rows = torch.rand(100, 4)
    save_predictions(rows[90:], tmp_path / "out.pkl")
    loaded = pickle.loads((tmp_path / "out.pkl").read_bytes())
    assert torch.equal(loaded, rows[90:]) and loaded.untyped_storage().nbytes() == 10 * 4 * 4


def test_unwritable_new_file_still_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        save_predictions(torch.ones(1, 1), tmp_path / "missing-dir" / "out.pkl")
    assert not Path(tmp_path / "missing-dir").exists()
