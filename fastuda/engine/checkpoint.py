"""Complete, atomic checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over the
target, so a crash at any moment leaves either the old or the new file, never a torn one. Loading
uses ``weights_only=True``: the state holds tensors and plain Python values only.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission); the old one is intact."""


class CheckpointLoadError(RuntimeError):
    """A checkpoint file is truncated, not a checkpoint, or holds unsafe content."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    with _atomic_write(Path(path)) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())


def link_checkpoint(source: str | Path, path: str | Path) -> None:
    """Make ``path`` name the same checkpoint as ``source``, atomically.

    A hard link costs no disk (a DeepLab-V2 checkpoint is hundreds of MB); where the file system
    has none, the file is copied. Either way the new name appears by one rename.
    """
    with _atomic_write(Path(path)) as tmp:
        os.unlink(tmp)  # os.link will not replace an existing name
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


@contextlib.contextmanager
def _atomic_write(path: Path) -> Iterator[str]:
    """A temporary name beside ``path`` for the body to fill; then one rename puts it in place. On
    failure the temporary file is removed, and file-system errors (full disk, no permission)
    become a CheckpointWriteError that names ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # a full disk surfaces as OSError, or as torch's zip writer failing while handling one
        cause = err if isinstance(err, OSError) else err.__context__
        if isinstance(cause, OSError):
            raise CheckpointWriteError(
                cause.errno, f"cannot write checkpoint {path}: {cause.strerror or cause}; the "
                "checkpoint already there (if any) is unchanged") from err
        raise


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that never finished (a run killed while
    saving leaves one, as large as a checkpoint). Call it only while no save is under way."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink()
    return stale


def snapshots(folder: str | Path) -> list[tuple[int, Path]]:
    """The ``iter_N.pt`` snapshots in ``folder`` as (N, path), oldest first."""
    found = []
    for path in Path(folder).glob("iter_*.pt"):
        number = path.stem.removeprefix("iter_")
        if number.isdigit():
            found.append((int(number), path))
    return sorted(found)


def prune_snapshots(folder: str | Path, keep: int, written: set[Path] | None = None
                    ) -> list[Path]:
    """Delete all but the newest ``keep`` ``iter_N.pt`` snapshots in ``folder`` (``keep`` 0: none
    deleted) and return what was deleted. Only the files in ``written`` (those this run wrote,
    when given) are ever deleted: another run's snapshots are not this run's to prune.
    ``latest.pt`` is a name of its own and is never touched."""
    if keep <= 0:
        return []
    doomed = [path for _, path in snapshots(folder)[:-keep]
              if written is None or path in written]
    for path in doomed:
        path.unlink()
    return doomed


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated file, not a checkpoint, or unsafe content
        raise CheckpointLoadError(f"cannot load checkpoint {path}: {err}") from err


def find_latest(work_dir: str | Path) -> Path | None:
    latest = Path(work_dir) / "checkpoints" / "latest.pt"
    return latest if latest.is_file() else None


def any_checkpoint(work_dir: str | Path) -> Path | None:
    """``latest.pt``, else the newest ``iter_N.pt`` of the work dir; None when it has none."""
    found = snapshots(Path(work_dir) / "checkpoints")
    return find_latest(work_dir) or (found[-1][1] if found else None)


def load_newest(work_dir: str | Path, map_location: str | torch.device = "cpu"
                ) -> tuple[dict[str, Any], Path, list[str]] | None:
    """The newest checkpoint of the work dir that loads: ``latest.pt``, then the snapshots newest
    first. Returns (state, path, one line per file skipped and why), or None when there is no
    checkpoint; raises CheckpointLoadError naming every file when none loads."""
    folder = Path(work_dir) / "checkpoints"
    candidates = [p for p in [folder / "latest.pt"] if p.is_file()]
    candidates += [p for _, p in reversed(snapshots(folder))]
    if not candidates:
        return None
    skipped: list[str] = []
    seen: set[tuple[int, int]] = set()
    for path in candidates:
        st = path.stat()
        if (st.st_dev, st.st_ino) in seen:  # latest.pt is a hard link of the newest snapshot
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            return load_checkpoint(path, map_location), path, skipped
        except CheckpointLoadError as err:
            skipped.append(str(err).splitlines()[0])
    raise CheckpointLoadError(f"no checkpoint in {folder} loads: " + "; ".join(skipped))


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in a weights_only-loadable form."""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), state["python_gauss"]))
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
