"""Where layerfold writes: the one output-path guard, and atomic writes of files and directories.

Every command that writes a directory (checkpoints, statistics, exports, healed models) calls
:func:`check_output` before any long work starts, and writes through :func:`atomic_dir`:

- never over, inside, or around a source it reads;
- an existing ``out`` only with ``overwrite``, and then only if it is empty or something layerfold
  wrote (a checkpoint, a statistics directory, an export, a healing run): a folder of the user's is
  never deleted;
- a directory is written to a temporary sibling and renamed into place, so a crash leaves no half
  output; temporary siblings left by a killed process are removed by the next write to the same place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# A directory holding one of these files (with layerfold's format inside) is layerfold's own output.
_MARKERS = {"config.json": ("format", "layerfold"), "stats.json": ("format", "layerfold-stats"),
            "layerfold_provenance.json": None}
_OWNED_DIRS = ("heal_state",)  # a healing run's directory before its checkpoint is written


class OutputError(ValueError):
    """An output path that layerfold must not write; the message names the cause and the fix."""


def _json_field(p: Path, key: str) -> Any:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return d.get(key) if isinstance(d, dict) else None


def layerfold_wrote(path: str | Path) -> bool:
    """Whether ``path`` is a directory layerfold wrote (see the module docstring)."""
    p = Path(path)
    if not p.is_dir():
        return False
    for name, want in _MARKERS.items():
        f = p / name
        if f.is_file() and (want is None or _json_field(f, want[0]) == want[1]):
            return True
    return any((p / d).is_dir() for d in _OWNED_DIRS)


def _related(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents or a in b.parents


def cache_dir() -> Path:
    """layerfold's cache (``$LAYERFOLD_CACHE``, default ``~/.cache/layerfold``): converted models, native builds."""
    return Path(os.environ.get("LAYERFOLD_CACHE") or Path.home() / ".cache" / "layerfold")


def check_source(src: Any) -> None:
    """A TypeError naming the fix when ``src`` is not a model source (a path, alias or Hub id): a Model, None, a
    number would otherwise be taken for a file name."""
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"a model source must be a path, alias or Hub id (str or Path), not {type(src).__name__}. Fix: "
                        "pass e.g. 'smollm2-135m' or a checkpoint directory (a Model in memory: write it with "
                        "layerfold.save_checkpoint first)")


