"""The ledger: bytes written since each backing file's last flush, shared by the processes writing it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nbdserver.block.ledger import ROWS, Account, Ledger, shared_memory

MiB = 1024 * 1024

# A worker's part, in a process of its own: count a write to the file, or start a flush of it,
# then print what it then sees as unflushed.
WORKER = """
import os, sys
from nbdserver.block.ledger import Ledger
fd, slot, path, action = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
account = Ledger(2, slot, fd).account(os.open(path, os.O_RDONLY))  # closed on exit
if action == "flush":
    account.flushed(account.total())
else:
    account.wrote(int(action))
print(account.unflushed(account.total()))
"""


def account_of(ledger: Ledger, path: Path) -> Account:
    fd = os.open(path, os.O_RDONLY)
    try:
        return ledger.account(fd)
    finally:
        os.close(fd)


def in_worker(fd: int, slot: int, path: Path, action: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(fd), str(slot), str(path), action],
        pass_fds=[fd],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


def test_writes_in_one_process_are_unflushed_in_another_until_one_flushes(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    fd = shared_memory(2)
    try:
        ours = account_of(Ledger(2, 0, fd), path)
        ours.wrote(4096)
        assert in_worker(fd, 1, path, str(8 * MiB)) == 8 * MiB + 4096  # theirs and ours
        total = ours.total()
        assert ours.unflushed(total) == 8 * MiB + 4096
        assert in_worker(fd, 1, path, "flush") == 0  # a flush in either covers both
        assert ours.unflushed(ours.total()) == 0
        ours.wrote(512)
        assert in_worker(fd, 1, path, "0") == 512
    finally:
        os.close(fd)


def test_a_file_has_one_row_however_it_is_opened(tmp_path):
    (tmp_path / "a.img").write_bytes(b"a")
    (tmp_path / "b.img").write_bytes(b"b")
    os.link(tmp_path / "a.img", tmp_path / "also-a.img")
    ledger = Ledger()
    a, also_a, b = (account_of(ledger, tmp_path / name) for name in ("a.img", "also-a.img", "b.img"))
    a.wrote(100)
    b.wrote(7)
    assert also_a.unflushed(also_a.total()) == 100
    also_a.flushed(also_a.total())
    assert a.unflushed(a.total()) == 0
    assert b.unflushed(b.total()) == 7


def test_a_flush_that_started_earlier_does_not_take_back_a_later_ones_mark(tmp_path):
    (tmp_path / "a.img").write_bytes(b"a")
    account = account_of(Ledger(), tmp_path / "a.img")
    account.wrote(100)
    early = account.total()
    account.wrote(50)
    account.flushed(account.total())
    account.flushed(early)  # done after the later one: must not make the 50 unflushed again
    assert account.unflushed(account.total()) == 0


def test_files_beyond_the_table_are_counted_by_each_process_alone(tmp_path):
    ledger = Ledger()
    accounts = []
    for n in range(ROWS + 1):
        path = tmp_path / f"{n}.img"
        path.write_bytes(b"x")
        accounts.append(account_of(ledger, path))
    for n, account in enumerate(accounts):
        account.wrote(n + 1)
    assert [a.unflushed(a.total()) for a in accounts] == [n + 1 for n in range(ROWS + 1)]
    private = Account.private()
    private.wrote(3)
    assert private.unflushed(private.total()) == 3
