"""File naming, atomic writes and cheap shard checks shared by the writer and the reader.

Everything that knows how a path inside a run directory is spelled lives here, so the writer
(``cppo_diag.capture``) and the reader (``cppo_diag.storage.reader``) cannot drift apart.

Layout (see ``docs/run-format.md``)::

    RUN/meta.json                                    run metadata, written atomically by rank 0
    RUN/tokens/step=000012/rank0-u0-000.parquet      per-token rows of one (step, rank, update) part
    RUN/sequences/step=000012/rank0-000.parquet      per-sequence rows
    RUN/scalars/rank0.jsonl                          one JSON object per line: {"step": .., "rank": .., name: value}
    RUN/_done/step=000012.rank0                      marker: every token shard of (step, rank) is complete
    RUN/_live/rank0.json                             heartbeat of an open writer (pid, host, time)
    RUN/findings.jsonl                               the live doctor's findings, one JSON object per line, as
                                                     they fire (``--doctor.live true``; analyses/doctor_live.py)

Temporary files start with ``.tmp-`` and are never read. Every writer of a run directory (the recorder, the
synthetic-run generator, the recompute's side table) writes through the atomic helpers here:
``atomic_write_json``, ``create_json_if_absent``, ``atomic_write_parquet``, ``atomic_parquet_writer`` and
``write_done_marker`` (all built on ``atomic_replace``).
"""

from __future__ import annotations

import json
import os
import re
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cppo_diag.storage import schema

TMP_PREFIX = ".tmp-"
LIVE_DIR = "_live"
PARQUET_MAGIC = b"PAR1"

