#!/usr/bin/env python3
"""Runs a command (argv[1:]) as on a kernel without Landlock (before
Linux 5.13, e.g. Debian 11's 5.10): a seccomp filter makes
landlock_create_ruleset fail with ENOSYS, as such a kernel does, and
allows everything else. The filter is inherited by every process the
command starts. x86_64 and aarch64; standard library only."""
import ctypes
import errno
import os
import platform
import struct
import sys

ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[platform.machine()]
LANDLOCK_CREATE_RULESET = 444  # the same number on both
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06


def op(code, k, jt=0, jf=0):
    return struct.pack("HBBI", code, jt, jf, k)


PROGRAM = b"".join([
    op(LD_W_ABS, 4),                             # seccomp_data.arch
    op(JEQ_K, ARCH, 0, 3),                       # another arch: allow
    op(LD_W_ABS, 0),                             # seccomp_data.nr
    op(JEQ_K, LANDLOCK_CREATE_RULESET, 0, 1),
    op(RET_K, RET_ERRNO | errno.ENOSYS),
    op(RET_K, RET_ALLOW),
])


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def main():
    libc = ctypes.CDLL(None, use_errno=True)
    code = ctypes.create_string_buffer(PROGRAM, len(PROGRAM))
    prog = SockFprog(len(PROGRAM) // 8, ctypes.addressof(code))
    ulong = ctypes.c_ulong
    if libc.prctl(PR_SET_NO_NEW_PRIVS, ulong(1), ulong(0), ulong(0), ulong(0)) != 0 or \
            libc.prctl(PR_SET_SECCOMP, ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog), ulong(0), ulong(0)) != 0:
        sys.exit(f"no_landlock: seccomp: {os.strerror(ctypes.get_errno())}")
    os.execv(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
