"""Open the cppo-diag browser app (Streamlit) on one or more run roots.

A run root is a directory holding run directories (each with a meta.json), or a run directory itself.
With no --root the app opens the bundled ``sample_logs/`` of the repository.  The server binds to
127.0.0.1 only; paths the app reads are confined to the roots given here.

Pages: Runs (metadata, selection), Divergence by position (paper Fig. 2), Budget (Fig. 7), Compare runs,
Token inspector, What-if (recompute a rule with other parameters on selected steps).

Examples:
  cppo-diag app                                  # bundled sample_logs/, opens http://127.0.0.1:8501
  cppo-diag app --root runs --root sample_logs   # several roots
  cppo-diag app --root runs --port 8600 --no-browser
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Iterator
from pathlib import Path

from cppo_diag import app
from cppo_diag.app.roots import ROOTS_ENV, default_root_candidates
from cppo_diag.app.roots import default_root as find_default_root

HELP = "open the browser app (Streamlit) on run roots; default: the bundled sample_logs/"

HOST = "127.0.0.1"
ALLOWED_HOSTS = (HOST, "localhost")  # Host header names the websocket accepts (Streamlit's server.allowedHosts)
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class PortInUseError(OSError):
    """The app's port on 127.0.0.1 is taken (often by an app server a previous command left running)."""


def app_script() -> Path:
    """Path of the Streamlit entry script (``app/streamlit_app.py``)."""
    return Path(app.__file__).resolve().parent / "streamlit_app.py"


def default_root() -> Path:
    """The bundled ``sample_logs/`` of a source checkout, else ``./sample_logs`` (``cppo_diag.app.roots``)."""
    found = find_default_root()
    if found is None:
        looked = " and ".join(str(c) for c in default_root_candidates())
        raise FileNotFoundError(f"no --root given and no sample_logs/ found (looked in {looked}); pass --root DIR")
    return found


def _check_roots(roots: list[str], allow_missing: bool = False) -> list[str]:
    out = []
    for r in roots:
        p = Path(r).expanduser().resolve()
        if p.exists() and not p.is_dir():
            raise FileNotFoundError(f"--root {r!r}: expected a directory, found a file at {p}")
        if not p.exists() and not allow_missing:
            raise FileNotFoundError(f"--root {r!r}: expected an existing directory, found nothing at {p}")
        out.append(str(p))
    return out


def server_command(roots: list[str], port: int) -> list[str]:
    """The ``streamlit run`` command line (headless, 127.0.0.1 only, no telemetry, no file watcher)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(app_script()),
        "--server.address", HOST,
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--browser.gatherUsageStats", "false",
        "--browser.serverAddress", HOST,
        "--client.toolbarMode", "minimal",
        # DNS rebinding: the websocket (all the app's data) answers only a Host naming this machine, and, with
        # CORS and XSRF protection on, only a same-origin page; a config.toml cannot turn these off.
        *[a for h in ALLOWED_HOSTS for a in ("--server.allowedHosts", h)],
        "--server.enableCORS", "true",
        "--server.enableXsrfProtection", "true",
        "--",
        *[a for r in roots for a in ("--root", r)],
    ]


def wait_until_healthy(port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Poll Streamlit's health endpoint until it answers 'ok' (raises on timeout or server exit)."""
    url = f"http://{HOST}:{port}/_stcore/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"streamlit server exited with code {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"streamlit server did not answer {url} within {timeout:.0f} s")


