"""Writing predictions in the challenge's format: a pickled float tensor.

The evaluation binds the output *file* into a read-only directory: no temp file can be created
beside it there, and a bind-mounted file cannot be replaced by a rename. The write is therefore
atomic (temp file + rename) where the directory allows it and in place where it does not.
"""

from __future__ import annotations

import copyreg
import errno
import io
import logging
import os
import pickle
import secrets
import stat
import struct
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# read-only or unwritable directory (creating the temp file), or a mount point as target (the rename)
IN_PLACE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.EBUSY, errno.EXDEV})


def save_predictions(probabilities: torch.Tensor, path: str | Path) -> None:
    """Write the pickled float32 CPU tensor to `path` (through symlinks).

    Atomic where the directory is writable: a partial file never replaces a good one. Where it is
    not (the evaluation's file bind), the existing file is rewritten in place from the fully
    serialised bytes. A new file gets the umask's mode; an existing one keeps its mode.
    """
    data = serialize(probabilities)
    target = Path(os.path.realpath(path))
    try:
        _replace(target, data)
    except OSError as err:
        if err.errno not in IN_PLACE_ERRNOS or not target.is_file():
            raise
        _overwrite(target, data)
        logger.info("%s: its directory is not writable (%s); wrote the file in place", target, err.strerror)


def serialize(probabilities: torch.Tensor) -> bytes:
    """The tensor's pickle, identical bytes for identical values.

    torch pickles a storage as a small legacy torch.save whose record key is the storage's memory
    address; that key is replaced by "0" (it only links the record to its data inside the blob).
    """
    tensor = probabilities.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer)
    pickler.dispatch_table = copyreg.dispatch_table | {torch.storage.TypedStorage: _reduce_storage}
    pickler.dump(tensor)
    return buffer.getvalue()


def _reduce_storage(storage: torch.storage.TypedStorage) -> tuple:
    load, (blob,) = storage.__reduce__()
    untyped = storage._untyped_storage
    old, new = (b"X" + struct.pack("<I", len(key)) + key for key in (str(untyped._cdata).encode(), b"0"))
    split = len(blob) - untyped.nbytes() - 8  # the raw data at the end: an 8-byte count, then the bytes
    header = blob[:split]
    if header.count(old) == 2:  # the storage record and the key list; another layout stays as torch wrote it
        blob = header.replace(old, new) + blob[split:]
    return load, (blob,)


def _replace(target: Path, data: bytes) -> None:
    mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else None
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # O_CREAT applies the umask
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _overwrite(target: Path, data: bytes) -> None:
    """Write over the existing file, then cut it to length (no O_TRUNC: a same-size old output, e.g.
    the class prior, is never seen empty by a reader or left empty by a kill mid-write)."""
    with os.fdopen(os.open(target, os.O_WRONLY), "wb") as f:
        f.write(data)
        f.truncate(len(data))
        f.flush()
        os.fsync(f.fileno())
