"""Mount namespace: a private view of the mounts in which a read-only bind mount of the store
is writable, the way guix-daemon itself writes to a store that `gnu-store.mount` (installed by
guix-install.sh) bind-mounts read-only for everyone else.

The read-only flag of a bind mount belongs to that mount, not to the file system under it. In
a mount namespace of its own, a root process can remount its copy of the mount read-write:
its writes land in the same file system, so every other process sees the restored items,
while their view of the store stays read-only. Nothing is changed outside this process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from pathlib import Path

from incstore.errors import StoreError

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
# flags a remount must keep, or the kernel refuses it inside a namespace (locked flags)
_KEEP = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048,
         "relatime": 1 << 21}


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mount_options(target: Path) -> set[str] | None:
    """The per-mount options of the mount at `target` (from /proc/self/mountinfo)."""
    wanted = os.path.realpath(target)
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[4].encode().decode("unicode_escape") == wanted:
                    found = set(fields[5].split(","))  # the last mount there is the one seen
    except OSError:
        return None
    return found


def make_writable(store_root: Path) -> None:
    """Make this process's view of `store_root` writable when it is a read-only mount.

    Must run before the process starts threads (unshare refuses a multi-threaded process),
    as root. Raises StoreError with the one command that fixes things otherwise.
    """
    options = _mount_options(store_root)
    hint = (f"is mounted read-only (a bind mount such as guix-install.sh's gnu-store.mount); "
            f"run the restore as root, or first `sudo mount -o remount,rw {store_root}`")
    if options is None or "ro" not in options:
        raise StoreError(hint + " (it is not a mount point incstore can remount)",
                         item=str(store_root))
    if os.geteuid() != 0:
        raise StoreError(hint, item=str(store_root))
    if threading.active_count() > 1:
        raise StoreError(hint + " (threads already run; cannot enter a mount namespace)",
                         item=str(store_root))
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_void_p]
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise StoreError(f"{hint} (unshare: {os.strerror(err)})", item=str(store_root))
    # changes made here must not propagate back to the other namespaces
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise StoreError(f"{hint} (making mounts private: {os.strerror(err)})",
                         item=str(store_root))
    flags = MS_REMOUNT | MS_BIND
    for name, bit in _KEEP.items():
        if name in options:
            flags |= bit
    if libc.mount(None, os.fsencode(os.path.realpath(store_root)), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise StoreError(f"{hint} (remount: {os.strerror(err)})", item=str(store_root))
