"""Run untrusted Python (a student's generated code) in a contained child process.

The program-synthesis task executes whatever the student writes, thousands of times per
run, so one response must not be able to hang the trainer, exhaust its memory, fork-bomb
the machine, touch files outside a scratch directory or reach the network. Containment is
layered, each layer covering what the others cannot:

- a separate interpreter (`sys.executable -I`: isolated mode, no user site, no PYTHON*
  variables) with a minimal environment, in a fresh temporary working directory that is
  removed afterwards;
- resource limits set in the child between fork and exec (address space, CPU seconds,
  processes, file size, open files, no core dumps);
- a wall-clock timeout that kills the child's whole process group;
- new user, network and mount namespaces where the kernel allows them (the user
  namespace makes the others available unprivileged): the child then has only a
  loopback device that is down, and every mount is read-only but its working directory
  (mount_setattr, Linux >= 5.12), so the kernel refuses writes anywhere else;
- a Python audit hook (PEP 578), installed by a wrapper before the user code runs, that
  denies writes outside the working directory, process creation, signals to other
  processes, sockets, and ctypes and gc's object walks (ways to reach and undo the hook).

The audit hook stops naive and accidental harm, which is what generated code does; it is
not a boundary against code written to escape (PEP 578 says as much: patching a builtin
or the hook's closure undoes it). Against such code the OS layers bound memory, CPU time,
wall time (of the process group), file sizes and, where the namespaces exist, the
network, the parent's /proc entries (its environment included), writes outside the
working directory and the lifetime of every descendant (after the run the parent kills
what lives in the run's user namespace and its descendants' PID namespace, so a process
that left the group by setsid goes too). They do not bound reads, or disk use in the
working directory beyond the per-file limit: run the program task in a container or VM
if its generated code may be hostile. Where the kernel refuses the namespaces or the
read-only mounts, the first run warns once, saying which.
POSIX only (the `resource` module, process groups).
"""

from __future__ import annotations

import ctypes
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["RunResult", "run_python", "run_many"]


@dataclass(frozen=True)
class RunResult:
    """What one sandboxed run did.

    returncode: the exit status; negative -N when signal N ended the process.
    stdout, stderr: decoded as UTF-8 (undecodable bytes replaced), each at most
        `max_output_bytes` bytes before decoding.
    timed_out: the wall-clock timeout expired and the process group was killed.
    killed_reason: why the process did not finish on its own ("timeout ...", "cpu time
        limit", "signal SIGSEGV", ...), None when it exited by itself.
    wall_s: seconds from start to the end of the run.
    output_truncated: stdout or stderr was cut at `max_output_bytes`.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None
    wall_s: float
    output_truncated: bool = False


# --------------------------------------------------------------------------------------
# The wrapper: the child's first Python code. It reads main.py from the working directory,
# installs the audit hook, then runs the user code with a fresh globals dict. The hook is
# built by a factory and handed straight to sys.addaudithook, so no live frame or module
# global refers to it, and gc's object walks (the other way to reach it) are refused.
# --------------------------------------------------------------------------------------
_WRAPPER = r"""
def _make_hook(workdir):
    import os

    realpath, isabs, fsdecode, fspath, sep = os.path.realpath, os.path.isabs, os.fsdecode, os.fspath, os.sep
    plain_text = str.__str__  # the text of a str subclass, whose comparisons could lie
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    # Events that change the file system: (argument positions naming paths that must lie
    # inside the working directory, positions holding a dir_fd). A dir_fd is relative to
    # a directory the hook cannot see, so any dir_fd is refused.
    path_events = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
        "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
        "os.truncate": ((0,), ()), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
        "shutil.rmtree": ((0,), ()), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
    }
    # Process creation (fork bombs): RLIMIT_NPROC does not bind root, and the trainer may
    # run as root, so the hook is what stops forks there. Also refused: signals to other
    # processes, raising resource limits, ctypes (it bypasses every check), gc's walks.
    denied = frozenset({
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
        "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents",
    })
    denied_prefixes = ("socket.", "ctypes.")

    def inside(path):
        if isinstance(path, int):
            return True  # an open descriptor: its opening was checked
        resolved = realpath(fsdecode(fspath(path)))
        return resolved == workdir or resolved.startswith(workdir + sep)

    def hook(event, args):
        why = None
        if event in denied or event.startswith(denied_prefixes):
            why = "not allowed in the sandbox"
        elif event == "open":
            path, mode, flags = args
            name = fsdecode(path) if isinstance(path, (str, bytes)) else ""
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            if name.startswith("/proc/") and name.endswith("/mem"):
                why = "process memory"
            elif writes and mode is None and name and not isabs(name):
                why = "os.open may write only to absolute paths (its dir_fd is not visible)"
            elif writes and not inside(path):
                why = f"writing outside the working directory: {path!r}"
        elif event in path_events:
            paths, dir_fds = path_events[event]
            if any(args[i] not in (None, -1) for i in dir_fds):
                why = "dir_fd is not allowed"
            else:
                outside = [args[i] for i in paths if not inside(args[i])]
                if outside:
                    why = f"outside the working directory: {outside[0]!r}"
        elif event == "import" and plain_text(args[0]).rpartition(".")[2] == "_posixsubprocess":
            # subprocess's fork_exec raises no event of its own: stop it at its import. An
            # extension's init function is named by the last part of the module name, so
            # loading it as "x._posixsubprocess" works too.
            event, why = "import _posixsubprocess", "process creation is not allowed in the sandbox"
        if why is not None:
            raise PermissionError(f"sandbox: {event} denied ({why})")

    return hook


