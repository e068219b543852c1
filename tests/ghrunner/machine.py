"""One emulated runner machine per job: a private mount namespace over per-job directories.

A job's processes run in a mount namespace made by ``unshare --mount --propagation private``, in
which per-job backing directories are bind-mounted over ``/gnu``, ``/var/guix``, ``/etc/guix``,
``/home/runner``, ``/root``, ``/tmp`` (and whatever else the caller lists), so each job sees its
own copies and nothing reaches this host's real ones. A holder process keeps the namespace alive;
every later process joins it with ``nsenter`` and, unless it should run as root, drops to the
``runner`` user with ``setpriv --init-groups`` (so ``sudo`` works as on GitHub's images).

Paths that do not exist on the host are created as empty mount points (an empty ``/gnu`` is
therefore visible inside every job: ``mv gnu /`` onto it fails, unlike on a fresh runner).

:func:`ensure_runner_user` creates, idempotently and only as root, GitHub's ``runner`` user
(uid 1001, primary group ``runner``, also in ``adm``, ``users``, ``docker`` and
``systemd-journal``, as ``id`` prints on ubuntu-24.04) and a sudoers.d file granting it passwordless
sudo with Ubuntu's ``env_reset`` and ``secure_path``: ``sudo`` drops what a workflow added to
``PATH``.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

RUNNER_USER = "runner"
RUNNER_UID = 1001
RUNNER_HOME = "/home/runner"
RUNNER_GROUPS = ("adm", "users", "docker", "systemd-journal")
SUDOERS_FILE = Path("/etc/sudoers.d/90-ghrunner-runner")
# Ubuntu 24.04's /etc/sudoers; Debian's differs only by /snap/bin, but set it explicitly so the
# behaviour does not depend on the host.
SECURE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/snap/bin"
SUDOERS = f"""\
# Written by tests/ghrunner (GitHub Actions runner emulator): the hosted images' sudo rules.
Defaults:{RUNNER_USER} env_reset
Defaults:{RUNNER_USER} secure_path="{SECURE_PATH}"
Defaults:{RUNNER_USER} !lecture
{RUNNER_USER} ALL=(ALL) NOPASSWD:ALL
"""
DEFAULT_ISOLATED = ("/gnu", "/var/guix", "/etc/guix", "/home/runner", "/root", "/tmp")
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_user_lock = threading.Lock()


class MachineError(Exception):
    """The emulated machine could not be set up (not root, missing tools...)."""


def _run(argv: Sequence[str]) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise MachineError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


def _free_gid(preferred: int) -> int | None:
    try:
        grp.getgrgid(preferred)
    except KeyError:
        return preferred
    return None


def _ensure_group(name: str, gid: int | None = None, system: bool = True) -> None:
    try:
        grp.getgrnam(name)
        return
    except KeyError:
        pass
    argv = ["groupadd"]
    if gid is not None and _free_gid(gid) is not None:
        argv += ["--gid", str(gid)]
    elif system:
        argv.append("--system")
    _run([*argv, name])


def ensure_runner_user() -> pwd.struct_passwd:
    """Create the ``runner`` user, its groups and its sudoers rule (idempotent, root only)."""
    if os.geteuid() != 0:
        raise MachineError("the runner emulator must run as root (it creates the runner user "
                           "and mount namespaces)")
    for tool in ("unshare", "nsenter", "setpriv", "mount", "sudo", "tar", "zstd"):
        if shutil.which(tool) is None:
            raise MachineError(f"'{tool}' is not installed (apt-get install -y sudo zstd)")
    lock_path = Path("/run/lock/ghrunner-user.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with _user_lock, open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _ensure_group(RUNNER_USER, RUNNER_UID, system=False)
        _ensure_group("docker", 118)
        _ensure_group("systemd-journal", 999)
        for name in ("adm", "users"):
            _ensure_group(name)
        try:
            user = pwd.getpwnam(RUNNER_USER)
        except KeyError:
            argv = ["useradd", "--no-create-home", "--home-dir", RUNNER_HOME,
                    "--shell", "/bin/bash", "--gid", RUNNER_USER,
                    "--groups", ",".join(RUNNER_GROUPS)]
            try:
                pwd.getpwuid(RUNNER_UID)
            except KeyError:
                argv += ["--uid", str(RUNNER_UID)]
            _run([*argv, RUNNER_USER])
            user = pwd.getpwnam(RUNNER_USER)
        member_of = {g.gr_name for g in grp.getgrall() if RUNNER_USER in g.gr_mem}
        missing = [g for g in RUNNER_GROUPS if g not in member_of]
        if missing:
            _run(["usermod", "--append", "--groups", ",".join(missing), RUNNER_USER])
        if not SUDOERS_FILE.exists() or SUDOERS_FILE.read_text() != SUDOERS:
            tmp = SUDOERS_FILE.with_name(".ghrunner.tmp")
            tmp.write_text(SUDOERS)
            tmp.chmod(0o440)
            if shutil.which("visudo"):
                _run(["visudo", "-c", "-q", "-f", str(tmp)])
            tmp.replace(SUDOERS_FILE)
        return user


def runner_ids() -> tuple[int, int]:
    user = pwd.getpwnam(RUNNER_USER)
    return user.pw_uid, user.pw_gid


def _alive(pid: int) -> bool:
    """Running, not gone nor a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Machine:
    """A job's machine: its mount namespace, its backing directories and its processes."""

    def __init__(self, root: Path, isolated: Iterable[str] = DEFAULT_ISOLATED,
                 name: str = "job") -> None:
        self.root = Path(root)
        self.name = name
        self.isolated = sorted({str(PurePosixPath(p)) for p in isolated}, key=len, reverse=True)
        for p in self.isolated:
            if not p.startswith("/") or p == "/":
                raise MachineError(f"isolated paths must be absolute and not '/': {p!r}")
        self._holder: subprocess.Popen[bytes] | None = None
        self._ns: str | None = None
        self._spawned: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self.closed = False
        self.matrix: dict[str, object] = {}  # the job's matrix combination, for setup hooks

    # -- setup ---------------------------------------------------------------------------

    def backing(self, isolated_path: str) -> Path:
        return self.root / "fs" / isolated_path.lstrip("/")

    def start(self) -> Machine:
        ensure_runner_user()
        uid, gid = runner_ids()
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.isolated:
            backing = self.backing(p)
            backing.mkdir(parents=True, exist_ok=True)
            if p == "/tmp":
                backing.chmod(0o1777)
            elif p == RUNNER_HOME:
                os.chown(backing, uid, gid)
                backing.chmod(0o750)
            elif p == "/root":
                backing.chmod(0o700)
            else:
                backing.chmod(0o755)
            target = Path(p)
            if not target.exists():
                with contextlib.suppress(FileExistsError):
                    target.mkdir(parents=True, mode=0o755)
        root_str = str(self.root.resolve())
        # Mount over an ancestor of the backing directories last, or later sources would vanish
        order = sorted(self.isolated, key=lambda p: (root_str.startswith(p + "/"), p))
        script = ["set -e"]
        for p in order:
            script.append(f"mount --bind '{self.backing(p).resolve()}' '{p}'")
        script += ["echo ready", "read _ || true"]
        self._holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
             "\n".join(script)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
        assert self._holder.stdout is not None
        line = self._holder.stdout.readline()
        if line.strip() != b"ready":
            err = self._holder.stderr.read().decode() if self._holder.stderr else ""
            self._holder.kill()
            raise MachineError(f"could not set up the job's mount namespace: {err.strip()}")
        self._ns = os.readlink(f"/proc/{self._holder.pid}/ns/mnt")
        return self

    @property
    def holder_pid(self) -> int:
        if self._holder is None:
            raise MachineError("machine not started")
        return self._holder.pid

    # -- paths ---------------------------------------------------------------------------

    def path(self, path: str | PurePosixPath) -> Path:
        """Where a path of the machine lives on the host (its backing directory, for isolated
        paths; the path itself otherwise). Mounts made inside the namespace are not reflected."""
        p = str(PurePosixPath(path))
        for iso in self.isolated:
            if p == iso:
                return self.backing(iso)
            if p.startswith(iso + "/"):
                return self.backing(iso) / p[len(iso) + 1:]
        return Path(p)

    def write_file(self, path: str, content: str | bytes, *, owner: str = "root",
                   mode: int = 0o644) -> Path:
        """Write a file inside the machine (creating parents owned like the file)."""
        host = self.path(path)
        created = []
        parent = host.parent
        while not parent.exists():
            created.append(parent)
            parent = parent.parent
        host.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        host.write_bytes(content)
        host.chmod(mode)
        if owner == RUNNER_USER:
            uid, gid = runner_ids()
            for p in [host, *created]:
                os.chown(p, uid, gid)
        return host

    def chown_runner(self, path: str | Path, *, host_path: bool = False) -> None:
        """chown -R runner:runner (a machine path, or a host path with host_path=True)."""
        uid, gid = runner_ids()
        target = Path(path) if host_path else self.path(str(path))
        os.chown(target, uid, gid, follow_symlinks=False)
        if target.is_dir() and not target.is_symlink():
            for dirpath, dirnames, filenames in os.walk(target):
                for n in dirnames + filenames:
                    os.chown(os.path.join(dirpath, n), uid, gid, follow_symlinks=False)

    def which(self, name: str, search_path: str) -> str | None:
        """Resolve a command on a PATH as seen inside the machine."""
        if "/" in name:
            return name if os.access(self.path(name), os.X_OK) else None
        for d in search_path.split(":"):
            if not d:
                continue
            candidate = str(PurePosixPath(d) / name)
            host = self.path(candidate)
            if host.is_file() and os.access(host, os.X_OK):
                return candidate
        return None

    # -- processes -----------------------------------------------------------------------

    def command(self, argv: Sequence[str], *, user: str = "root", cwd: str = "/") -> list[str]:
        """The host command line that runs argv inside the machine as user, in cwd."""
        if self._holder is None or self.closed:
            raise MachineError("machine not started or already closed")
        prefix = ["nsenter", "--target", str(self._holder.pid), "--mount", f"--wdns={cwd}", "--"]
        if user != "root":
            prefix += ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
                       "--init-groups", "--"]
        return prefix + list(argv)

    def default_env(self, user: str) -> dict[str, str]:
        home = RUNNER_HOME if user == RUNNER_USER else pwd.getpwnam(user).pw_dir
        return {"PATH": ROOT_PATH, "HOME": home, "USER": user, "LOGNAME": user,
                "LANG": "C.UTF-8", "SHELL": "/bin/bash"}

    def popen(self, argv: Sequence[str], *, user: str = "root", cwd: str = "/",
              env: Mapping[str, str] | None = None, **kwargs: object
              ) -> subprocess.Popen[bytes]:
        """Start argv inside the machine (env replaces the environment entirely)."""
        full_env = dict(env) if env is not None else self.default_env(user)
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            self.command(argv, user=user, cwd=cwd), env=full_env, **kwargs)
        return proc

    def run(self, argv: Sequence[str] | str, *, user: str = "root", cwd: str = "/",
            env: Mapping[str, str] | None = None, input: str | None = None,
            timeout: float | None = 300, check: bool = False
            ) -> subprocess.CompletedProcess[str]:
        """Run a command (a string runs through ``bash -c``) inside the machine, wait for it."""
        if isinstance(argv, str):
            argv = ["/bin/bash", "-c", argv]
        full_env = dict(env) if env is not None else self.default_env(user)
        return subprocess.run(self.command(argv, user=user, cwd=cwd), env=full_env, input=input,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def spawn(self, argv: Sequence[str] | str, *, user: str = "root", cwd: str = "/",
              env: Mapping[str, str] | None = None, log: Path | None = None
              ) -> subprocess.Popen[bytes]:
        """Start a background process inside the machine; it lives until :meth:`close`."""
        if isinstance(argv, str):
            argv = ["/bin/bash", "-c", argv]
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = self.popen(argv, user=user, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        with self._lock:
            self._spawned.append(proc)
        return proc

    def bind_readonly(self, path: str) -> None:
        """Bind-mount path read-only onto itself, as guix-install.sh's gnu-store.mount does."""
        self.run(["/bin/sh", "-c", f"mount --bind '{path}' '{path}' && "
                  f"mount -o remount,bind,ro '{path}'"], check=True)

    def processes(self) -> list[int]:
        """PIDs of the live processes inside this machine's namespace (but its holder)."""
        if self._ns is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.holder_pid:
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == self._ns and _alive(int(entry)):
                    pids.append(int(entry))
            except OSError:
                continue
        return pids

    def kill_where(self, predicate: Callable[[int, dict[str, str]], bool]) -> list[int]:
        """SIGKILL the namespace's processes whose (pid, environ) satisfies predicate."""
        killed = []
        for pid in self.processes():
            try:
                raw = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            environ = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                           if "=" in item)
            if predicate(pid, environ):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(pid) for pid in killed):
            time.sleep(0.01)
        return killed

    def close(self) -> None:
        """Kill every process in the namespace and let it go (the backing files stay)."""
        if self.closed or self._holder is None:
            self.closed = True
            return
        for _ in range(50):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        for proc in self._spawned:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        if self._holder.stdin:
            with contextlib.suppress(OSError):
                self._holder.stdin.close()
        try:
            self._holder.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._holder.kill()
            self._holder.wait()
        for stream in (self._holder.stdout, self._holder.stderr):
            if stream:
                stream.close()
        self.closed = True

    def __enter__(self) -> Machine:
        return self.start() if self._holder is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
