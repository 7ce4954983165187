"""A run's metadata (``RUN/meta.json``, fields in ``schema.META_KEYS``): the one reader and writer.

    meta = read_meta(run_dir)          # RunMeta, validated: schema_version and the type of every field it reads
    meta.rule, meta.rule_params, meta.anchor, meta.status, meta.config, meta.name, meta.trainer, ...
    is_run_dir(path)                   # does ``path`` hold a meta.json (is it a run directory)?
    update_meta(run_dir, status="halted", doctor={...})   # read, change, write atomically

``RunMeta`` is a ``dict`` (the file's JSON object as written, so ``json.dumps`` and ``meta.get`` keep working)
with typed properties that carry the format's defaults: ``anchor`` is "rollout" when absent, ``rule_params`` and
``config`` are ``{}``, ``status`` is None. Every module reads run metadata through here; only the capture
recorder and the importers write new runs (through :func:`write_meta`).
"""

from __future__ import annotations

import json
from pathlib import Path

from cppo_diag.storage import layout, schema

__all__ = ["RunMeta", "RunFormatError", "new_meta", "read_meta", "write_meta", "update_meta", "is_run_dir",
           "meta_path", "DEFAULT_ANCHOR"]

DEFAULT_ANCHOR = "rollout"  # what a run without an "anchor" field anchored its rules to (SPEC "Notation")


class RunFormatError(ValueError):
    """The directory is not a readable run (the message says which file and what was expected)."""


# meta.json fields the readers use, with the JSON types schema.META_KEYS gives them (null is always allowed).
_FIELD_TYPES = (("rule_params", dict, "a JSON object"), ("config", dict, "a JSON object"),
                ("rule", str, "a string"), ("name", str, "a string"), ("status", str, "a string"),
                ("anchor", str, "a string"), ("trainer", str, "a string"), ("model", str, "a string"),
                ("task", str, "a string"))


def meta_path(run_dir: str | Path) -> Path:
    """``RUN/meta.json``."""
    return Path(run_dir) / schema.META_FILE


def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` holds a meta.json (a run directory, readable or not)."""
    return meta_path(path).is_file()


class RunMeta(dict):
    """meta.json of one run: the JSON object, plus typed properties with the format's defaults.

    Build one with :func:`read_meta` (validated) or ``RunMeta.check(obj, where)``; ``RunMeta()`` is the empty
    metadata of a source that has none (a frame in memory)."""

    @classmethod
    def check(cls, obj, where: str = schema.META_FILE, *, version: bool = True) -> "RunMeta":
        """``obj`` as RunMeta, or RunFormatError naming ``where``, the field, what was expected and what was found
        (``version=False``: the schema_version is not checked)."""
        if not isinstance(obj, dict):
            raise RunFormatError(f"{where}: expected a JSON object, found {type(obj).__name__}")
        found = obj.get("schema_version")
        if version and found != schema.SCHEMA_VERSION:
            newer = isinstance(found, int) and not isinstance(found, bool) and found > schema.SCHEMA_VERSION
            raise RunFormatError(f"{where}: schema_version expected {schema.SCHEMA_VERSION}, found {found!r}"
                                 + (" (written by a newer cppo-diag; upgrade)" if newer else ""))
        for key, types, want in _FIELD_TYPES:
            if obj.get(key) is not None and not isinstance(obj[key], types):
                raise RunFormatError(f"{where}: field '{key}' expected {want}, found "
                                     f"{type(obj[key]).__name__} {json.dumps(obj[key])[:60]}")
        return cls(obj)

    @property
    def schema_version(self) -> int | None:
        return self.get("schema_version")

    @property
    def name(self) -> str | None:
        """The run's name as written (None: the directory's name stands for it)."""
        return self.get("name") or None

    @property
    def trainer(self) -> str | None:
        return self.get("trainer")

    @property
    def rule(self) -> str | None:
        """The registered rule the trainer applied (None: not recorded)."""
        return self.get("rule")

    @property
    def rule_params(self) -> dict:
        """The applied rule's keyword arguments ({} when absent); a copy."""
        return dict(self.get("rule_params") or {})

    @property
    def anchor(self) -> str:
        """What the applied rule's ratio was anchored to: "rollout" (mu, the default) or "old" (pi_old)."""
        return self.get("anchor") or DEFAULT_ANCHOR

    @property
    def status(self) -> str | None:
        """'running' | 'finished' | 'failed' | 'halted', None when not recorded."""
        return self.get("status")

    @property
    def config(self) -> dict:
        """The trainer's free-form resolved config ({} when absent)."""
        return self.get("config") or {}

    @property
    def model(self) -> str | None:
        return self.get("model")

    @property
    def task(self) -> str | None:
        return self.get("task")


def new_meta(*, name: str, trainer: str, rule: str | None = None, rule_params: dict | None = None,
             model: str | None = None, task: str | None = None, anchor: str = DEFAULT_ANCHOR,
             config: dict | None = None, status: str = "running") -> RunMeta:
    """The metadata of a new run (``schema.META_KEYS``): this writer's schema_version and the creation time."""
    from datetime import datetime, timezone

    return RunMeta(schema_version=schema.SCHEMA_VERSION, name=name, created=datetime.now(timezone.utc).isoformat(),
                   trainer=trainer, rule=rule, rule_params=dict(rule_params or {}), model=model, task=task,
                   anchor=anchor, config=dict(config or {}), status=status)


def read_meta(run_dir: str | Path, *, version: bool = True) -> RunMeta:
    """``RUN/meta.json`` validated (RunFormatError naming the file and field when it is missing or malformed)."""
    path = meta_path(run_dir)
    if not path.exists():
        raise RunFormatError(f"not a run: {Path(run_dir)} has no {schema.META_FILE}")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunFormatError(f"{path}: cannot parse JSON ({exc})") from exc
    return RunMeta.check(obj, str(path), version=version)


def write_meta(run_dir: str | Path, meta: dict, *, exclusive_tag: str | None = None) -> bool:
    """Write ``RUN/meta.json`` atomically. ``exclusive_tag``: create it only if absent (another writer's file is
    never clobbered; the temp file carries the tag); returns whether this call wrote it."""
    path = meta_path(run_dir)
    if exclusive_tag is not None:
        return layout.create_json_if_absent(path, dict(meta), tag=exclusive_tag)
    layout.atomic_write_json(path, dict(meta))
    return True


def update_meta(run_dir: str | Path, **fields) -> RunMeta | None:
    """Set ``fields`` in an existing ``RUN/meta.json`` (atomically); None when the run has no meta.json."""
    if not is_run_dir(run_dir):
        return None
    meta = read_meta(run_dir, version=False)
    meta.update(fields)
    write_meta(run_dir, meta)
    return meta
