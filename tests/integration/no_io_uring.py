"""Run a command with the io_uring system calls refused (EPERM), as container seccomp profiles do.

    python no_io_uring.py COMMAND [ARG...]

A seccomp filter, kept across execve, answers io_uring_setup, io_uring_enter and io_uring_register
with EPERM and lets every other system call through.  x86-64 only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

_IO_URING_CALLS = (425, 426, 427)  # x86-64: io_uring_setup, io_uring_enter, io_uring_register
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_LOAD_NR = 0x20  # BPF_LD | BPF_W | BPF_ABS, at offset 0 of struct seccomp_data: the call's number
_JUMP_IF_EQUAL = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RETURN = 0x06  # BPF_RET | BPF_K
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000


def _filter() -> bytes:
    """The BPF program: refuse each io_uring call, allow the rest."""
    program = [(_LOAD_NR, 0, 0, 0)]
    for i, number in enumerate(_IO_URING_CALLS):
        to_refusal = len(_IO_URING_CALLS) - i  # over the remaining comparisons and the allow
        program.append((_JUMP_IF_EQUAL, to_refusal, 0, number))
    program += [(_RETURN, 0, 0, _ALLOW), (_RETURN, 0, 0, _ERRNO | errno.EPERM)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    code = _filter()
    filters = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(filters))
    fprog_buffer = ctypes.create_string_buffer(fprog, len(fprog))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or libc.prctl(
        _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, fprog_buffer, 0, 0
    ):
        sys.exit(f"no_io_uring: seccomp: {os.strerror(ctypes.get_errno())}")
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
