"""Tests of distil.sandbox: one test per containment, each a few short subprocess runs.

Normal code runs and returns its output; an infinite loop dies at the timeout; a huge
allocation fails in the child only; fork bombs leave no process behind; writes outside the
working directory do not happen; the network is unreachable; output is cut at its limit;
the working directory is removed afterwards.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import socket
import sys
import time

import pytest

from distil.sandbox import run_many, run_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox relies on Linux (/proc, namespaces)")


def session_members(session_id: int) -> list[int]:
    """Pids of the live processes in session `session_id` (the sandboxed child leads its
    own session, and its forks would stay in it)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # Fields after the parenthesised command: state, ppid, pgrp, session, ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(entry))
    return members


def test_runs_code_with_stdin_in_isolated_mode_and_clean_env():
    code = (
        "import os, sys\n"
        "print(sys.stdin.read().upper(), sys.flags.isolated, sorted(os.environ))\n"
        "print('to stderr', file=sys.stderr)\n"
    )
    result = run_python(code, stdin="hello")
    assert result.returncode == 0 and not result.timed_out and result.killed_reason is None
    assert result.stdout == "HELLO 1 ['HOME', 'LANG', 'PATH', 'TMPDIR']\n"
    assert result.stderr == "to stderr\n"
    assert 0 < result.wall_s < 5


def test_resource_limits_are_set():
    code = (
        "import resource as r\n"
        "print([r.getrlimit(k) for k in (r.RLIMIT_AS, r.RLIMIT_CPU, r.RLIMIT_CORE, r.RLIMIT_FSIZE)])\n"
        "print(r.getrlimit(r.RLIMIT_NOFILE)[0] <= 64, r.getrlimit(r.RLIMIT_NPROC)[0] <= 16)\n"
    )
    result = run_python(code, memory_mb=200, cpu_s=3)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"[({200 << 20}, {200 << 20}), (3, 4), (0, 0), ({16 << 20}, {16 << 20})]",
        "True True",
    ]


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    result = run_python("print('started', flush=True)\nwhile True:\n    pass\n", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.timed_out and result.killed_reason.startswith("timeout")
    assert result.returncode < 0
    assert result.stdout == "started\n"  # output before the kill is kept
    assert elapsed < 1.0 + 2.0 and result.wall_s < 1.0 + 2.0


def test_cpu_time_limit():
    # A short CPU limit behind a long timeout: the kernel stops the loop (SIGXCPU).
    result = run_python("while True:\n    pass\n", timeout_s=10.0, cpu_s=1)
    assert not result.timed_out and result.killed_reason.startswith("cpu time limit"), result
    assert result.wall_s < 4


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(4 << 30)", "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))"],
    ids=["one-huge", "growing"],
)
def test_huge_allocation_fails_in_the_child_only(code):
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_python(code, memory_mb=256)
    assert result.returncode != 0 and "MemoryError" in result.stderr, result
    # The parent's peak memory did not follow the child's.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib < 64 << 10
    assert run_python("print('still fine')").stdout == "still fine\n"


@pytest.mark.parametrize(
    "attack",
    [
        "while True:\n    os.fork()",
        "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '30'])",
        "while True:\n    os.system('sleep 30 &')",
        "while True:\n    os.posix_spawn('/bin/sleep', ['sleep', '30'], {})",
        "import multiprocessing\nmultiprocessing.Process(target=time.sleep, args=(30,)).start()",
        # _posixsubprocess loaded under a package name: its import event names "x._posixsubprocess".
        (
            "import importlib.util as u\norigin = u.find_spec('_posixsubprocess').origin\n"
            "spec = u.spec_from_file_location('x._posixsubprocess', origin) if origin.endswith('.so') \\\n"
            "    else u.find_spec('_posixsubprocess')\n"
            "u.module_from_spec(spec)"
        ),
    ],
    ids=["fork", "subprocess", "system", "posix_spawn", "multiprocessing", "renamed-posixsubprocess"],
)
def test_fork_bomb_is_contained(attack):
    code = f"import os, time\nprint(os.getpid(), flush=True)\n{attack}\n"
    result = run_python(code, timeout_s=3.0)
    assert result.returncode != 0 and "PermissionError: sandbox" in result.stderr, result
    child = int(result.stdout.split()[0])
    assert session_members(child) == []


