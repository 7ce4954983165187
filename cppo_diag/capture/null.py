"""``NullRecorder``: the disabled recorder (a null object with RunRecorder's methods, all no-ops).

Use it instead of ``if recorder is not None`` checks around every call::

    rec = RunRecorder(out_dir, ...) if args.record else NullRecorder()
"""

from __future__ import annotations

from typing import Any


class NullRecorder:
    """Records nothing. ``is_done`` is always False so a trainer never skips work because of it."""

    run_dir = None
    name = None
    rank = 0
    stats: dict[str, Any] = {}

    def log_tokens(self, **kwargs) -> None:
        pass

    def log_scalars(self, step: int, values) -> None:
        pass

    def log_sequences(self, **kwargs) -> None:
        pass

    def log_figure(self, step: int, tag: str, figure) -> None:
        pass

    has_sinks = False

    def end_step(self, step: int) -> None:
        pass

    def is_done(self, step: int) -> bool:
        return False

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, status: str = "finished") -> None:
        pass

    def __enter__(self) -> "NullRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass

    def __bool__(self) -> bool:  # lets `if rec:` read naturally
        return False

    def __repr__(self) -> str:
        return "NullRecorder()"
