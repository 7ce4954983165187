"""Data access for the app: run roots, root-confined paths, and bounded caches around the reader and the
``analyses`` package.

Pages never open files themselves: they read runs and run analyses through the functions here, which call
``cppo_diag.open_run`` / ``cppo_diag.list_runs`` and ``cppo_diag.analyses.*`` and cache the (collected) results. What
is computed lives in ``analyses`` (``cppo_diag.analyses.run_summary`` for the per-run facts below); pages pass the
tables on to ``analyses`` functions over in-memory frames and to the figure builders of
``cppo_diag.analyses.plots_plotly``.

Caching
-------
* Every cached function takes the run path *and* its :func:`run_version` (a cheap ``stat`` fingerprint of
  ``meta.json``, ``_done/``, ``scalars/`` and ``tokens/``), so a run still being written is re-read as soon as
  it has new data and a finished run is read once.
* Caches are bounded (``max_entries`` and ``ttl``) so a long session over many runs cannot grow without limit.
* Aggregates are computed over all steps once; token-level data is read only for the selected step.

Security
--------
* One rule decides which paths the app reads (:func:`confine`): a path is read when it resolves (symlinks
  included) inside a root, or inside the target of a run the listing found in a root. A run directory that
  is a symbolic link the user placed inside a root therefore counts as inside, while any other path, from
  the browser or elsewhere, that resolves outside is refused with ``PermissionError`` (one plain sentence,
  shown as such by the router). The listing and the pages use the same snapshot of the roots, so every
  listed run opens on every page; a link re-pointed after the listing is refused until Refresh.
* Nothing is ever unpickled: runs are parquet / JSON / JSONL read through the reader.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import streamlit as st

from cppo_diag.analyses import run_summary
from cppo_diag.app.roots import ROOTS_ENV, default_root
from cppo_diag.storage import schema

# Bounds of the caches (entries per cached function, seconds).
MAX_RUNS = 64
MAX_AGGREGATES = 512
MAX_TOKEN_SLICES = 32
TTL_S = 3600


# -- roots and confinement ------------------------------------------------------------------------------


def parse_roots(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> list[Path]:
    """Run roots from the script arguments (``--root DIR``, repeatable) and ``$CPPO_DIAG_ROOTS``.

    Falls back to ``roots.default_root()`` (a checkout's ``sample_logs/``, else ``./sample_logs``).  Roots are resolved, de-duplicated and kept in order;
    roots that do not exist are dropped (the Runs page says so).
    """
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--root", action="append", default=[])
    ns, _ = parser.parse_known_args(list(argv))
    raw = list(ns.root)
    raw += [r for r in environ.get(ROOTS_ENV, "").split(os.pathsep) if r.strip()]
    if not raw and default_root() is not None:
        raw = [str(default_root())]
    roots: list[Path] = []
    for r in raw:
        p = Path(r).expanduser().resolve()
        if p not in roots:
            roots.append(p)
    return roots


def roots() -> list[Path]:
    """The roots of this session (parsed once per session, kept in session state)."""
    if "_roots" not in st.session_state:
        st.session_state["_roots"] = [str(p) for p in parse_roots()]
    return [Path(p) for p in st.session_state["_roots"]]


def _inside(path: Path, dirs: Sequence[Path]) -> bool:
    return any(path == d or path.is_relative_to(d) for d in dirs)


def confine(path: str | os.PathLike, allowed: Sequence[Path] | None = None) -> Path:
    """The path the app may read for ``path``, or ``PermissionError`` (see "Security" above).

    Relative paths are taken relative to the first root and may not contain ``..``. Allowed: ``path``
    resolves inside a root, or inside the target of a run that the listing of the roots found as a link
    (:func:`discover`). Returns the path as the listing names it (through the link, not its target), so
    cache keys and labels agree with the Runs page.
    """
    from_session = allowed is None
    allowed = [Path(r).resolve() for r in (roots() if from_session else allowed)]
    if not allowed:
        raise PermissionError("no run roots configured")
    p = Path(path)
    if not p.is_absolute():
        if ".." in p.parts:
            raise PermissionError(f"path {str(path)!r}: '..' is not allowed in a relative run path")
        p = allowed[0] / p
    resolved = p.resolve()
    lexical = Path(os.path.abspath(p))
    listed_here = ".." not in p.parts and _inside(lexical, allowed)
    if _inside(resolved, allowed):
        _check_run_members(resolved, [*allowed, resolved])
        return lexical if listed_here else resolved
    links = dict((discover(tuple(map(str, allowed))) if from_session else _scan(tuple(map(str, allowed))))[1])
    for link, target in links.items():
        if _inside(resolved, [Path(target)]):
            _check_run_members(resolved, [*allowed, Path(target), resolved])
            return Path(link) / resolved.relative_to(target)
    raise PermissionError(
        f"path {str(path)!r} resolves to {resolved}, outside the app's roots ({', '.join(map(str, allowed))}) "
        "and outside every run linked into them, so it was not opened (press Refresh if the link is new)."
    )


def _check_run_members(run: Path, inside: Sequence[Path]) -> None:
    """The same rule one level down: a run's meta.json, its table folders and its scalars files must resolve
    inside ``inside`` (the roots, the run's own target), else ``PermissionError`` - so a meta.json or a
    folder symlinked out of the roots is not read through a run that is inside them."""
    members = [run / n for n in (schema.META_FILE, schema.TOKENS_DIR, schema.SEQUENCES_DIR, schema.SCALARS_DIR,
                                 schema.DONE_DIR)]
    if (run / schema.SCALARS_DIR).is_dir():
        members += sorted((run / schema.SCALARS_DIR).glob("*.jsonl"))
    for m in members:
        if not os.path.lexists(m):
            continue
        target = m.resolve()
        if not _inside(target, inside):
            raise PermissionError(
                f"{m} resolves to {target}, outside the app's roots, so the run {run.name} was not opened "
                "(the files of a run must lie inside the roots too)."
            )


# -- run discovery ---------------------------------------------------------------------------------------


def run_version(path: str) -> tuple:
    """Cheap fingerprint of a run's on-disk state: changes when a step completes or scalars are appended."""
    p = Path(path)
    parts: list[Any] = []
    for name in (schema.META_FILE, schema.DONE_DIR, schema.TOKENS_DIR, schema.SEQUENCES_DIR):
        try:
            s = (p / name).stat()
            parts.append((s.st_mtime_ns, s.st_size))
        except OSError:
            parts.append(None)
    scal = p / schema.SCALARS_DIR
    try:
        parts.append(tuple(sorted((f.name, f.stat().st_size) for f in scal.iterdir())))
    except OSError:
        parts.append(None)
    return tuple(parts)


def _scan(root_strs: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The runs under each root (in root order, then name order) as the listing names them - a run that is
    a symbolic link inside a root keeps its link path - and, for the runs that resolve outside every root,
    (link path, resolved target) pairs: the targets :func:`confine` also admits."""
    dirs = [Path(r) for r in root_strs]
    found: list[str] = []
    links: list[tuple[str, str]] = []
    for r in dirs:
        if not r.is_dir():
            continue
        # Every directory with a meta.json (as cppo_diag.list_runs finds them), also those the reader refuses:
        # the Runs page lists those as unreadable with the reader's one-line reason instead of hiding them.
        candidates = [r] if (r / schema.META_FILE).exists() else []
        candidates += sorted(p for p in r.iterdir() if p.is_dir() and (p / schema.META_FILE).exists())
        for run_path in candidates:
            p = os.path.abspath(run_path)
            if p in found:
                continue
            found.append(p)
            target = Path(p).resolve()
            if not _inside(target, dirs):
                links.append((p, str(target)))
    return tuple(found), tuple(links)


@st.cache_data(ttl=30, max_entries=16, show_spinner=False)
def discover(root_strs: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """:func:`_scan`, cached: the one snapshot of the roots that the listing and :func:`confine` share
    (re-scanned every 30 s and on Refresh)."""
    return _scan(root_strs)


def all_runs() -> list[str]:
    """Paths (str) of the listed runs, as the listing names them."""
    return list(discover(tuple(str(r) for r in roots()))[0])


def label(path: str) -> str:
    """Short display name of a run: its directory name, prefixed by the root's name when there are several."""
    p = Path(path)
    rs = roots()
    if len(rs) > 1:
        for r in rs:
            if p == r or p.is_relative_to(r):
                rel = p.relative_to(r)
                return f"{r.name}/{rel}" if str(rel) != "." else r.name
    return p.name


@st.cache_resource(max_entries=MAX_RUNS, ttl=TTL_S, show_spinner=False)
def _open(path: str, version: tuple):
    from cppo_diag import open_run

    return open_run(path)


def get_run(path: str):
    """The reader's ``Run`` for a confined path (re-opened when the run changed on disk)."""
    p = str(confine(path))
    return _open(p, run_version(p))


# -- cached calls -----------------------------------------------------------------------------------------


def _collect(out: Any) -> Any:
    if isinstance(out, pl.LazyFrame):
        return out.collect()
    if isinstance(out, dict):
        return {k: _collect(v) for k, v in out.items()}
    if isinstance(out, tuple):
        return tuple(_collect(v) for v in out)
    return out


def _analysis_fn(name: str):
    """The public function ``cppo_diag.analyses.<name>``."""
    import types

    from cppo_diag import analyses

    fn = getattr(analyses, name)
    if not callable(fn) or isinstance(fn, types.ModuleType):
        raise TypeError(f"cppo_diag.analyses.{name}: expected a function, found {type(fn).__name__}")
    return fn


@st.cache_data(max_entries=MAX_AGGREGATES, ttl=TTL_S, show_spinner=False)
def _analysis(name: str, path: str, version: tuple, kwargs: tuple) -> Any:
    fn = _analysis_fn(name)
    kw = dict(kwargs)
    if "progress" in inspect.signature(fn).parameters:
        kw.setdefault("progress", False)  # no tqdm bars in the server log
    return _collect(fn(_open(path, version), **kw))


def analysis(name: str, path: str, **kwargs: Any) -> Any:
    """``cppo_diag.analyses.<name>(run, **kwargs)`` on a confined run, collected and cached per (run version, kwargs).

    Keyword values must be hashable (use tuples, not lists).
    """
    p = str(confine(path))
    return _analysis(name, p, run_version(p), tuple(sorted(kwargs.items())))


# What-if: the batches of the chosen steps are rebuilt once and kept (bounded by tokens and entries), so a slider
# move only re-runs the rule on them instead of reading and re-padding the steps again.
WHATIF_BATCH_TOKENS = 2_000_000
MAX_BATCH_SETS = 2


@st.cache_resource(max_entries=MAX_BATCH_SETS, ttl=TTL_S, show_spinner=False)
def _batch_set(path: str, version: tuple, step_range: tuple | None):
    from cppo_diag.analyses.recomputation import load_batches

    return load_batches(_open(path, version), step_range=step_range)


@st.cache_data(max_entries=MAX_AGGREGATES, ttl=TTL_S, show_spinner=False)
def _recompute_steps(path: str, version: tuple, step_range: tuple | None, kwargs: tuple) -> Any:
    from cppo_diag.analyses.recomputation import recompute_cached

    n = run_summary.tokens_in_range(_tokens_per_step(path, version), step_range)
    held = _batch_set(path, version, step_range) if n <= WHATIF_BATCH_TOKENS else None
    kw = dict(kwargs)
    # per-step partials keyed by (run files, rule, params, updates): a slider back at an earlier value, or a
    # page revisited after this cache dropped the entry, reads no token (analyses.recomputation.recompute_cached)
    return recompute_cached(_open(path, version), {"r": (kw["rule"], dict(kw["params"]))}, step_range=step_range,
                            bin_width=kw["bin_width"], batches=held)["r"]


def recompute_steps(path: str, *, rule: str, params: dict[str, Any], step_range: tuple[int, int] | None,
                    bin_width: int) -> Any:
    """``cppo_diag.analyses.recompute(run, rule, params=...)`` on ``step_range`` for slider-driven pages: the steps'
    batches are read and rebuilt once (up to ``WHATIF_BATCH_TOKENS`` tokens; larger ranges stream from disk)
    and each new parameter value only re-runs the rule. The rule's own per-batch metrics are skipped."""
    p = str(confine(path))
    kw = (("bin_width", int(bin_width)), ("params", tuple(sorted(params.items()))), ("rule", rule))
    return _recompute_steps(p, run_version(p), None if step_range is None else tuple(step_range), kw)


@st.cache_data(max_entries=MAX_TOKEN_SLICES, ttl=TTL_S, show_spinner=False)
def _step_tokens(path: str, version: tuple, step: int) -> pl.DataFrame:
    from cppo_diag.analyses.recomputation import iter_step_frames

    for _, frame in iter_step_frames(_open(path, version), step_range=(step, step)):
        return frame
    return pl.DataFrame()


def step_tokens(path: str, step: int) -> pl.DataFrame:
    """All token rows of one step (read only for that step; cached for the last few steps viewed)."""
    p = str(confine(path))
    return _step_tokens(p, run_version(p), int(step))


@st.cache_data(max_entries=MAX_TOKEN_SLICES, ttl=TTL_S, show_spinner=False)
def _step_sequences(path: str, version: tuple, step: int) -> pl.DataFrame:
    run = _open(path, version)
    return run.sequences().filter(pl.col("step") == step).collect()


def step_sequences(path: str, step: int) -> pl.DataFrame:
    """The sequences table rows of one step (prompt, completion, token strings, reward); may be empty."""
    p = str(confine(path))
    try:
        return _step_sequences(p, run_version(p), int(step))
    except (FileNotFoundError, pl.exceptions.ComputeError):
        return pl.DataFrame()


@st.cache_data(max_entries=MAX_RUNS, ttl=TTL_S, show_spinner=False)
def _steps(path: str, version: tuple) -> pl.DataFrame:
    return _open(path, version).steps()


def steps(path: str) -> pl.DataFrame:
    """Per-step scalars of a run (``step`` + one column per scalar name)."""
    p = str(confine(path))
    return _steps(p, run_version(p))


@st.cache_data(max_entries=MAX_RUNS, ttl=TTL_S, show_spinner=False)
def _completed(path: str, version: tuple) -> list[int]:
    return sorted(int(s) for s in _open(path, version).completed_steps())


def completed_steps(path: str) -> list[int]:
    p = str(confine(path))
    return _completed(p, run_version(p))


# -- runs table ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunRow:
    """A row of the Runs page (``cppo_diag.analyses.run_summary.run_summary``) and the run's path."""

    path: str
    name: str
    trainer: str | None
    rule: str | None
    rule_params: str
    model: str | None
    task: str | None
    steps: int
    tokens: int
    last_reward: float | None
    status: str


@st.cache_data(max_entries=MAX_RUNS, ttl=TTL_S, show_spinner=False)
def _run_row(path: str, version: tuple) -> RunRow:
    return RunRow(path=path, **run_summary.run_summary(_open(path, version)))


def run_row(path: str) -> RunRow:
    p = str(confine(path))
    return _run_row(p, run_version(p))


def is_live(path: str) -> bool:
    return get_run(path).is_live


def runs_table(paths: Sequence[str]) -> pl.DataFrame:
    """One row per run with the metadata the Runs page shows."""
    rows = []
    for p in paths:
        try:
            r = run_row(p)
            # Liveness is re-read on every run (a heartbeat can go stale without any file changing).
            status = "live" if is_live(p) else (r.status if r.status != "live" else "stopped")
            rows.append({**r.__dict__, "status": status, "error": ""})
        except Exception as exc:  # a broken run must not hide the others; the table says what is wrong
            error = str(exc) if isinstance(exc, PermissionError) else f"{type(exc).__name__}: {exc}"  # refusals: one sentence
            rows.append({"path": p, "name": Path(p).name, "status": "unreadable", "error": error})
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


# -- selection shared across pages -----------------------------------------------------------------------

SELECTED = "selected_runs"  # session-state key of the multiselect in the sidebar (list of run paths)
FOCUS = "focus_run"  # the run single-run pages show


def selected() -> list[str]:
    avail = set(all_runs())
    return [p for p in st.session_state.get(SELECTED, []) if p in avail]


def clear_all_caches() -> None:
    discover.clear()
    for fn in (_analysis, _recompute_steps, _step_tokens, _step_sequences, _steps, _completed, _run_row):
        fn.clear()
    _open.clear()
    _batch_set.clear()


# -- small per-run facts -----------------------------------------------------------------------------------


@st.cache_data(max_entries=MAX_RUNS, ttl=TTL_S, show_spinner=False)
def _token_columns(path: str, version: tuple) -> list[str]:
    return list(_open(path, version).tokens().collect_schema().names())


def token_columns(path: str) -> list[str]:
    p = str(confine(path))
    return _token_columns(p, run_version(p))


@st.cache_data(max_entries=MAX_RUNS, ttl=TTL_S, show_spinner=False)
def _max_position(path: str, version: tuple) -> int:
    return run_summary.max_position(_open(path, version))


def max_position(path: str) -> int:
    p = str(confine(path))
    return _max_position(p, run_version(p))


@st.cache_data(max_entries=MAX_RUNS, ttl=TTL_S, show_spinner=False)
def _token_steps(path: str, version: tuple) -> list[int]:
    return run_summary.token_steps(_open(path, version))


def token_steps(path: str) -> list[int]:
    """Steps that have token rows (complete or not)."""
    p = str(confine(path))
    return _token_steps(p, run_version(p))


@st.cache_data(max_entries=MAX_AGGREGATES, ttl=TTL_S, show_spinner=False)
def _compare_one(path: str, version: tuple, name: str, kwargs: tuple) -> Any:
    return _collect(_analysis_fn("compare_runs")([_open(path, version)], names=[name], progress=False, **dict(kwargs)))


def compare_one(path: str, **kwargs: Any):
    """``cppo_diag.analyses.compare_runs([run], ...)`` for one run (cached per run, so adding a run to a comparison
    computes only that run)."""
    p = str(confine(path))
    return _compare_one(p, run_version(p), label(p), tuple(sorted(kwargs.items())))


def _rule_frame(batches, rule: str, params: dict, anchor: str) -> pl.DataFrame:
    """``cppo_diag.analyses.recomputation.run_rule`` on each batch, one row per valid token (``Batch.token_frame``): sequence
    key, pos, keep, reason and the rule's internals (per-token ones, and per-sequence ones broadcast to their
    tokens; internals of other shapes are left out)."""
    import numpy as np
    import torch

    from cppo_diag.analyses.recomputation import run_rule

    parts = []
    for batch in batches:
        res = run_rule(batch, rule, dict(params), anchor=anchor, return_internals=True)
        internals = {name: t.detach().cpu().numpy().astype(np.float32) for name, t in (res.internals or {}).items()}
        parts.append(batch.token_frame({"keep": res.keep.bool(), "reason": res.reason.to(torch.uint8), **internals},
                                       skip_other_shapes=True))
    return pl.concat(parts, how="diagonal_relaxed") if parts else pl.DataFrame()


def _anchor(path: str, version: tuple) -> str:
    return (_open(path, version).meta or {}).get("anchor") or "rollout"


@st.cache_data(max_entries=MAX_TOKEN_SLICES, ttl=TTL_S, show_spinner=False)
def _step_rule(path: str, version: tuple, step: int, rule: str, params: tuple) -> pl.DataFrame:
    batches = _open(path, version).batches(step_range=(step, step))
    return _rule_frame(batches, rule, dict(params), _anchor(path, version))


@st.cache_data(max_entries=MAX_AGGREGATES, ttl=TTL_S, show_spinner=False)
def _sequence_rule(path: str, version: tuple, step: int, update: int, rank: int, seq_id: int, rule: str,
                   params: tuple) -> pl.DataFrame:
    from cppo_diag.storage import batch_from_frame

    frame = _step_tokens(path, version, step).filter(
        (pl.col("update") == update) & (pl.col("rank") == rank) & (pl.col("seq_id") == seq_id))
    if frame.height == 0:
        return pl.DataFrame()
    return _rule_frame([batch_from_frame(frame)], rule, dict(params), _anchor(path, version))


def sequence_rule(path: str, step: int, update: int, rank: int, seq_id: int, rule: str,
                  params: dict[str, Any]) -> pl.DataFrame:
    """``rule`` recomputed on one response only (a one-row batch; the CPPO family works per response, and
    the row keeps its seq_id so ``cppo_shuffled``'s seeded permutation matches), with its internals."""
    p = str(confine(path))
    return _sequence_rule(p, run_version(p), int(step), int(update), int(rank), int(seq_id), rule,
                          tuple(sorted(params.items())))


def step_rule(path: str, step: int, rule: str, params: dict[str, Any]) -> pl.DataFrame:
    """``rule`` recomputed on one step (``cppo_diag.analyses.recomputation.run_rule`` per batch), one row per token:
    sequence key, pos, keep, reason and the rule's internals (cppo: w, Z, S, c, delta_b)."""
    p = str(confine(path))
    return _step_rule(p, run_version(p), int(step), rule, tuple(sorted(params.items())))


@st.cache_data(max_entries=MAX_RUNS, ttl=TTL_S, show_spinner=False)
def _tokens_per_step(path: str, version: tuple) -> dict[int, int]:
    return run_summary.tokens_per_step(_open(path, version))


def tokens_per_step(path: str) -> dict[int, int]:
    """step -> number of token rows (one scan of the ``step`` column, cached per run version)."""
    p = str(confine(path))
    return _tokens_per_step(p, run_version(p))


def recent_window(path: str, max_tokens: int) -> tuple[int, int] | None:
    """The latest steps whose tokens add up to at most ``max_tokens`` (``cppo_diag.analyses.run_summary.recent_window``):
    the default window of the pages that recompute rules, so that their first answer comes fast on big runs."""
    return run_summary.recent_window(tokens_per_step(path), max_tokens)