def check_port_free(port: int) -> None:
    """Raise :class:`PortInUseError` with what to do when ``HOST:port`` cannot be bound (the same bind the
    server makes, with ``SO_REUSEADDR`` as Tornado sets it, so a closed server's TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as exc:
            raise PortInUseError(
                f"port {port} on {HOST} is already in use ({exc.strerror}); another `cppo-diag app` or "
                f"`cppo-diag demo` may still be running: stop it, or pass --port with a free port"
            ) from exc


def _die_with_parent(parent: int):
    """``preexec_fn`` of the server (Linux): the kernel sends it SIGTERM when the process that started it
    ends, however it ends (even SIGKILL, which no handler sees). Elsewhere a no-op: :func:`serving` still
    stops the server on signals and exceptions. ``prctl`` is looked up here, in the parent, so the child
    (between fork and exec) only makes the call."""
    prctl = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_pdeathsig() -> None:
        if prctl is None:
            return
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent ended before prctl took effect
            os._exit(1)

    return set_pdeathsig


def launch(roots: list[str], port: int = 8501, open_browser: bool = False, *, quiet: bool = False,
           allow_missing: bool = False) -> subprocess.Popen:
    """Start the app server on 127.0.0.1:``port`` over ``roots`` and return the process (not waited on).

    ``roots`` empty -> the bundled sample_logs/.  The roots travel in the ``CPPO_DIAG_ROOTS`` environment
    variable and as ``--root`` script arguments.  ``allow_missing``: accept roots that do not exist yet (a
    trainer about to write into them; the app lists them once they appear, on Refresh or the Auto timer).
    With ``open_browser`` the default browser is opened once the server answers.  ``quiet`` discards the
    server's output.  Raises :class:`PortInUseError` when the port is taken.  The caller owns the process:
    prefer :func:`serving`, which stops it on every way out; on Linux the server also gets SIGTERM when the
    calling thread's process ends.
    """
    roots = _check_roots(roots, allow_missing) if roots else [str(default_root())]
    check_port_free(port)
    env = dict(os.environ)
    env[ROOTS_ENV] = os.pathsep.join(roots)
    env.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(server_command(roots, port), env=env, stdout=out, stderr=out,
                            preexec_fn=_die_with_parent(os.getpid()))
    if open_browser:
        open_when_ready(port, proc)
    return proc


def open_when_ready(port: int, proc: subprocess.Popen) -> None:
    """Open the default browser on the app once the server answers (a message, not an error, if it never does)."""
    try:
        wait_until_healthy(port, proc)
        webbrowser.open(f"http://{HOST}:{port}")
    except (RuntimeError, TimeoutError) as exc:
        print(f"cppo-diag app: {exc}", file=sys.stderr)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate the server (SIGTERM: Streamlit shuts down and frees its port), kill it after ``timeout``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise ``KeyboardInterrupt`` inside the block, so ``finally`` clauses run
    when the process is stopped by Ctrl-C, ``kill``, a service manager or a closed terminal; the previous
    handlers come back afterwards. SIGINT is caught even where the shell started the process with it
    ignored (a background job of a non-interactive shell: ``cmd &`` in a script), which otherwise makes
    ``kill -INT`` do nothing; a SIGHUP that ``nohup`` ignores stays ignored. Main thread only (elsewhere
    the block runs unchanged)."""
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    previous = {}
    try:
        for sig in STOP_SIGNALS:
            if sig != signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            previous[sig] = signal.signal(sig, _raise)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def serving(roots: list[str], port: int = 8501, open_browser: bool = False, **kwargs) -> Iterator[subprocess.Popen]:
    """:func:`launch` the server for the duration of the block and stop it on every way the block ends:
    normally, by an exception, by SIGINT, SIGTERM or SIGHUP (see :func:`interrupt_on_signals`)."""
    with interrupt_on_signals():
        proc = launch(roots, port=port, **kwargs)
        try:
            if open_browser:
                open_when_ready(port, proc)
            yield proc
        finally:
            stop(proc)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root", action="append", default=[], metavar="DIR",
        help="directory of runs (or one run) to browse; repeat for several roots (default: bundled sample_logs/)",
    )
    parser.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1 (default: 8501)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a web browser")


def run(args: argparse.Namespace) -> int:
    if not _has_streamlit():
        print("cppo-diag app: streamlit is not installed (pip install streamlit)", file=sys.stderr)
        return 1
    try:
        with serving(args.root, port=args.port, open_browser=not args.no_browser) as proc:
            print(f"cppo-diag app: serving on http://{HOST}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
            try:
                return proc.wait()
            except KeyboardInterrupt:
                return 0
    except (FileNotFoundError, PortInUseError) as exc:
        print(f"cppo-diag app: {exc}", file=sys.stderr)
        return 2


def _has_streamlit() -> bool:
    try:
        import streamlit  # noqa: F401
    except ImportError:
        return False
    return True