def check_cache() -> Path:
    """``cache_dir()``, created; an OutputError naming LAYERFOLD_CACHE when it is a file or cannot be written (checked
    before a conversion is made, not when it is saved after it)."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        why = "it is a file, not a directory" if d.is_file() else e.strerror or str(e)
        where = "set by LAYERFOLD_CACHE" if os.environ.get("LAYERFOLD_CACHE") else "the default"
        raise OutputError(f"the model cache {d} ({where}) cannot be written: {why}. Fix: set LAYERFOLD_CACHE to a "
                          "writable directory") from None
    return d


def _cached_conversion(out: Path) -> Path | None:
    """The converted-model folder of the cache that ``out`` is, is inside of, or holds (None: no such folder).
    Writing there would make an alias silently load another model (or break the model being read)."""
    try:
        cache, o = cache_dir().resolve(), out.resolve()
    except OSError:
        return None
    if o == cache or o in cache.parents:
        return cache
    if cache not in o.parents:
        return None
    top = cache / o.relative_to(cache).parts[0]
    prov = _json_field(top / "config.json", "provenance") if top.is_dir() else None
    return top if isinstance(prov, dict) and prov.get("source_format") == "gguf" and "dequantized_to" in prov else None


def check_output(out: str | Path, *, sources: Sequence[str | Path] = (), overwrite: bool = False,
                 what: str = "--out") -> Path:
    """Raise :class:`OutputError` (a ValueError) unless layerfold may write the directory ``out``."""
    out = Path(out)
    for s in sources:
        if s and Path(s).exists() and _related(out, Path(s)):
            raise OutputError(f"{out}: refusing to write over, inside or around the source {s}. Fix: choose "
                              f"another {what} directory")
    cached = _cached_conversion(out)
    if cached is not None:
        raise OutputError(f"{out}: refusing to write over, inside or around layerfold's cache of converted models "
                          f"({cached}). Fix: choose another {what} directory, outside that folder")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{out}: {parent} is a file, not a directory. Fix: choose another {what}")
            _check_writable(out, parent, what)
            break
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out}: exists and is a file. Fix: choose another {what} directory")
        if Path.cwd().resolve() == out.resolve() or out.resolve() in Path.cwd().resolve().parents:
            raise OutputError(f"{out}: is the current directory (or holds it). Fix: choose a new {what} directory")
        if any(out.iterdir()):
            if not overwrite:
                raise OutputError(f"{out}: already exists. Fix: choose a new {what} or pass --overwrite")
            if not layerfold_wrote(out):
                raise OutputError(f"{out}: exists and was not written by layerfold, so --overwrite will not replace "
                                  f"it (it could hold your files). Fix: choose a new {what}, or empty or remove "
                                  "that directory yourself")
    return out


def check_output_file(path: str | Path, *, sources: Sequence[str | Path] = (), what: str = "--output",
                      replace: Callable[[Path], bool] = lambda p: False) -> Path:
    """Raise :class:`OutputError` unless layerfold may write the file ``path`` once its work is done: its folder
    exists and may be written, it is no directory, not inside a source, and an existing file is replaced only when
    ``replace(path)`` says layerfold wrote it (a user's file is never overwritten)."""
    p = Path(path)
    for s in sources:
        if s and Path(s).exists() and _related(p, Path(s)):
            raise OutputError(f"{what} {p}: refusing to write into the source {s}. Fix: choose a file outside it")
    if p.is_dir():
        raise OutputError(f"{what} {p}: is a directory. Fix: name a file, e.g. {p / 'results.json'}")
    if not p.absolute().parent.is_dir():
        raise OutputError(f"{what} {p}: its folder {p.parent} does not exist. Fix: create it, or name a file in an "
                          "existing folder")
    if p.exists() and not replace(p):
        raise OutputError(f"{what} {p}: exists and is not an earlier result of this command, so it is not replaced. "
                          "Fix: choose a new file name, or remove that file yourself")
    _check_writable(p, p.absolute().parent, what)
    return p


def _check_writable(out: Path, parent: Path, what: str) -> None:
    """Make and remove a temporary folder in ``parent`` (where ``atomic_dir`` writes), so that a folder the process
    may not write (permissions, a read-only or virtual file system) is refused now, not after the work."""
    try:
        probe = parent / f".{out.name}.tmp-{os.getpid()}-probe{time.time_ns()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise OutputError(f"{out}: cannot write in {parent} ({e.strerror or e}). Fix: choose a {what} in a folder you "
                          "can write to") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: str | Path) -> list[Path]:
    """Remove temporary siblings of ``out`` (``.NAME.tmp-PID-*`` / ``.NAME.old-PID``) whose process is gone.

    A process killed between moving the old ``out`` aside and renaming the new one into place leaves no
    ``out`` and a ``.NAME.old-PID``: that previous output is put back rather than removed."""
    out = Path(out)
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for p in sorted(out.parent.glob(f".{out.name}.*"), key=lambda q: q.name.startswith(f".{out.name}.tmp")):
        rest = p.name[len(out.name) + 2:]
        kind, _, tail = rest.partition("-")
        if kind not in ("tmp", "old"):
            continue
        pid = tail.split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if kind == "old" and not out.exists():
                p.rename(out)  # the swap was cut between its two renames: the previous output comes back
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it is renamed into place as ``out``
    (replacing an existing ``out`` only after the new one is complete); on any error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{int(time.time() * 1e3)}"
    tmp.mkdir()
    try:
        yield tmp
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and +-Inf floats as None: JSON has no such numbers (json.dumps would write a bare
    ``NaN`` that strict parsers refuse)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj: Any) -> str:
    """Strict JSON for files users and other tools read (reports, provenance): non-finite numbers as null."""
    return json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write strict JSON (:func:`json_text`) to a temporary sibling, then rename it over ``path``."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json_text(obj))
    tmp.replace(p)


__all__ = ["OutputError", "atomic_dir", "cache_dir", "check_cache", "check_output", "check_output_file", "check_source",
           "clean_stale", "json_safe", "json_text", "layerfold_wrote", "write_json_atomic"]
