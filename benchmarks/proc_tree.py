"""Peak RSS and CPU seconds of a child process and its descendants, sampled every 20 ms on a thread (the
benchmark scripts beside it import it: ``python benchmarks/x.py`` puts this folder on ``sys.path``)."""

from __future__ import annotations

import threading


class TreeSampler:
    """``with TreeSampler(pid) as s: ...``: afterwards ``s.peak_rss`` (bytes, the largest sum over the tree) and
    ``s.cpu`` (pid -> last seen user + system seconds, for descendants that ``wait4`` does not reap)."""

    def __init__(self, pid: int, every_s: float = 0.02):
        self.pid, self.every_s = pid, every_s
        self.peak_rss, self.cpu = 0, {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._done.is_set():
            rss = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        rss += p.memory_info().rss
                        t = p.cpu_times()
                        self.cpu[p.pid] = t.user + t.system
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.peak_rss = max(self.peak_rss, rss)
            self._done.wait(self.every_s)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
