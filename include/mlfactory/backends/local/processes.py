"""Child processes of the `local` backend: free loopback ports, starting a server and waiting until it
answers, a Python module's ``main`` forked from a process that has its libraries loaded (``Forked``,
``start_module``: a one-process training job, the model server), and stopping a whole process tree.

Airflow's scheduler, the MLflow server and torchrun each start workers of their own. They run in
their own session (``start_new_session=True``) and are stopped with every descendant: a worker may run
in a session of its own (torchrun's workers started as commands do), so signalling the process group
alone could leave workers training on after their launcher is gone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil


def free_port() -> int:
    """A port free on 127.0.0.1 now, from below the kernel's ephemeral range. A port from inside that range (what
    binding port 0 hands out) can be taken as the local port of any outgoing connection before the server it was
    chosen for binds it: a model server started minutes after its port was chosen was seen to fail so."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randint(max(1024, low // 2), low - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, ok_only: bool = False) -> bool:
    """Whether something answers HTTP at ``url``: any status (an error status is an answer too), or only a
    2xx with ``ok_only``."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except urllib.error.HTTPError:
        return not ok_only
    except OSError:
        return False


def launch(command: list[str], log: Path, **popen) -> subprocess.Popen:
    """``command`` in a session of its own (stopped with ``stop_group``), its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **popen)


def wait_ready(process: subprocess.Popen, ready: str | Callable[[], bool], what: str, log: Path | None = None,
               timeout: float = 120, interval: float = 0.2) -> subprocess.Popen:
    """Wait until ``ready`` (a URL that ``answers``, or a check) holds. A process that exits first, or is not
    ready within ``timeout`` seconds, is stopped, and the error names ``what`` with the end of its ``log``."""
    check = (lambda: answers(ready)) if isinstance(ready, str) else ready
    deadline = time.monotonic() + timeout
    while not check():
        exited = process.poll() is not None
        if exited or time.monotonic() > deadline:
            stop_group(process)
            why = f"exited with {process.returncode}" if exited else f"was not ready after {timeout:.0f} s"
            raise RuntimeError(f"{what} {why}" + log_tail(log))
        time.sleep(interval)
    return process


def log_tail(log: Path | None, chars: int = 2000) -> str:
    """``; the end of LOG:`` and its last ``chars`` characters, to append to an error; empty without a log."""
    tail = log.read_text(errors="replace")[-chars:] if log is not None and log.exists() else ""
    return f"; the end of {log}:\n{tail}" if tail else ""


def start(command: list[str], log: Path, ready: str | Callable[[], bool], what: str, timeout: float = 120,
          **popen) -> subprocess.Popen:
    """``launch`` then ``wait_ready``: a server that answers, or an error that says why not."""
    return wait_ready(launch(command, log, **popen), ready, what, log, timeout)


def signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def descendants(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``process``, its group and every descendant at once (what a lost machine does)."""
    tree = descendants(process)
    signal_group(process, sig)
    for child in tree:
        try:
            child.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def stop_group(process: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process group of ``process`` (launchers forward it to their workers), then SIGKILL
    every process of the tree still there after ``grace`` seconds."""
    tree = descendants(process)  # now, while they are still its children: orphans cannot be found later
    signal_group(process, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(tree, timeout=1)
    signal_group(process, signal.SIGKILL)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


class Forked:
    """``main(argv)`` of a Python module run in a forked child of this process, behind the part of
    ``subprocess.Popen``'s interface that the local backend uses (``pid``, ``stdout``, ``poll``, ``wait``,
    ``communicate``, ``send_signal``/``terminate``/``kill``, ``returncode``), so ``stop_group`` and
    ``kill_tree`` stop it as they stop a command.

    What it saves is the start: a process that has already imported what ``main`` needs (an Airflow task
    forked from a scheduler that preloads torch, MLflow and pandas) hands the child those modules for free,
    where ``python -m`` would spend seconds of CPU importing them again. The child runs in a session of its
    own, with ``env`` as its whole environment, the default signal handlers, stdin on /dev/null, and stdout
    and stderr on one pipe (``stdout``, text, line by line), or appended to ``log`` (a server that outlives
    this process; ``stdout`` is then None). Its title (``ps``, ``/proc/PID/cmdline``) is the command it
    stands for.

    A child forked from a process that has computed in parallel (a test, a task that predicted) must compute on
    one thread (``one_thread``: torch, OpenMP and BLAS): the parent's OpenMP pool threads are not in the child,
    and its first parallel loop on more than one thread waits for them forever (measured). An Airflow task that
    starts a job has computed nothing, and the job keeps its threads.
    """

    def __init__(self, module: str, main: Callable[[list[str]], int | None], argv: list[str], env: dict[str, str],
                 log: Path | None = None, one_thread: bool = False):
        import sys

        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
        read, write = os.pipe() if log is None else (None, None)
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            code = 1
            try:
                if log is None:
                    os.close(read)
                else:
                    write = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.setsid()
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
                    signal.signal(sig, signal.SIG_DFL)
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(write, 1)
                os.dup2(write, 2)
                # What Popen's close_fds does, without closing: every other descriptor inherited from this
                # process (an Airflow task's sockets to its supervisor, a server's listening socket) now
                # points at /dev/null, so the child holds none of them open, and an object of this process
                # that closes its descriptor when collected closes its own /dev/null, not a file the child opened
                for fd in map(int, os.listdir("/proc/self/fd")):
                    if fd > 2 and fd != null:
                        try:
                            os.dup2(null, fd, inheritable=False)
                        except OSError:  # the listing's own descriptor, closed by now
                            pass
                # this process's own streams stay referenced: collected, one that owns descriptor 1 or 2 (an
                # Airflow task's) would close it, and with it the pipe just put there
                inherited = (sys.stdin, sys.stdout, sys.stderr)  # noqa: F841
                sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the child's own streams, kept to its end
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                try:  # before the environment changes: the title is written over the original argv and environ
                    import setproctitle

                    setproctitle.setproctitle(" ".join([sys.executable, "-m", module, *argv]))
                except ImportError:
                    pass
                os.environ.clear()
                os.environ.update(env)
                _forget_process_choices()
                if one_thread:
                    _one_thread()
                sys.argv = [module, *argv]
                code = main(argv) or 0
            except SystemExit as exit_:  # sys.exit(CODE or MESSAGE), as the interpreter reports it
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 - reported as python -m would, then the child exits 1
                import traceback

                traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:  # noqa: BLE001 - exiting anyway
                        pass
                os._exit(code)
        self.stdout = None
        if log is None:
            os.close(write)
            self.stdout = open(read, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed at EOF by its reader
        self.returncode: int | None = None
        self.args = [module, *argv]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """All of the child's output once it has exited (``Popen.communicate`` with ``stdout=PIPE``)."""
        import threading

        read: list[str] = []
        reader = threading.Thread(target=lambda: read.append(self.stdout.read()), daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            raise subprocess.TimeoutExpired(self.args, timeout)
        self.stdout.close()
        self.wait(timeout)
        return read[0], None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        return self.returncode


def _forget_process_choices() -> None:
    """In a forked child: what this process chose for itself that a fresh ``python -m`` reads from its environment
    instead (MLflow's tracking and registry URI and active experiment, set by ``mlflow.set_tracking_uri`` and
    ``set_experiment``), forgotten, so the child's ``env`` decides as it would for a command."""
    import sys

    for module, name in (("mlflow.tracking._tracking_service.utils", "_tracking_uri"),
                         ("mlflow.tracking._model_registry.utils", "_registry_uri"),
                         ("mlflow.tracking.fluent", "_active_experiment_id")):
        if hasattr(sys.modules.get(module), name):
            setattr(sys.modules[module], name, None)


def _one_thread() -> None:
    import sys

    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # OpenMP (torch's, scikit-learn's, XGBoost's) and BLAS
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)  # torch keeps its own count besides OpenMP's


def piped(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``command`` in a session of its own, stdin on /dev/null, stdout and stderr on one text pipe, line by line."""
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True)


def start_module(module: str, argv: list[str], env: dict[str, str], log: Path | None = None,
                 one_thread: bool = False) -> subprocess.Popen | Forked:
    """``python -m MODULE ARGV`` with ``env`` as its environment, in a session of its own, its output on
    ``stdout`` line by line, or appended to ``log``: forked from this process (``Forked``) when it runs one thread
    and has not started CUDA, else started as that command. A fork copies the locks other threads hold at that
    moment and none of those threads, so a child of a busy multi-threaded process can wait forever (seen once in
    a test process: a training child stopped between two epochs); an Airflow task starts its job or server from
    its one thread. ``one_thread``: see ``Forked``."""
    import importlib
    import sys
    import threading

    torch = sys.modules.get("torch")
    if threading.active_count() > 1 or (torch is not None and torch.cuda.is_initialized()):
        command = [sys.executable, "-m", module, *argv]
        return piped(command, env) if log is None else launch(command, log, env=env)
    code = importlib.import_module(module)
    if hasattr(code, "__path__"):  # a package: ``python -m`` runs its __main__
        code = importlib.import_module(f"{module}.__main__")
    return Forked(module, code.main, argv, env, log, one_thread)


def reap(pid: int, wait: bool = False) -> None:
    """Collect ``pid``'s exit status if it is an exited child of this process (a server forked from it), so that
    it is gone rather than a zombie that signals still reach; with ``wait``, once it has exited."""
    try:
        os.waitpid(pid, 0 if wait else os.WNOHANG)
    except ChildProcessError:  # not a child of this process
        pass


def start_job(cluster, module: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen | Forked:
    """``module`` as one node of ``cluster`` (a ``mlfactory.training.cluster.Cluster``) runs it, output piped:
    forked from this process (``start_module``), itself when the node runs one process, else torchrun's launcher,
    whose workers it forks in turn."""
    if cluster.world_size == 1:
        return start_module(module, argv, env)
    return start_module("torch.distributed.run", cluster.torchrun_args(module, argv), env)
