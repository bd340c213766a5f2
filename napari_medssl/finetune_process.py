"""Run a training generator in a separate process and relay its events (no Qt, no napari).

The viewer must stay responsive while a model trains: on a 2-core machine a training *thread* fights the GUI
for the GIL and the CPU, so fine-tuning runs in a child process started with the ``spawn`` context. The child
iterates a generator of plain event dicts (see the engine's event contract in ``napari_medssl/README.md``) and
puts each event on a queue; the parent polls the queue from a GUI timer (:meth:`TrainingProcess.poll`) or
iterates :meth:`TrainingProcess.events`.

- :meth:`TrainingProcess.stop` ends the child and everything it started within ~2 s: the child leads its own
  process group, which gets SIGTERM and then SIGKILL.
- The child watches its parent and exits when the parent disappears (a crashed viewer leaves no orphan).
- Exceptions in the child arrive as ``{"event": "error", "message", "traceback"}``; a child that dies without a
  ``done`` or ``error`` event (killed, out of memory) is reported the same way.

The target is named ``"module:function"`` so the child imports it itself (nothing unpicklable crosses over);
its keyword arguments must be picklable (numpy arrays, numbers, strings, paths).
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# the annotations -> samples conversion and the fine-tuning target live in annotation_samples (re-exported here)
from napari_medssl.annotation_samples import (  # noqa: F401
    UNLABELLED,
    classification_samples,
    finetune_events,
    segmentation_samples,
)

TERMINAL_EVENTS = ("done", "error", "stopped")
_LIVE: weakref.WeakSet = weakref.WeakSet()


def stop_all(timeout: float = 2.0) -> int:
    """Stop every training process this interpreter started and that still runs; return how many.

    Registered with ``atexit``, so quitting the viewer never leaves training behind.
    """
    live = [p for p in list(_LIVE) if p.is_alive()]
    for proc in live:
        proc.stop(timeout)
    return len(live)


atexit.register(stop_all)


def resolve_target(target: str) -> Callable[..., Iterator[dict]]:
    """Import ``"package.module:function"`` and return the function.

    Raises:
        ValueError: the name is not of the form ``module:function`` or does not resolve.
    """
    if not isinstance(target, str) or target.count(":") != 1:
        raise ValueError(f"target must be 'module:function', got {target!r}")
    mod_name, fn_name = target.split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot resolve training target {target!r}: {err}") from None
    if not callable(fn):
        raise ValueError(f"training target {target!r} is not callable")
    return fn


def _watch_parent(parent_pid: int) -> None:
    """End the child and its own children as soon as the parent is gone (re-parented to init or a subreaper)."""
    while True:
        if os.getppid() != parent_pid:
            if hasattr(os, "killpg") and os.getpgrp() == os.getpid():
                os.killpg(os.getpgrp(), signal.SIGKILL)  # this process leads the group: the whole tree
            os._exit(3)
        time.sleep(0.25)


def _child_main(
    target: str, kwargs: dict[str, Any], events: Any, parent_pid: int, num_threads: int | None, nice: int
) -> None:
    """Entry point of the training process: iterate the target and queue every event."""
    if hasattr(os, "setsid"):
        os.setsid()  # lead a process group, so stop() can end the whole tree
    if nice and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError:
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        for event in resolve_target(target)(**kwargs):
            events.put(dict(event))
    except BaseException as err:  # everything, including KeyboardInterrupt, is reported to the viewer
        events.put(
            {"event": "error", "message": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        )
    finally:
        events.close()
        events.join_thread()


def default_num_threads() -> int:
    """Threads for the training process: every core but one, which stays free for the viewer."""
    return max(1, (os.cpu_count() or 2) - 1)


class TrainingProcess:
    """A training generator running in a child process.

    Args:
        target: ``"module:function"``; the function takes ``**kwargs`` and returns an iterator of event dicts.
        kwargs: picklable keyword arguments for the target.
        num_threads: torch threads in the child; default :func:`default_num_threads`.
        nice: niceness added to the child (POSIX), so the GUI wins the CPU when both want it.

    Example:
        >>> proc = TrainingProcess("napari_medssl.annotation_samples:finetune_events", dict(...))
        >>> proc.start()
        >>> for ev in proc.events():
        ...     print(ev)
    """

    def __init__(
        self,
        target: str,
        kwargs: dict[str, Any] | None = None,
        num_threads: int | None = None,
        nice: int = 5,
    ) -> None:
        resolve_target(target)  # fail early, in the caller, for a bad name
        self.target = target
        self.kwargs = dict(kwargs or {})
        self.num_threads = num_threads if num_threads is not None else default_num_threads()
        self.nice = int(nice)
        self._ctx = mp.get_context("spawn")
        self._queue: Any = None
        self._proc: Any = None
        self._finished = False
        self._stopped = False
        self.last_event: dict | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> TrainingProcess:
        """Start the child process.

        Raises:
            RuntimeError: already started.
        """
        if self._proc is not None:
            raise RuntimeError("this TrainingProcess was already started; make a new one")
        self._queue = self._ctx.Queue()
        self._proc = self._ctx.Process(
            target=_child_main,
            args=(self.target, self.kwargs, self._queue, os.getpid(), self.num_threads, self.nice),
            name="medssl-training",
            daemon=True,
        )
        self._proc.start()
        _LIVE.add(self)
        return self

    @property
    def pid(self) -> int | None:
        """The child's process id (``None`` before :meth:`start`)."""
        return None if self._proc is None else self._proc.pid

    def is_alive(self) -> bool:
        """Whether the child process is running."""
        return self._proc is not None and self._proc.is_alive()

    @property
    def finished(self) -> bool:
        """Whether a terminal event (``done``, ``error``, ``stopped``) was delivered."""
        return self._finished

    @property
    def exitcode(self) -> int | None:
        """The child's exit code, ``None`` while it runs; negative for a signal."""
        return None if self._proc is None else self._proc.exitcode

    def stop(self, timeout: float = 2.0) -> float:
        """End the child and its process group; return the seconds it took.

        SIGTERM first, SIGKILL for whatever is left after ``timeout / 2``. Safe to call twice or before start.
        """
        t0 = time.perf_counter()
        if self._proc is None or self._proc.exitcode is not None:
            self._stopped = self._stopped or not self._finished
            return 0.0
        self._stopped = True
        pid = self._proc.pid
        self._signal_tree(pid, signal.SIGTERM)
        self._proc.join(timeout / 2)
        if self._proc.exitcode is None:
            self._signal_tree(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
            self._proc.join(timeout / 2)
        self._signal_tree(pid, getattr(signal, "SIGKILL", signal.SIGTERM), group_only=True)
        return time.perf_counter() - t0

    @staticmethod
    def _signal_tree(pid: int, sig: int, group_only: bool = False) -> None:
        if hasattr(os, "killpg"):
            try:
                os.killpg(pid, sig)  # the child called setsid(): its pid is the group id
            except (ProcessLookupError, PermissionError):
                pass
        if not group_only:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError, OSError):
                pass

    # -- events --------------------------------------------------------------------------------------------------
    def poll(self, max_events: int = 10_000) -> list[dict]:
        """Events that arrived since the last call, without blocking.

        After a user's :meth:`stop` the queue is no longer read (a killed writer can leave it torn) and one
        ``{"event": "stopped"}`` is returned. A child that died without a terminal event yields one ``error``.
        """
        if self._proc is None or self._finished:
            return []
        if self._stopped:
            return self._finish([{"event": "stopped", "exitcode": self.exitcode}])
        out: list[dict] = []
        while len(out) < max_events:
            try:
                out.append(self._queue.get_nowait())
            except queue_mod.Empty:
                break
            except (EOFError, OSError, ValueError):
                break
            if out[-1].get("event") in TERMINAL_EVENTS:
                return self._finish(out)
        if not out and not self._proc.is_alive():
            # the child may have flushed its last events just before exiting
            try:
                out.append(self._queue.get(timeout=0.2))
            except (queue_mod.Empty, EOFError, OSError, ValueError):
                msg = f"the training process ended without finishing (exit code {self._proc.exitcode})"
                return self._finish([{"event": "error", "message": msg, "traceback": ""}])
            if out[-1].get("event") in TERMINAL_EVENTS:
                return self._finish(out)
        if out:
            self.last_event = out[-1]
        return out

    def _finish(self, events: list[dict]) -> list[dict]:
        self._finished = True
        self.last_event = events[-1]
        return events

    def events(self, interval: float = 0.05) -> Iterator[dict]:
        """Yield events until a terminal one (blocking; for scripts, CLIs and relay threads)."""
        while not self._finished:
            batch = self.poll()
            yield from batch
            if not batch:
                time.sleep(interval)

    def __enter__(self) -> TrainingProcess:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def runs_dir() -> Path:
    """Where viewer fine-tuning runs are written: ``$MEDSSL_RUNS_DIR`` or the cache's ``runs``, created."""
    from napari_medssl.cache import cache_subdir

    return cache_subdir("runs", "MEDSSL_RUNS_DIR")


def new_run_dir(model_source: str) -> Path:
    """A fresh, unique run folder for fine-tuning ``model_source`` (a zoo name or a checkpoint path)."""
    stem = Path(model_source).stem if model_source.endswith(".safetensors") else model_source
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:40]
    return runs_dir() / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