_STEP_DIR_RE = re.compile(r"^step=(\d+)$")
_TOKEN_SHARD_RE = re.compile(r"^rank(\d+)-u(\d+)-(\d+)\.parquet$")
_SEQ_SHARD_RE = re.compile(r"^rank(\d+)-(\d+)\.parquet$")
_DONE_RE = re.compile(r"^step=(\d+)\.rank(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step={int(step):06d}"


def parse_step_dir(name: str) -> int | None:
    m = _STEP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def token_shard_name(rank: int, update: int, part: int) -> str:
    return f"rank{int(rank)}-u{int(update)}-{int(part):03d}.parquet"


def parse_token_shard(name: str) -> tuple[int, int, int] | None:
    """``rank0-u1-002.parquet`` -> (rank, update, part); None for anything else."""
    m = _TOKEN_SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def sequence_shard_name(rank: int, part: int) -> str:
    return f"rank{int(rank)}-{int(part):03d}.parquet"


def parse_sequence_shard(name: str) -> tuple[int, int] | None:
    m = _SEQ_SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def done_marker_name(step: int, rank: int) -> str:
    return f"step={int(step):06d}.rank{int(rank)}"


def parse_done_marker(name: str) -> tuple[int, int] | None:
    m = _DONE_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def scalars_file_name(rank: int) -> str:
    return f"rank{int(rank)}.jsonl"


HEARTBEAT_GLOB = "rank*.json"  # every heartbeat file in RUN/_live/


def heartbeat_file_name(rank: int) -> str:
    """``_live/`` heartbeat of rank ``rank``'s open writer."""
    return f"rank{int(rank)}.json"


def tmp_path_for(path: Path) -> Path:
    """A unique temporary sibling of ``path`` (same directory, so ``os.replace`` is atomic)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_replace(path: Path) -> Iterator[Path]:
    """Yield a temp sibling of ``path`` to write; on success it replaces ``path`` (``os.replace``, so readers
    see all of it or nothing), on any error it is removed and the error propagates."""
    tmp = tmp_path_for(Path(path))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_replace``)."""
    with atomic_replace(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


FINDINGS_FILE = "findings.jsonl"


def findings_path(run: Path) -> Path:
    """The live doctor's findings of a run (one JSON object per line, appended as they fire)."""
    return Path(run) / FINDINGS_FILE


def append_json_line(path: Path, obj, *, fsync: bool = False) -> None:
    """Append ``obj`` as one JSON line to ``path`` (a whole line per ``write``: a reader sees whole lines, or a
    last partial one it must skip)."""
    line = json.dumps(obj, sort_keys=True, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())


def read_json_lines(path: Path) -> list[dict]:
    """The complete JSON lines of ``path`` (none when it is missing; a partial last line is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def atomic_write_json(path: Path, obj, *, fsync: bool = False) -> None:
    """Write ``obj`` as JSON (indented, sorted keys) to ``path`` atomically."""
    atomic_write_bytes(path, _json_bytes(obj), fsync=fsync)


def create_json_if_absent(path: Path, obj, *, tag: str = "") -> bool:
    """Write ``obj`` as JSON to ``path`` only if no file is there, atomically: the whole file is written under
    a temp name (carrying ``tag``, e.g. the writer's rank, so a cleanup can tell whose temp it is) and then
    hard-linked into place, which fails if another process created ``path`` first, so it never clobbers.
    Returns True when this call created the file."""
    path = Path(path)
    tmp = tmp_path_for(path.with_name(f"{path.name}.{tag}") if tag else path)
    try:
        tmp.write_bytes(_json_bytes(obj))
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_parquet(table, path: Path, *, fsync: bool = False, **write_options) -> int:
    """Write ``table`` (a ``pyarrow.Table`` or a ``polars.DataFrame``) to ``path`` atomically with
    ``pyarrow.parquet.write_table(**write_options)``; return the bytes written."""
    import polars as pl
    import pyarrow.parquet as pq

    if isinstance(table, pl.DataFrame):
        table = table.to_arrow()
    with atomic_replace(path) as tmp:
        pq.write_table(table, tmp, **write_options)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        return os.path.getsize(tmp)


@contextmanager
def atomic_parquet_writer(path: Path, arrow_schema, **write_options):
    """A ``pyarrow.parquet.ParquetWriter`` for tables written one after another (``writer.write_table``) into
    a temp sibling of ``path``: when the ``with`` block ends normally the file is closed and renamed to
    ``path``; when it raises, the temp file is removed (``path`` is never left half written)."""
    import pyarrow.parquet as pq

    with atomic_replace(path) as tmp:
        writer = pq.ParquetWriter(tmp, arrow_schema, **write_options)
        try:
            yield writer
        finally:
            writer.close()


def write_token_shard(run: Path, frame, *, step: int, rank: int = 0, update: int = 0, part: int = 0,
                      **write_options) -> Path:
    """One token shard ``RUN/tokens/step=.../rank{r}-u{u}-{part}.parquet`` written atomically (its step folder
    made as needed); ``write_options`` go to ``atomic_write_parquet``. Returns the shard's path."""
    step_dir = run_dirs(Path(run))["tokens"] / step_dir_name(step)
    step_dir.mkdir(parents=True, exist_ok=True)
    path = step_dir / token_shard_name(rank, update, part)
    atomic_write_parquet(frame, path, **write_options)
    return path


def write_done_marker(done_dir: Path, step: int, rank: int, *, fsync: bool = False) -> Path:
    """Mark (step, rank) complete: ``done_dir/step=....rank{r}`` holding {step, rank, time}, written
    atomically. Write it only after every shard of that step and rank is in place."""
    import time

    done_dir = Path(done_dir)
    done_dir.mkdir(parents=True, exist_ok=True)
    marker = done_dir / done_marker_name(step, rank)
    atomic_write_json(marker, {"step": int(step), "rank": int(rank), "time": time.time()}, fsync=fsync)
    return marker


def parquet_footer_ok(path: Path) -> str | None:
    """Cheap integrity check of a Parquet file: magic bytes at both ends and a footer length that fits.

    Returns None when the file looks complete, otherwise a short reason (used in warnings).
    Reads 12 bytes; never parses the data pages.
    """
    try:
        size = os.path.getsize(path)
        if size < 12:
            return f"file is {size} bytes, too small to be Parquet"
        with open(path, "rb") as fh:
            head = fh.read(4)
            fh.seek(size - 8)
            tail = fh.read(8)
    except OSError as exc:
        return f"cannot read ({exc})"
    if head != PARQUET_MAGIC:
        return "missing leading PAR1 magic"
    if tail[4:] != PARQUET_MAGIC:
        return "missing trailing PAR1 magic (truncated write?)"
    (footer_len,) = struct.unpack("<i", tail[:4])
    if footer_len <= 0 or footer_len + 12 > size:
        return f"footer length {footer_len} does not fit in a {size}-byte file"
    return None


def run_dirs(run: Path) -> dict[str, Path]:
    run = Path(run)
    return {
        "meta": run / schema.META_FILE,
        "tokens": run / schema.TOKENS_DIR,
        "sequences": run / schema.SEQUENCES_DIR,
        "scalars": run / schema.SCALARS_DIR,
        "done": run / schema.DONE_DIR,
        "live": run / LIVE_DIR,
    }


def verify_parquet_pages(path: Path) -> str | None:
    """Full integrity check of a Parquet file: decode every page of every row group (verifying page CRCs
    where the writer stored them). Returns None when the file reads back, otherwise a short reason.

    Costs one read of the file (one row group in memory at a time); the reader caches the result per
    (path, size, mtime), so each shard is verified once per process.
    """
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        for i in range(pf.num_row_groups):
            pf.read_row_group(i)
    except Exception as exc:  # noqa: BLE001 - any decode failure means corrupt data pages
        return f"corrupt data pages ({type(exc).__name__}: {exc})"
    return None


# -- run names ----------------------------------------------------------------------------------------
def check_run_name(root: Path, name: str | None) -> Path:
    """``root / name`` as a run directory, refusing names that would write outside ``root``: an absolute
    path, a path separator, ``.``/``..``, an empty name, or an existing symlink that resolves outside ``root``.
    ``name=None`` means ``root`` is the run directory itself. Raises ``ValueError`` naming the field."""
    root = Path(root)
    if name is None:
        return root
    if not isinstance(name, str):
        raise ValueError(f"name: expected a run name (str), found {type(name).__name__}")
    if (name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name
            or os.path.isabs(name)):
        raise ValueError(f"name: expected one plain directory name inside {root} (no '/', '\\', '.' or '..'), "
                         f"found {name!r}")
    run_dir = root / name
    if run_dir.is_symlink():
        target = run_dir.resolve()
        base = root.resolve()
        if target != base and base not in target.parents:
            raise ValueError(f"name: {run_dir} is a symlink to {target}, outside the root {base}; refusing to "
                             "write there")
    return run_dir


# -- writer locks -------------------------------------------------------------------------------------
class RunLockedError(RuntimeError):
    """Another live process holds the writer lock of this run directory and rank (the message names it)."""


def _lock_holder_text(info: dict) -> str:
    return (f"pid {info.get('pid')} on host {info.get('host')!r} since {info.get('started')}"
            + (f" ({info.get('argv')})" if info.get("argv") else ""))


class WriterLock:
    """Exclusive writer lock of one (run directory, writer) pair, e.g. ``rank0``: ``RUN/_live/rank0.lock``.

    Taken with ``flock(LOCK_EX | LOCK_NB)``, which the kernel drops when the holder exits or dies, so a lock
    left behind by a killed process is free and is taken over (``stale`` then describes the dead holder).
    The file holds the holder's pid, host and start time, which a refused second writer names. A holder on
    another host (shared filesystem) counts as live while its heartbeat ``RUN/_live/rank{r}.json`` is
    younger than ``stale_s`` seconds.
    """

    def __init__(self, run_dir: Path, writer: str, *, stale_s: float = 60.0):
        self.path = Path(run_dir) / LIVE_DIR / f"{writer}.lock"
        self.heartbeat = Path(run_dir) / LIVE_DIR / f"{writer}.json"
        self.writer = writer
        self.stale_s = float(stale_s)
        self.stale: dict | None = None  # the previous holder, when a leftover lock was taken over
        self._fd: int | None = None

    def _read(self, fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, 65536)
            info = json.loads(data.decode("utf-8")) if data.strip() else {}
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "WriterLock":
        import datetime as _dt
        import fcntl
        import socket
        import sys
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            info = self._read(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent.parent}: writer '{self.writer}' is locked by {_lock_holder_text(info)} "
                f"(lock file {self.path}); two writers would mix the run. Stop that process, or write to "
                "another run name / rank"
            ) from None
        host = socket.gethostname()
        info = self._read(fd)
        if info.get("pid") is not None and not info.get("released"):
            if info.get("host") != host:
                try:
                    beat_age = time.time() - self.heartbeat.stat().st_mtime
                except OSError:
                    beat_age = float("inf")
                if beat_age < self.stale_s:
                    os.close(fd)
                    raise RunLockedError(
                        f"{self.path.parent.parent}: writer '{self.writer}' is locked by {_lock_holder_text(info)}"
                        f" whose heartbeat {self.heartbeat} is {beat_age:.0f} s old (live); two writers would mix "
                        "the run"
                    )
            self.stale = info
        mine = {"pid": os.getpid(), "host": host, "writer": self.writer,
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "argv": " ".join(sys.argv[:3])[:200]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(mine).encode("utf-8"))
        self._fd = fd
        return self

    def release(self) -> None:
        """Mark the lock released and drop it (idempotent)."""
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
        try:
            info = self._read(fd)
            info["released"] = True
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(info).encode("utf-8"))
        except OSError:
            pass
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def check_unlocked(run_dir: Path) -> None:
    """Raise ``RunLockedError`` when any writer of ``run_dir`` holds its lock (e.g. before deleting the run)."""
    live = Path(run_dir) / LIVE_DIR
    if not live.is_dir():
        return
    for f in sorted(live.glob("*.lock")):
        lock = WriterLock(run_dir, f.stem)
        lock.acquire()
        lock.release()


# -- mergeable partial aggregates beside a run (cppo_diag.analyses.aggregate) ------------------------------
AGGREGATES_DIR = "_cache/aggregates"  # RUN/_cache/aggregates/<spec key>/s<lo>-<hi>-<fingerprint>.npz


def aggregate_block_path(run: Path, key: str, lo: int, hi: int, fingerprint: str) -> Path:
    """Where the partial aggregate of steps [lo, hi] under the spec hashed as ``key`` is kept (written by the
    recorder's writer as steps complete, or by a scan; write it through :func:`atomic_replace`)."""
    return Path(run) / AGGREGATES_DIR / key / f"s{lo}-{hi}-{fingerprint}.npz"