def _sandbox_main():
    import builtins, os, posix, sys

    with open("main.py", encoding="utf-8") as f:
        code = compile(f.read(), "main.py", "exec")
    # mknod and mkfifo create files but raise no audit event: take them away.
    for module in (os, posix):
        for name in ("mknod", "mkfifo"):
            if hasattr(module, name):
                delattr(module, name)
    sys.addaudithook(_make_hook(os.path.realpath(os.getcwd())))
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit:
        raise
    except BaseException as error:
        # Print the traceback from the user's code on (without this wrapper's frame),
        # then fail as Python does.
        error.__traceback__ = error.__traceback__.tb_next
        sys.excepthook(type(error), error, error.__traceback__)
        sys.exit(1)


_sandbox_main()
"""

# --------------------------------------------------------------------------------------
# Limits and namespaces applied in the child between fork and exec.
# --------------------------------------------------------------------------------------
# RLIMIT_NPROC counts every process and thread of the real user id, so for a user running
# other processes it allows few or no new ones, which is the point: generated code needs
# none. It does not bind root (see the audit hook in the wrapper).
_NPROC_LIMIT = 16
_NOFILE_LIMIT = 64
_FSIZE_LIMIT_BYTES = 16 << 20

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_CLONE_NEWPID = 0x20000000
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
# mount_setattr(2) (Linux >= 5.12; one number on every architecture since 5.1's table)
# makes a whole mount tree read-only in one call, submounts included.
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


# Resolved once in the parent so the child only makes the calls (no imports, no lookups,
# no locks after fork). None where there is no unshare (not Linux).
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_unshare = getattr(_libc, "unshare", None)
_mount = getattr(_libc, "mount", None)
_syscall = getattr(_libc, "syscall", None)
_READ_ONLY = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
_WRITABLE = _MountAttr(0, _MOUNT_ATTR_RDONLY, 0, 0)


def _clamp(value: int, hard: int) -> int:
    # An unprivileged process cannot raise a hard limit: never ask for more than it has.
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def _child_limits(memory_mb: int, cpu_s: int) -> tuple[tuple[int, int, int], ...]:
    """(resource, soft, hard) triples, computed in the parent."""
    wanted = (
        (resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
        # SIGXCPU at the soft limit, SIGKILL a second later should it be ignored.
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
        (resource.RLIMIT_NPROC, _NPROC_LIMIT, _NPROC_LIMIT),
        (resource.RLIMIT_FSIZE, _FSIZE_LIMIT_BYTES, _FSIZE_LIMIT_BYTES),
        (resource.RLIMIT_NOFILE, _NOFILE_LIMIT, _NOFILE_LIMIT),
        (resource.RLIMIT_CORE, 0, 0),
    )
    limits = []
    for rid, soft, hard in wanted:
        current_hard = resource.getrlimit(rid)[1]
        limits.append((rid, _clamp(soft, current_hard), _clamp(hard, current_hard)))
    return tuple(limits)


def _confine_child(limits: tuple[tuple[int, int, int], ...], workdir: bytes) -> None:
    """preexec_fn: runs in the forked child before exec.

    Kept to plain system calls on values prepared in the parent: Python warns that
    preexec_fn can deadlock when the parent has threads (run_many, torch), which happens
    only if the child needs a lock another thread held at fork (an import, logging); these
    calls take none. This matters because Popen waits for the exec, before the timeout
    starts.
    """
    for rid, soft, hard in limits:
        resource.setrlimit(rid, (soft, hard))
    if _unshare is None:
        return
    # A user namespace makes the others available without privileges; root can create a
    # network namespace directly. Where none is permitted the audit hook still refuses
    # sockets, writes outside the working directory and process creation. The child's
    # descendants (not the child itself) go into a PID namespace of their own, which the
    # parent empties after the run.
    namespaces = _CLONE_NEWUSER | _CLONE_NEWNET | _CLONE_NEWNS
    if _unshare(namespaces | _CLONE_NEWPID) == 0 or _unshare(namespaces) == 0:
        _read_only_but(workdir)
    elif _unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        _unshare(_CLONE_NEWNET)


def _read_only_but(workdir: bytes) -> None:
    """In the child's own mount namespace: every mount read-only but `workdir`.

    The kernel then refuses writes anywhere else, whoever the child is (root's uid is
    kept in the user namespace, so file permissions alone would not). The working
    directory becomes a mount of its own first, so that it can stay writable; the cwd
    is entered again, as it still names the directory through the mount beneath.
    """
    if _mount is None or _syscall is None:
        return
    size = ctypes.sizeof(_MountAttr)
    if (_mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) == 0
            and _mount(workdir, workdir, None, _MS_BIND | _MS_REC, None) == 0
            and _syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(_READ_ONLY), size) == 0):
        _syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, workdir, _AT_RECURSIVE, ctypes.byref(_WRITABLE), size)
        os.chdir(workdir)


# What a confined child reports of itself: its network namespace, whether its root is
# read-only, whether its working directory is writable.
_PROBE = (
    "import os\n"
    "print(os.readlink('/proc/self/ns/net'))\n"
    "print(bool(os.statvfs('/').f_flag & os.ST_RDONLY))\n"
    "print(not os.statvfs('.').f_flag & os.ST_RDONLY)\n"
)
_namespaces_checked = False


def _warn_without_namespaces() -> None:
    """Once a process: warn when a confined child shares the host's network or can write
    outside its working directory (the kernel refused the namespaces or the mounts)."""
    global _namespaces_checked
    if _namespaces_checked:
        return
    _namespaces_checked = True
    workdir = tempfile.mkdtemp(prefix="distil-sandbox-probe-")
    try:
        result = subprocess.run([sys.executable, "-I", "-c", _PROBE], cwd=workdir, capture_output=True, text=True,
                                timeout=30, preexec_fn=lambda: _confine_child((), os.fsencode(workdir)))
        net, read_only, writable = result.stdout.split("\n")[:3]
    except (OSError, subprocess.SubprocessError, ValueError):
        net, read_only, writable = "", "False", "True"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    missing = []
    if net in ("", os.readlink("/proc/self/ns/net")):
        missing.append("a network namespace: programs share the host's network (the audit hook alone refuses "
                       "sockets) and can read this process's /proc entries, its environment included")
    if read_only != "True" or writable != "True":
        missing.append("a read-only mount namespace: only the audit hook keeps programs' writes in their "
                       "working directory")
    if missing:
        warnings.warn(f"distil.sandbox: the kernel refused {'; and '.join(missing)}", RuntimeWarning, stacklevel=3)


def _minimal_env(workdir: str) -> dict[str, str]:
    # Nothing of the parent's environment leaks in (tokens, proxies, CUDA settings);
    # temporary files go to the working directory, the only writable place.
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}


# --------------------------------------------------------------------------------------
# Running one program.
# --------------------------------------------------------------------------------------
def _user_namespace(pid: int) -> str | None:
    """The child's user namespace, when it is its own (every run makes a new one).

    Read as soon as the child has exec'd: its interpreter takes milliseconds to start,
    so it cannot have forked, or exited, before. (Its descendants' PID namespace cannot
    be named yet: the kernel shows it only once a first process lives in it.)"""
    try:
        namespace = os.readlink(f"/proc/{pid}/ns/user")
        return None if namespace == os.readlink("/proc/self/ns/user") else namespace
    except OSError:
        return None


def _kill_descendants(user_namespace: str) -> None:
    """SIGKILL every process of the run's user namespace and of the PID namespaces they
    live in: a descendant that left the process group (setsid) would otherwise outlive
    the run. Killing a PID namespace's first process ends all of that namespace."""
    processes = []  # (pid, user namespace, PID namespace)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                processes.append((int(entry.name), os.readlink(f"/proc/{entry.name}/ns/user"),
                                  os.readlink(f"/proc/{entry.name}/ns/pid")))
            except OSError:
                pass  # gone, or not ours to read
    theirs = {pid_ns for _, user_ns, pid_ns in processes if user_ns == user_namespace}
    theirs.discard(os.readlink("/proc/self/ns/pid"))
    for pid, user_ns, pid_ns in processes:
        if user_ns == user_namespace or pid_ns in theirs:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _kill_group(pgid: int) -> None:
    # The child leads its own session, so its group id is its pid; that number cannot be
    # reused while any member of the group is alive.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _pump(
    selector: selectors.BaseSelector, buffers: dict[int, bytearray], deadline: float, max_output_bytes: int
) -> bool:
    """Read the child's stdout and stderr until both close or `deadline`; keep at most
    `max_output_bytes` of each (the rest is read and dropped so the child never blocks on
    a full pipe). Returns whether some output was dropped."""
    dropped = False
    while selector.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for key, _ in selector.select(remaining):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                selector.unregister(key.fd)
                continue
            buffer = buffers[key.fd]
            room = max_output_bytes - len(buffer)
            if len(chunk) > room:
                dropped = True
            buffer += chunk[: max(room, 0)]
    return dropped


