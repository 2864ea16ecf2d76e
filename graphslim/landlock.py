"""Landlock (Linux ≥ 5.13): a process restricts itself, irreversibly, to the files it names.

graphslim's execution child (:mod:`graphslim.sandbox`) calls :func:`restrict` after importing
TensorFlow and before it receives a model: from then on the process (every thread, and anything it
could start) may read only the listed directories (the Python installation, the scratch directory,
system libraries) and write only the scratch directory; with Landlock ABI 4 it may neither bind nor
connect TCP sockets, and with ABI 6 it may not signal processes or reach abstract UNIX sockets
outside itself. The rules are enforced by the kernel, so an op that TensorFlow runs on the model's
behalf (``ReadFile``, ``WriteFile``, a checkpoint ``SaveV2``...) fails with "permission denied".

Direct syscalls through ctypes (the syscall numbers are the same on x86-64 and arm64); no binding
package is needed. On a kernel without Landlock :func:`restrict` returns a :class:`Status` whose
``abi`` is 0 and whose ``reason`` says why; the caller decides what to report.

Reference: https://docs.kernel.org/userspace-api/landlock.html
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass

__all__ = ["Status", "abi_version", "restrict"]

_SYS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446), "arm64": (444, 445, 446)}
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# filesystem rights, by the ABI that introduced them
_FS = {
    "execute": (1 << 0, 1), "write_file": (1 << 1, 1), "read_file": (1 << 2, 1), "read_dir": (1 << 3, 1),
    "remove_dir": (1 << 4, 1), "remove_file": (1 << 5, 1), "make_char": (1 << 6, 1),
    "make_dir": (1 << 7, 1), "make_reg": (1 << 8, 1), "make_sock": (1 << 9, 1), "make_fifo": (1 << 10, 1),
    "make_block": (1 << 11, 1), "make_sym": (1 << 12, 1), "refer": (1 << 13, 2), "truncate": (1 << 14, 3),
    "ioctl_dev": (1 << 15, 5),
}
_FILE_ONLY = ("execute", "write_file", "read_file", "truncate", "ioctl_dev")  # rights a file rule may hold
_READ = ("execute", "read_file", "read_dir")
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect (ABI 4)
_SCOPE = (1 << 0) | (1 << 1)  # abstract UNIX sockets, signals (ABI 6)


@dataclass(frozen=True)
class Status:
    abi: int  # 0: not enforced
    reason: str = ""  # why not, when abi == 0


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _numbers():
    return _SYS.get(platform.machine())


def abi_version() -> int:
    """The kernel's Landlock ABI version, 0 when unavailable (old kernel, disabled LSM, other OS)."""
    nums = _numbers()
    if os.name != "posix" or platform.system() != "Linux" or nums is None:
        return 0
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    v = libc.syscall(ctypes.c_long(nums[0]), None, ctypes.c_size_t(0),
                     ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return int(v) if v > 0 else 0


def _mask(abi: int, names) -> int:
    return sum(bit for name, (bit, since) in _FS.items() if name in names and since <= abi)


def restrict(read=(), write=()) -> Status:
    """Restrict this process: read (and execute) only beneath ``read`` paths, read and write only
    beneath ``write`` paths. Paths that do not exist are skipped. Irreversible; applies to every
    thread of the process (Linux ≥ 5.13 with Landlock enabled)."""
    abi = abi_version()
    if abi == 0:
        if platform.system() != "Linux":
            return Status(0, f"Landlock is a Linux feature; this is {platform.system()}")
        return Status(0, f"this kernel ({platform.release()}) has no Landlock (Linux 5.13 or newer with "
                         "the landlock LSM enabled)")
    nums = _numbers()
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    every = _mask(abi, _FS)
    attr = _RulesetAttr(every, _NET_TCP if abi >= 4 else 0, _SCOPE if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(ctypes.c_long(nums[0]), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return Status(0, f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}")
    try:
        for paths, rights in ((read, _mask(abi, _READ)), (write, every)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    allowed = rights
                    if not os.path.isdir(path):
                        allowed &= _mask(abi, _FILE_ONLY)
                    rule = _PathBeneathAttr(allowed, fd)
                    if libc.syscall(ctypes.c_long(nums[1]), ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                                    ctypes.byref(rule), ctypes.c_uint32(0)) < 0:
                        raise OSError(ctypes.get_errno(), f"landlock_add_rule({path})")
                finally:
                    os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(ctypes.c_long(nums[2]), ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return Status(abi)
