"""Pooled request buffers and the per-export budget of bytes in flight."""

from __future__ import annotations

import asyncio
import ctypes

import pytest

from nbdserver.block.buffers import PAGE_SIZE, BufferPool, ByteBudget, block_size


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@pytest.mark.parametrize(
    ("length", "size"), [(1, 4096), (4096, 4096), (4097, 8192), (1 << 20, 1 << 20), (3 << 20, 4 << 20)]
)
def test_blocks_come_in_power_of_two_sizes(length, size):
    assert block_size(length) == size
    block = BufferPool().take(length)
    assert len(block) == size and address(block) % PAGE_SIZE == 0 and not block.readonly


def test_a_given_back_block_is_reused():
    pool = BufferPool()
    block = pool.take(70000)
    pool.give(block)
    assert pool.idle_bytes == 128 * 1024
    again = pool.take(100000)  # same size class
    assert address(again) == address(block) and pool.idle_bytes == 0 and pool.created == 1
    assert address(pool.take(70000)) != address(block)  # taken: a new one is made


def test_idle_blocks_are_bounded():
    pool = BufferPool(max_idle_bytes=3 * 4096)
    blocks = [pool.take(4096) for _ in range(5)]
    for block in blocks:
        pool.give(block)
    assert pool.idle_bytes == 3 * 4096
    assert len({address(pool.take(1)) for _ in range(5)} & {address(b) for b in blocks}) == 3


async def test_budget_wakes_waiters_once_it_frees():
    budget = ByteBudget(limit=100)
    woken: list[str] = []
    budget.charge(150)
    assert budget.exhausted
    budget.wait(lambda: woken.append("a"))
    budget.wait(lambda: woken.append("b"))
    budget.release(40)  # 110: still over
    await asyncio.sleep(0)
    assert woken == []
    budget.release(10)  # 100: at the limit is not over it
    assert not budget.exhausted
    assert woken == []  # deferred to the next tick, never inside the releasing call
    await asyncio.sleep(0)
    assert sorted(woken) == ["a", "b"]
    budget.release(100)
    await asyncio.sleep(0)
    assert len(woken) == 2  # each wait wakes once