def _remove_tree(path: str) -> None:
    # The child may leave directories it made unreadable (mode 0); restore access first so
    # the removal cannot fail for a non-root user.
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            try:
                os.chmod(os.path.join(root, name), 0o700, follow_symlinks=False)
            except (OSError, NotImplementedError):
                # A vanished entry, or a symlink to a directory (os.walk lists those too):
                # Linux cannot chmod a link itself and says so with NotImplementedError.
                # rmtree unlinks links without following them.
                pass
    shutil.rmtree(path, ignore_errors=True)


def _check_positive_finite(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_positive_int(name: str, value: int) -> None:
    # Resource limits are whole units: a fraction would be truncated (memory_mb=0.5 gives
    # an address-space limit of 0, in which the interpreter cannot even start).
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def run_python(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    cpu_s: int | None = None,
    max_output_bytes: int = 65536,
) -> RunResult:
    """Run `code` as a Python program in the sandbox and return what it did.

    Args:
        code: the program's source (written to main.py in a fresh working directory).
        stdin: text fed to the program's standard input.
        timeout_s: wall-clock limit; past it the whole process group is killed.
        memory_mb: address-space limit (RLIMIT_AS) of the child, interpreter included.
        cpu_s: CPU-time limit; default ceil(timeout_s) + 1, a backstop behind the timeout.
        max_output_bytes: the most bytes kept of stdout and of stderr, each.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not isinstance(stdin, str):
        raise TypeError(f"stdin must be a str, got {type(stdin).__name__}")
    _check_positive_finite("timeout_s", timeout_s)
    _check_positive_int("memory_mb", memory_mb)
    _check_positive_int("max_output_bytes", max_output_bytes)
    if cpu_s is None:
        cpu_s = math.ceil(timeout_s) + 1
    _check_positive_int("cpu_s", cpu_s)
    limits = _child_limits(memory_mb, cpu_s)
    _warn_without_namespaces()

    workdir = tempfile.mkdtemp(prefix="distil-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        # stdin from an unlinked file, not a pipe: no writer to block on a child that
        # never reads.
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode())
            stdin_file.seek(0)
            start = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _WRAPPER],
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=_minimal_env(workdir),
                start_new_session=True,
                preexec_fn=lambda: _confine_child(limits, os.fsencode(workdir)),
            )
        descendants = _user_namespace(proc.pid)
        selector = selectors.DefaultSelector()
        stdout_fd, stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
        buffers = {stdout_fd: bytearray(), stderr_fd: bytearray()}
        try:
            for fd in buffers:
                selector.register(fd, selectors.EVENT_READ)
            deadline = start + timeout_s
            dropped = _pump(selector, buffers, deadline, max_output_bytes)
            timed_out = bool(selector.get_map())
            if not timed_out:
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
                except subprocess.TimeoutExpired:
                    timed_out = True  # closed its output but kept running
            if timed_out:
                _kill_group(proc.pid)
                # Collect what was written before the kill (a test harness's partial
                # results); the pipes close as soon as the group is dead.
                dropped |= _pump(selector, buffers, time.monotonic() + 1.0, max_output_bytes)
            returncode = proc.wait()
        finally:
            # Always: a member that outlived the leader (had it escaped the hook) dies too,
            # and so does a descendant that left the group.
            _kill_group(proc.pid)
            if descendants is not None:
                _kill_descendants(descendants)
            if proc.poll() is None:
                proc.wait()
            selector.close()
            proc.stdout.close()
            proc.stderr.close()
        wall_s = time.monotonic() - start
    finally:
        _remove_tree(workdir)

    if timed_out:
        killed_reason = f"timeout: more than {timeout_s} s wall clock"
    elif returncode == -signal.SIGXCPU:
        killed_reason = f"cpu time limit: more than {cpu_s} s"
    elif returncode < 0:
        # Real-time signals (SIGRTMIN + n), which the child can raise, have no name.
        try:
            killed_reason = f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            killed_reason = f"signal {-returncode}"
    else:
        killed_reason = None
    return RunResult(
        returncode=returncode,
        stdout=buffers[stdout_fd].decode("utf-8", errors="replace"),
        stderr=buffers[stderr_fd].decode("utf-8", errors="replace"),
        timed_out=timed_out,
        killed_reason=killed_reason,
        wall_s=wall_s,
        output_truncated=dropped,
    )


def run_many(
    codes: Sequence[str],
    *,
    stdins: Sequence[str] | None = None,
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    cpu_s: int | None = None,
    max_output_bytes: int = 65536,
    max_workers: int | None = None,
) -> list[RunResult]:
    """`run_python` on each program, several at a time; results in the order of `codes`.

    A small thread pool drives the subprocesses (the threads only wait on pipes, so the
    GIL is no bottleneck); `max_workers` defaults to the number of CPUs. The limits apply
    to each run.
    """
    if stdins is None:
        stdins = [""] * len(codes)
    if len(stdins) != len(codes):
        raise ValueError(f"stdins must have one entry per program: {len(stdins)} stdins for {len(codes)} codes")
    if max_workers is not None and not (isinstance(max_workers, int) and max_workers > 0):
        raise ValueError(f"max_workers must be a positive int or None, got {max_workers!r}")
    if not codes:
        return []
    workers = min(len(codes), max_workers or os.cpu_count() or 1)

    def run(job: tuple[str, str]) -> RunResult:
        code, stdin = job
        return run_python(
            code,
            stdin=stdin,
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            cpu_s=cpu_s,
            max_output_bytes=max_output_bytes,
        )

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, zip(codes, stdins)))