def test_writes_outside_the_working_directory_do_not_happen(tmp_path):
    target = tmp_path / "created"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"open({str(victim)!r}, 'a').write('x')",
        f"pathlib.Path({str(target)!r}).write_text('x')",
        f"os.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
        f"os.open('created', os.O_WRONLY | os.O_CREAT, dir_fd=os.open({str(tmp_path)!r}, os.O_RDONLY))",
        f"os.remove({str(victim)!r})",
        f"os.rename({str(victim)!r}, 'stolen')",
        f"os.link({str(victim)!r}, 'hard')",
        f"os.symlink({str(victim)!r}, 'soft'); open('soft', 'w').write('x')",
        f"os.mkdir({str(tmp_path / 'dir')!r})",
        f"os.mknod({str(target)!r})",
        f"shutil.copy('main.py', {str(target)!r})",
        # Last: it moves the working directory for the attempts after it.
        f"os.chdir({str(tmp_path)!r}); open('created', 'w').write('x')",
    ]
    # mknod raises no audit event; the wrapper removes it (AttributeError).
    code = "import os, pathlib, shutil\n" + "".join(
        f"try:\n    {attempt}\n    print('WROTE', {i})\n"
        f"except (PermissionError, AttributeError):\n    print('denied', {i})\n"
        for i, attempt in enumerate(attempts)
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [w for i in range(len(attempts)) for w in ("denied", str(i))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]
    assert victim.read_text() == "keep"


def test_network_connect_fails():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')\n"
        result = run_python(code)
        assert result.returncode != 0 and "connected" not in result.stdout
        assert "PermissionError: sandbox: socket" in result.stderr, result.stderr
        with pytest.raises(socket.timeout):
            server.accept()


def test_network_namespace_where_permitted():
    # /proc/self/net/dev lists the interfaces of the reader's network namespace.
    result = run_python("import os\nprint(os.readlink('/proc/self/ns/net'))\nprint(open('/proc/self/net/dev').read())")
    assert result.returncode == 0, result.stderr
    namespace, devices = result.stdout.split("\n", 1)
    if namespace == os.readlink("/proc/self/ns/net"):
        pytest.skip("this kernel refused a new network namespace; the audit hook still refuses sockets")
    assert [line.split(":")[0].strip() for line in devices.splitlines()[2:] if line.strip()] == ["lo"]


def _kernel_confines() -> bool:
    """Whether this kernel gives a sandboxed child its own network namespace and a
    read-only root (user, network and mount namespaces; mount_setattr)."""
    report = run_python("import os\nprint(os.readlink('/proc/self/ns/net'))\n"
                        "print(bool(os.statvfs('/').f_flag & os.ST_RDONLY))").stdout.split()
    return report[0] != os.readlink("/proc/self/ns/net") and report[1] == "True"


@pytest.mark.parametrize("refused", [None, "namespaces", "mounts"])
def test_what_the_kernel_refuses_is_said_once(monkeypatch, refused):
    """Without the namespaces a child shares the host's network and can read the
    trainer's /proc entries; without the read-only mounts only the audit hook keeps its
    writes in its directory. The first run says which, once; nothing is said where the
    kernel grants both."""
    import warnings

    import distil.sandbox as sandbox

    if not _kernel_confines():
        pytest.skip("this kernel refuses the sandbox's namespaces or read-only mounts")
    if refused == "namespaces":
        monkeypatch.setattr(sandbox, "_unshare", lambda flags: -1)
    elif refused == "mounts":
        monkeypatch.setattr(sandbox, "_syscall", lambda *args: -1)
    monkeypatch.setattr(sandbox, "_namespaces_checked", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_python("print(1)").stdout == "1\n"
        run_python("print(2)")
    said = [str(w.message) for w in caught if "distil.sandbox: the kernel refused" in str(w.message)]
    assert len(said) == (0 if refused is None else 1), said
    assert all(("network namespace" in m) == (refused == "namespaces") for m in said), said
    assert all("read-only mount namespace" in m for m in said), said


def test_writes_outside_the_working_directory_fail_even_past_the_audit_hook(tmp_path):
    """Code written to escape undoes the audit hook (here: a patched builtin that its
    path check calls); the read-only mounts of the child's namespace still refuse the
    write, and the working directory stays writable."""
    if not _kernel_confines():
        pytest.skip("this kernel refuses the sandbox's namespaces or read-only mounts")
    target = tmp_path / "escaped"
    code = (
        "import builtins\n"
        "original = builtins.isinstance\n"
        "builtins.isinstance = lambda a, b: True if b is int else original(a, b)\n"
        "open('inside.txt', 'w').write('x')\n"
        f"open({str(target)!r}, 'w').write('x')\n"
    )
    result = run_python(code)
    assert "Read-only file system" in result.stderr, result.stderr
    assert not target.exists()


def test_a_descendant_that_left_the_group_dies_with_the_run(monkeypatch):
    """With the audit hook gone (as code written to escape can make it), a program forks
    a child that leaves the process group (setsid) and sleeps, then exits: the group kill
    misses it, the PID namespace of the program's descendants does not."""
    import distil.sandbox as sandbox

    probe = run_python("import os\nprint(os.readlink('/proc/self/ns/pid_for_children'))").stdout.strip()
    if probe == os.readlink("/proc/self/ns/pid"):
        pytest.skip("this kernel refuses a PID namespace for the sandbox's descendants")
    hook = "    sys.addaudithook(_make_hook(os.path.realpath(os.getcwd())))\n"
    assert hook in sandbox._WRAPPER
    monkeypatch.setattr(sandbox, "_WRAPPER", sandbox._WRAPPER.replace(hook, ""))
    # The sleeper lets go of the output pipes, so the run ends when the program does.
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    os.close(1)\n    os.close(2)\n" \
           "    time.sleep(30)\n    os._exit(0)\n"
    before = set(_sandboxed_processes())
    result = run_python(code, timeout_s=5.0)
    assert result.returncode == 0 and not result.timed_out, result
    deadline = time.monotonic() + 2.0  # a SIGKILLed process may take a moment to go
    while (left := set(_sandboxed_processes()) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"still running: {sorted(left)}"


def _sandboxed_processes() -> list[int]:
    """Live (not zombie) processes running the sandbox's wrapper, forks included (their
    working directory reads as "/ (deleted)" from here: another mount namespace)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                command = f.read()
            with open(f"/proc/{entry.name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"_sandbox_main()" in command and state != "Z":
            found.append(int(entry.name))
    return found


def test_output_is_truncated():
    result = run_python("print('x' * 100_000)\nprint('done')", max_output_bytes=1000)
    assert result.returncode == 0 and result.output_truncated
    assert result.stdout == "x" * 1000
    # A program that never stops printing: the parent keeps only the limit.
    result = run_python("while True:\n    print('y' * 1000)", max_output_bytes=5000, timeout_s=0.5)
    assert result.timed_out and result.output_truncated and len(result.stdout) == 5000


def test_working_directory_is_private_and_removed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    (outside / "kept").write_text("keep")
    code = (
        "import os, tempfile\n"
        "open('notes.txt', 'w').write('inside is fine')\n"
        "os.mkdir('locked', 0)\n"
        # A link to a directory outside: removed, never followed.
        f"os.symlink({str(outside)!r}, 'link')\n"
        "with tempfile.NamedTemporaryFile(delete=False) as f:\n"
        "    pass\n"
        "print(os.getcwd(), os.path.dirname(f.name) == os.getcwd(), open('notes.txt').read())\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    workdir, in_workdir, note = result.stdout.split(maxsplit=2)
    assert in_workdir == "True" and note == "inside is fine\n"
    assert os.path.basename(workdir).startswith("distil-sandbox-")
    assert not os.path.exists(workdir)
    assert (outside / "kept").read_text() == "keep" and outside.stat().st_mode & 0o777 == 0o755


def test_death_by_a_signal_python_has_no_name_for():
    # Real-time signals above SIGRTMIN have no signal.Signals member.
    number = signal.SIGRTMIN + 1
    result = run_python(f"import signal\nsignal.raise_signal({number})")
    assert result.returncode == -number and result.killed_reason == f"signal {number}", result


def test_run_many_keeps_order():
    codes = [f"import time\ntime.sleep({0.2 if i % 2 == 0 else 0})\nprint({i} + int(input()))" for i in range(6)]
    results = run_many(codes, stdins=[str(10 * i) for i in range(6)], max_workers=3)
    assert [r.stdout for r in results] == [f"{11 * i}\n" for i in range(6)]
    assert run_many([]) == []


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="timeout_s must be a positive finite number"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_python("pass", memory_mb=-1)
    # Fractions and infinities: the limits are whole numbers, the timeout a finite one.
    with pytest.raises(ValueError, match="memory_mb must be a positive int, got 0.5"):
        run_python("pass", memory_mb=0.5)
    with pytest.raises(ValueError, match="max_output_bytes must be a positive int, got 10.5"):
        run_python("pass", max_output_bytes=10.5)
    with pytest.raises(ValueError, match="cpu_s must be a positive int, got 1.5"):
        run_python("pass", cpu_s=1.5)
    with pytest.raises(ValueError, match="timeout_s must be a positive finite number, got inf"):
        run_python("pass", timeout_s=math.inf)
    with pytest.raises(TypeError, match="code must be a str"):
        run_python(b"pass")
    with pytest.raises(ValueError, match="stdins must have one entry per program"):
        run_many(["pass", "pass"], stdins=[""])
    with pytest.raises(ValueError, match="max_workers"):
        run_many(["pass"], max_workers=0)
