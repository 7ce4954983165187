"""Scalar sinks: mirror a run's step scalars to TensorBoard and Weights & Biases.

``RunRecorder(..., sinks=["tensorboard", "wandb"])`` sends every ``log_scalars(step, values)`` to the open
sinks as well as to ``scalars/rank{r}.jsonl`` (our record stays the source of truth). The calls run on the
recorder's writer thread, so the training thread never waits on a sink, and a tensor scalar is read
(``.item()``) there too.

* ``tensorboard``: an event file in ``RUN/tensorboard/`` written with ``torch.utils.tensorboard.SummaryWriter``
  (needs the ``tensorboard`` package: ``pip install 'cppo-diag[tensorboard]'``). Each value is a scalar
  with our metric name as its tag and the step as its step; ``meta.json`` is stored as the text summary
  ``meta.json`` and, flattened to ``config.optim.lr``-style keys, as the run's HParams.
* ``wandb``: one W&B run per recorder session, files under ``RUN/wandb/``; metric names and steps as ours,
  ``meta.json`` as the run config. Mode: ``WANDB_MODE`` when set, else ``offline`` when no API key is
  found (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE`` or a ``~/.netrc``/``$NETRC`` entry for the W&B host) or the
  host does not answer within 2 s, else ``online``. ``pip install 'cppo-diag[wandb]'``.

Figures (``RunRecorder.log_figure``; the trainer's and plug-ins' divergence-by-position figure,
``cppo_diag.capture.position_live``) are drawn once, on the writer thread, to an RGB image: a TensorBoard image
summary (``add_image``, tag as given) and a ``wandb.Image`` under the same key at the same step.

Values our record stores as null (NaN/Inf) and strings are not sent. A sink that fails to open (package
missing, no permission) or to write warns once (``RecorderWarning``, counted in ``rec.stats["warnings"]``
as ``sink/<name>``) and is switched off; training and our own record carry on, whatever ``on_error`` says.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/events.out.tfevents.*
WANDB_DIR = "wandb"  # RUN/wandb/{offline-,}run-<time>-<id>/run-<id>.wandb (W&B names the inner folders)
WANDB_DEFAULT_PROJECT = "cppo-diag"


def _number(v: Any) -> float | None:
    """A scalar as a finite float, or None for what our record stores as null (NaN/Inf, None, strings)."""
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        v = float(v)
        return v if math.isfinite(v) else None
    return None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"config": {"optim": {"lr": 1e-3}}}`` -> ``{"config.optim.lr": 1e-3}``; lists and None become strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


def _require(module: str, extra: str):
    """Import ``module``; when it is missing, say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{exc} (install it with: pip install 'cppo-diag[{extra}]')") from exc


class TensorBoardSink:
    """Scalars into ``RUN/tensorboard/``; ``meta.json`` as a text summary and as HParams."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, meta: Mapping[str, Any]):
        SummaryWriter = _require("torch.utils.tensorboard", "tensorboard").SummaryWriter
        hparams = _require("torch.utils.tensorboard.summary", "tensorboard").hparams
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=10)
        text = json.dumps(dict(meta), indent=2, sort_keys=True, default=str)
        self._writer.add_text("meta.json", "\n".join("    " + line for line in text.splitlines()))  # markdown code
        for summary in hparams(flatten(meta), {}):  # experiment, session start, session end
            self._writer.file_writer.add_summary(summary)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, v in values.items():
            self._writer.add_scalar(name, v, global_step=step)

    def log_image(self, step: int, tag: str, image) -> None:
        self._writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self._writer.close()


def _wandb_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def _wandb_has_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc

    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")  # where `wandb login` saves
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, timeout: float = 2.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def wandb_mode(reachable: Callable[[str], bool] = _reachable) -> str:
    """``WANDB_MODE`` when set; ``offline`` without an API key or without a connection; else ``online``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    host = _wandb_host()
    if not _wandb_has_key(host) or not reachable(host):
        return "offline"
    return "online"


