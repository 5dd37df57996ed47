"""NumPy files (``.npy``, ``.npz``), read without pickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lipnorm.weights_io._stored import WeightFileError, first_line

__all__ = ["read_npy", "read_npz"]


def _npy_error(path: Path, exc: Exception) -> WeightFileError:
    if "allow_pickle" in str(exc):
        return WeightFileError(
            f"{path}: refused: it stores Python objects, and unpickling them could run code "
            "from the file; save the weights as numeric arrays"
        )
    return WeightFileError(f"{path}: not a readable NumPy file ({first_line(exc)})")


def read_npy(path: Path) -> dict[str, np.ndarray]:
    with path.open("rb") as file:
        if file.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
            raise WeightFileError(f"{path}: not a .npy file (it lacks the .npy magic bytes)")
        file.seek(0)
        try:
            array = np.lib.format.read_array(file, allow_pickle=False)
        except Exception as exc:  # a corrupt header fails in many ways (tokenize, eval, sizes)
            raise _npy_error(path, exc) from None
    return {path.stem: array}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        # Opened here, so that it is closed also when np.load fails on it.
        with path.open("rb") as file:
            archive = np.load(file, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise WeightFileError(f"{path}: not a .npz archive (it holds a single array)")
            with archive:
                return {name: archive[name] for name in archive.files}
    except WeightFileError:
        raise
    except Exception as exc:  # a corrupt archive or member fails in many ways, all one answer
        raise _npy_error(path, exc) from None
