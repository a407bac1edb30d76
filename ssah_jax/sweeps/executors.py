"""Where a sweep's points run: a point's own ``ssah-jax`` process (started with its output in its
log, ended with the sweep, its one-line error), the ``local`` executor (subprocesses, the GPUs dealt
out between them), the ``ray`` executor (Ray tasks) and the lock that keeps one sweep command at a
time in a workdir. (The ``print`` executor runs nothing: :func:`ssah_jax.sweeps.run` prints the
commands.)"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from ssah_jax import runs
from ssah_jax.sweeps.spec import Point

REFUSED = 2  # ssah-jax's exit status for a problem of the run's input: running it again cannot help


# a point's process ends when the process that started it does (the cli checks it before importing us)
PARENT_ENV = "SSAH_SWEEP_PARENT"


def follow_parent() -> None:
    """In a point's process (``ssah-jax`` started by a sweep or its Ray worker): SIGTERM when that
    process dies, so a killed sweep leaves no run behind that a re-run would start again (Linux;
    elsewhere a no-op). Set here rather than between fork and exec: JAX's threads are running."""
    parent = os.environ.pop(PARENT_ENV, None)
    if not parent:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def error_line(log: Path) -> str:
    """What went wrong, from the end of a point's log: ssah-jax's one-line error, else the last line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "no log"
    ours = [line for line in lines if line.startswith("ssah-jax: ")]
    return (ours or lines or ["(empty log)"])[-1][:500]


def _start(args: list[str], cwd: str, log: Path, env: dict[str, str] | None) -> subprocess.Popen:
    """``ssah-jax <args>`` with this machine's Python, its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n=== {datetime.datetime.now().isoformat(timespec='seconds')}: {shlex.join(args)}\n".encode())
        return subprocess.Popen([sys.executable, "-m", "ssah_jax.cli", *args], cwd=cwd, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())})


def _result(code: int | None, start: float, log: Path) -> dict[str, Any]:
    return {"exit": code, "seconds": round(time.time() - start, 1), "error": "" if code == 0 else error_line(log)}


def run_point(argv: list[str], cwd: str, log: str) -> dict[str, Any]:
    """Runs one point's ``ssah-jax`` arguments to their end: ``{"exit", "seconds", "error"}``
    (a Ray task: on the worker, with the worker's Python)."""
    start = time.time()
    return _result(_start(argv, cwd, Path(log), None).wait(), start, Path(log))


def _gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def device_groups(parallel: int) -> list[dict[str, str] | None]:
    """The environment of each of ``parallel`` local slots: the GPUs dealt out evenly; on CPU
    every slot sees the same (virtual) devices; a TPU host's chips belong to one process."""
    if parallel == 1:
        return [None]
    gpus = _gpus()
    if gpus:
        if len(gpus) < parallel:
            raise runs.ConfigError(f"config.parallel={parallel}: this machine has {len(gpus)} GPUs")
        per = len(gpus) // parallel
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per:(i + 1) * per])} for i in range(parallel)]
    if Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists():
        raise runs.ConfigError(f"config.parallel={parallel}: a TPU host's chips serve one process; use parallel=1, "
                               "or config.executor=ray with one TPU host per point")
    return [None] * parallel


class LocalExecutor:
    """Points as subprocesses of this process, ``parallel`` at a time."""

    def __init__(self, parallel: int, cwd: str):
        self.free, self.cwd, self.running = device_groups(parallel), cwd, {}

    def describe(self) -> str:
        return f"the local executor ({len(self.free)} at a time)"

    def has_room(self) -> bool:
        return bool(self.free)

    def submit(self, point: Point, argv: list[str], log: Path) -> None:
        env = self.free.pop(0)
        self.running[point] = (_start(argv, self.cwd, log, env), env, time.time(), log)

    def wait(self) -> list[tuple[Point, dict[str, Any]]]:
        while True:
            done = []
            for point, (proc, env, start, log) in list(self.running.items()):
                code = proc.poll()
                if code is not None:
                    del self.running[point]
                    self.free.append(env)
                    done.append((point, _result(code, start, log)))
            if done:
                return done
            time.sleep(0.5)

    def close(self) -> None:
        for proc, *_ in self.running.values():
            proc.terminate()


class RayExecutor:
    """Points as Ray tasks (``run_point`` on a worker with the resources of ``config.ray``)."""

    def __init__(self, settings: ConfigDict, cwd: str):
        try:
            import ray
        except ImportError:
            raise runs.ConfigError("config.executor=ray: Ray is not installed (pip install -e '.[ray]')") from None
        self.ray, self.cwd, self.running = ray, cwd, {}
        if not ray.is_initialized():
            local = not settings.address
            try:  # "local": a new cluster on this machine even where RAY_ADDRESS names one
                ray.init(address=settings.address or "local",
                         num_cpus=(settings.cluster_cpus or None) if local else None,
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:  # no cluster at the address
                raise runs.ConfigError(f"config.ray.address={settings.address!r}: {' '.join(str(e).split())}") from None
        wanted = {"CPU": settings.num_cpus, "GPU": settings.num_gpus, "TPU": settings.tpus}
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if not any(all(node.get(k, 0) >= v for k, v in wanted.items()) for node in nodes):
            ray.shutdown()
            raise runs.ConfigError(f"config.ray: no node of the cluster has num_cpus={settings.num_cpus}, num_gpus="
                                   f"{settings.num_gpus}, tpus={settings.tpus} (its nodes: "
                                   f"{[{k: n.get(k, 0) for k in wanted} for n in nodes]})")
        if not settings.num_gpus and any(node.get("GPU", 0) for node in nodes):
            print("Note: the cluster has GPUs but config.ray.num_gpus=0: the points run without one")
        resources = {"TPU": settings.tpus} if settings.tpus else None
        self.task = ray.remote(run_point).options(num_cpus=settings.num_cpus, num_gpus=settings.num_gpus,
                                                  resources=resources, max_retries=0)
        self.address = settings.address or "a local cluster"

    def describe(self) -> str:
        return f"Ray ({self.address}: {self.ray.cluster_resources().get('CPU', 0):g} CPUs)"

    def has_room(self) -> bool:
        return True  # Ray queues a task until its resources are free

    def submit(self, point: Point, argv: list[str], log: Path) -> None:
        self.running[self.task.remote(argv, self.cwd, str(log))] = (point, time.time(), log)

    def wait(self) -> list[tuple[Point, dict[str, Any]]]:
        ready, _ = self.ray.wait(list(self.running), num_returns=1)
        point, start, log = self.running.pop(ready[0])
        try:
            return [(point, self.ray.get(ready[0]))]
        except self.ray.exceptions.RayError as e:  # the worker died: a crash, retried like one
            message = " ".join(str(e).split())[:500]
            return [(point, {"exit": None, "seconds": round(time.time() - start, 1), "error": message})]

    def close(self) -> None:
        for ref in self.running:
            self.ray.cancel(ref, force=True)
        self.ray.shutdown()


@contextlib.contextmanager
def _locked(out: Path):
    """One sweep command at a time in a workdir (a second would start the same points). The lock
    file is removed when the command ends; a lock taken on a file another command removed in the
    meantime is not one (it is taken again on the new file)."""
    path = out / "sweep.lock"
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise runs.WorkdirError(f"{out}: another ssah-jax sweep is running in it") from None
        if path.exists() and os.path.samestat(os.fstat(f.fileno()), path.stat()):
            break
        f.close()  # removed by the command that held it: lock the current file
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: the next command makes a new one
        f.close()