class WandbSink:
    """Scalars into a W&B run (``RUN/wandb/``), ``meta.json`` as its config."""

    name = "wandb"

    def __init__(self, run_dir: Path, meta: Mapping[str, Any]):
        wandb = _require("wandb", "wandb")
        self.mode = wandb_mode()
        self.dir = Path(run_dir)
        # create_new: never finish or replace a W&B run the trainer itself has open (TRL report_to="wandb").
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", WANDB_DEFAULT_PROJECT), name=str(meta.get("name") or self.dir.name),
            config=dict(meta), dir=str(self.dir), mode=self.mode, reinit="create_new",
            settings=wandb.Settings(console="off", quiet=True),
        )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def log_image(self, step: int, tag: str, image) -> None:
        import wandb

        self._run.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        self._run.finish()


SINKS: dict[str, type] = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


SINK_EXTRAS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def figure_rgb(fig) -> "np.ndarray":
    """A matplotlib ``Figure`` (or an (H, W, 3|4) array) as an (H, W, 3) uint8 RGB array."""
    import numpy as np

    if isinstance(fig, np.ndarray):
        return np.ascontiguousarray(fig[..., :3]).astype(np.uint8, copy=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3)


def check_sinks_installed(names: Sequence[str] | None, owner: str = "sinks") -> list[str]:
    """``check_sink_names``, then each sink's package importable, else one line naming the extra to install
    (for plug-ins, which check their configuration before a model loads)."""
    import importlib.util

    out = check_sink_names(names)
    for n in out:
        module, extra = SINK_EXTRAS[n]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ImportError(f"{owner}: sink {n!r} needs the {module.split('.')[-1]} package; "
                              f"install it with: pip install 'cppo-diag[{extra}]'")
    return out


def check_sink_names(names: Sequence[str] | None) -> list[str]:
    """The requested sink names, validated (unknown names raise and list the known ones)."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    out = []
    for n in names:
        if n not in SINKS:
            raise ValueError(f"sinks: expected names from {sorted(SINKS)}, found {n!r}")
        if n not in out:
            out.append(n)
    return out


class ScalarSinks:
    """The open sinks of one recorder. Never raises: a failing sink warns once through ``warn`` and is closed.

    ``warn(kind, message)`` is the recorder's warn-once hook.
    """

    def __init__(self, names: Sequence[str], run_dir: Path, meta: Mapping[str, Any],
                 warn: Callable[[str, str], None]):
        self._warn = warn
        self.sinks: dict[str, Any] = {}
        for name in check_sink_names(names):
            try:
                self.sinks[name] = SINKS[name](Path(run_dir), meta)
            except Exception as exc:  # noqa: BLE001 - a sink never stops training
                self._disable(name, "cannot open", exc)

    def _disable(self, name: str, what: str, exc: BaseException) -> None:
        sink = self.sinks.pop(name, None)
        if sink is not None:
            try:
                sink.close()
            except Exception:  # noqa: BLE001
                pass
        self._warn(f"sink/{name}", f"{what} the {name} sink ({type(exc).__name__}: {exc}); it is off for the rest "
                                   "of this run, the run's own scalars are still recorded")

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Send ``values`` (finite numbers only; see ``_number``) for ``step`` to every open sink."""
        nums = {str(k): x for k, v in values.items() if (x := _number(v)) is not None}
        if not nums:
            return
        for name, sink in list(self.sinks.items()):
            try:
                sink.log(int(step), nums)
            except Exception as exc:  # noqa: BLE001
                self._disable(name, "cannot write to", exc)

    def log_figure(self, step: int, tag: str, figure) -> None:
        """Draw ``figure`` (a matplotlib Figure, an RGB array, or a zero-argument callable returning either;
        ``position_live.PositionFigure`` has ``render``) once and send it to every open sink as an image."""
        if not self.sinks:
            return
        try:
            if hasattr(figure, "render"):
                figure = figure.render()
            elif callable(figure):
                figure = figure()
            image = figure_rgb(figure)
        except Exception as exc:  # noqa: BLE001 - a figure never stops training
            self._warn("sink/figure", f"cannot draw figure {tag!r} at step {step} ({type(exc).__name__}: {exc}); "
                                      "it is not sent, the run's own scalars are still recorded")
            return
        for name, sink in list(self.sinks.items()):
            try:
                sink.log_image(int(step), str(tag), image)
            except Exception as exc:  # noqa: BLE001
                self._disable(name, "cannot write to", exc)

    def close(self) -> None:
        for name, sink in list(self.sinks.items()):
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001
                self.sinks.pop(name, None)
                self._warn(f"sink/{name}", f"cannot close the {name} sink ({type(exc).__name__}: {exc})")
        self.sinks.clear()
