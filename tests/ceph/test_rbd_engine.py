"""The RBD engine in this process against a real cluster, through both ways it calls librbd per
request: the C calls of the compiled build (``_rbd.c``) and ctypes (the pure build).  Both must
move the same bytes, with the same answers, as ``rbd export`` then reads them."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import random
from pathlib import Path

import pytest

from nbdserver.backing import librbd
from nbdserver.backing.librbd import RbdEngine, RbdError, RbdImage, rbd_name
from tests.conftest import EXPECTED_BUILD

KiB = 1024


def test_the_compiled_build_calls_librbd_from_c():
    native = librbd.native_calls(librbd.libraries())
    assert (native is not None) == (EXPECTED_BUILD == "mypyc")


def ways() -> list[str]:
    """The ways this build can call librbd per request."""
    available = ["ctypes"]
    if librbd.native_calls(librbd.libraries()) is not None:
        available.append("c")
    return available


def engine_for(cluster, spec: str, way: str) -> RbdEngine:
    name = rbd_name(f"rbd:{spec}")
    assert name is not None
    engine = RbdEngine(RbdImage(name, conf=cluster.conf_path, timeout=20))
    if way == "ctypes":
        engine._native = None
    assert (engine._native is not None) == (way == "c")
    return engine


async def run(engine: RbdEngine, start, *args) -> object:
    """Start one request the way the block layer does, and wait for its completion."""
    future = asyncio.get_running_loop().create_future()

    def done(result, error):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    start(*args, done)
    return await future


def run_then_export(cluster, engine: RbdEngine, image: str, traffic, tmp_path: Path) -> bytes:
    """Run ``traffic`` (a coroutine) on the engine, close it, and read the image back with ``rbd export``."""
    try:
        asyncio.run(traffic)
    finally:
        engine.close()
    out = tmp_path / "exported"
    cluster.rbd("export", "--no-progress", image, str(out), timeout=120)
    return out.read_bytes()


@pytest.mark.parametrize("way", ["ctypes", "c"])
def test_reads_and_writes_of_segments_move_the_same_bytes(ceph_cluster, image, way, tmp_path: Path):
    if way not in ways():
        pytest.skip("the pure build has no C calls")
    rng = random.Random(7)
    engine = engine_for(ceph_cluster, image, way)
    size = engine.backing.size
    model = bytearray(size)

    async def traffic() -> None:
        # Writes of one segment, of several (empty ones among them), FUA of one and of several.
        for count, fua in [(1, False), (3, False), (1, True), (4, True), (64, False)]:
            for _ in range(8):
                segments = [bytearray(rng.randbytes(rng.choice([0, 512, 4 * KiB, 16 * KiB]))) for _ in range(count)]
                length = sum(map(len, segments))
                offset = rng.randrange(0, size - length + 1, 512)
                await run(engine, engine.start_writev, offset, segments, fua)
                model[offset : offset + length] = b"".join(segments)
        await engine.flush()
        # Reads into one segment and into several, views of a larger buffer among them.
        for count in (1, 2, 7):
            for _ in range(8):
                buffer = bytearray(count * 8 * KiB)
                segments = [memoryview(buffer)[i * 8 * KiB : (i + 1) * 8 * KiB] for i in range(count)]
                offset = rng.randrange(0, size - len(buffer) + 1, 512)
                await run(engine, engine.start_readv, offset, segments)
                assert buffer == model[offset : offset + len(buffer)]
        # A request past the image's end is refused with librbd's error, on its completion or at start.
        with pytest.raises(RbdError) as caught:
            await run(engine, engine.start_readv, size, [bytearray(4 * KiB)])
        assert caught.value.errno in (errno.EINVAL, errno.ERANGE, errno.ENXIO)
        # Nothing to move: answered without librbd.
        assert await run(engine, engine.start_writev, 0, [bytearray()], False) is None

    assert run_then_export(ceph_cluster, engine, image, traffic(), tmp_path) == model
    assert engine._ops == {}


@pytest.mark.parametrize("way", ["ctypes", "c"])
def test_completions_reaped_together_while_finishing_ones_start_flushes(ceph_cluster, image, way):
    """FUA writes of several segments, many in flight: each completion reaped starts a flush,
    whose new completion librbd may place where one reaped in the same batch was.  Every request
    must still complete once, with its own result."""
    if way not in ways():
        pytest.skip("the pure build has no C calls")
    engine = engine_for(ceph_cluster, image, way)

    async def traffic() -> list[object]:
        requests = [
            run(engine, engine.start_writev, i * 8 * KiB, [bytearray(4 * KiB), bytearray(4 * KiB)], True)
            for i in range(512)
        ]
        return await asyncio.wait_for(asyncio.gather(*requests), 120)

    try:
        assert asyncio.run(traffic()) == [0] * 512
    finally:
        engine.close()
    assert engine._ops == {}


@pytest.mark.parametrize("way", ["ctypes", "c"])
def test_a_buffer_is_free_to_reuse_once_its_write_completes(ceph_cluster, image, way, tmp_path: Path):
    """librbd sends writes from their own buffers (zero-copy), as the block layer's pool gives a
    write's block to the next request the moment the write completes: what is scribbled over a
    buffer after its completion must never reach the image."""
    if way not in ways():
        pytest.skip("the pure build has no C calls")
    rng = random.Random(11)
    engine = engine_for(ceph_cluster, image, way)
    value = ctypes.create_string_buffer(16)
    rados = engine.backing.lib.rados
    assert rados.rados_conf_get(engine.backing.cluster, b"rbd_disable_zero_copy_writes", value, len(value)) == 0
    assert value.value == b"false"
    model = bytearray(engine.backing.size)

    async def traffic() -> None:
        loop = asyncio.get_running_loop()
        waits = []
        for i in range(256):  # disjoint ranges, all in flight together; some FUA, some several segments
            segments = [bytearray(rng.randbytes(rng.choice([4 * KiB, 16 * KiB]))) for _ in range(1 + i % 3)]
            offset = i * 64 * KiB  # 256 of them fill the 16 MiB image
            model[offset : offset + sum(map(len, segments))] = b"".join(segments)
            future = loop.create_future()

            def done(result, error, segments=segments, future=future):
                for segment in segments:
                    segment[:] = b"\xee" * len(segment)  # the pool hands it on at once
                future.set_result(error)

            engine.start_writev(offset, segments, i % 4 == 0, done)
            waits.append(future)
        assert await asyncio.wait_for(asyncio.gather(*waits), 120) == [None] * 256

    assert run_then_export(ceph_cluster, engine, image, traffic(), tmp_path) == model
