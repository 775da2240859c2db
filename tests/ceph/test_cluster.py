"""The test cluster is real Ceph: images made and used through the rbd tool, the Python
bindings and librbd's C API, as the RBD exports will use them."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import subprocess

import pytest

MiB = 1024 * 1024


def test_rbd_tool_creates_and_describes_an_image(ceph_cluster):
    spec = ceph_cluster.create_image("cli", 64 * MiB)
    conf = str(ceph_cluster.conf_path)
    info = json.loads(
        subprocess.run(
            ["rbd", "-c", conf, "info", "--format", "json", spec], capture_output=True, check=True, timeout=60
        ).stdout
    )
    assert info["name"] == "cli"
    assert info["size"] == 64 * MiB
    listed = subprocess.run(["rbd", "-c", conf, "ls", "rbd"], capture_output=True, text=True, check=True, timeout=60)
    assert "cli" in listed.stdout.split()


def test_the_daemons_listen_on_loopback_only(ceph_cluster):
    pids = set(ceph_cluster.daemons().values())
    assert len(pids) == 2
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True, timeout=30).stdout
    ours = [line for line in listening.splitlines() if any(f"pid={pid}," in line for pid in pids)]
    assert ours  # the monitor's port, and the OSD's public, cluster and heartbeat ones
    assert all(line.split()[3].startswith("127.0.0.1:") for line in ours), ours


def test_python_bindings_write_and_read_back_4_mib(ceph_cluster):
    rados = pytest.importorskip("rados", reason="python3-rados (Debian's, in a venv with system site packages)")
    rbd = pytest.importorskip("rbd", reason="python3-rbd (Debian's, in a venv with system site packages)")
    data = os.urandom(4 * MiB)
    with rados.Rados(conffile=str(ceph_cluster.conf_path)) as connection:
        with connection.open_ioctx("rbd") as ioctx:
            rbd.RBD().create(ioctx, "python", 16 * MiB)
            with rbd.Image(ioctx, "python") as image:
                # Across an object boundary (objects are 4 MiB): two OSD requests for one write.
                assert image.write(data, 3 * MiB) == len(data)
                image.flush()
            with rbd.Image(ioctx, "python", read_only=True) as image:
                assert image.read(3 * MiB, len(data)) == data
                assert image.read(0, MiB) == bytes(MiB)  # never written: zeros


def test_librbd_c_library_opens_with_ctypes():
    # The library alone: no cluster needed to load it and ask its version.
    try:
        librbd = ctypes.CDLL("librbd.so.1")
    except OSError as error:
        pytest.skip(f"no librbd here (tests/bootstrap installs it): {error}")
    major, minor, extra = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    librbd.rbd_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(extra))
    assert (major.value, minor.value) >= (1, 16)  # Ceph 16 (Pacific)
    # What the RBD backing will call: vectored and flagged I/O, completions polled via an eventfd.
    for name in (
        "rbd_aio_writev", "rbd_aio_readv", "rbd_aio_write2", "rbd_aio_write_zeroes", "rbd_aio_discard",
        "rbd_aio_flush", "rbd_set_image_notification", "rbd_poll_io_events", "rbd_diff_iterate2",
    ):  # fmt: skip
        assert hasattr(librbd, name), name


class IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def c_api() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """librados and librbd with the signatures the test calls (64-bit offsets and sizes, and
    ssize_t results, would be cut to int without them)."""
    librados, librbd = ctypes.CDLL("librados.so.2"), ctypes.CDLL("librbd.so.1")
    p, p_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
    librados.rados_create2.argtypes = [p_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64]
    librados.rados_conf_read_file.argtypes = [p, ctypes.c_char_p]
    librados.rados_connect.argtypes = [p]
    librados.rados_ioctx_create.argtypes = [p, ctypes.c_char_p, p_p]
    librados.rados_ioctx_destroy.argtypes = [p]
    librados.rados_shutdown.argtypes = [p]
    librbd.rbd_create.argtypes = [p, ctypes.c_char_p, ctypes.c_uint64, ctypes.POINTER(ctypes.c_int)]
    librbd.rbd_open.argtypes = [p, ctypes.c_char_p, p_p, ctypes.c_char_p]
    librbd.rbd_close.argtypes = [p]
    librbd.rbd_set_image_notification.argtypes = [p, ctypes.c_int, ctypes.c_int]
    librbd.rbd_aio_create_completion.argtypes = [p, p, p_p]
    librbd.rbd_aio_release.argtypes = [p]
    librbd.rbd_aio_get_return_value.argtypes = [p]
    librbd.rbd_aio_get_return_value.restype = ctypes.c_ssize_t
    for name in ("rbd_aio_writev", "rbd_aio_readv"):
        getattr(librbd, name).argtypes = [p, ctypes.POINTER(IOVec), ctypes.c_int, ctypes.c_uint64, p]
    librbd.rbd_poll_io_events.argtypes = [p, p_p, ctypes.c_int]
    return librados, librbd


def test_librbd_vectored_aio_through_ctypes_completes_on_an_eventfd(ceph_cluster):
    librados, librbd = c_api()
    cluster, ioctx, image = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    assert librados.rados_create2(ctypes.byref(cluster), b"ceph", b"client.admin", 0) == 0
    try:
        assert librados.rados_conf_read_file(cluster, str(ceph_cluster.conf_path).encode()) == 0
        assert librados.rados_connect(cluster) == 0
        assert librados.rados_ioctx_create(cluster, b"rbd", ctypes.byref(ioctx)) == 0
        assert librbd.rbd_create(ioctx, b"ctypes", 16 * MiB, ctypes.byref(ctypes.c_int(0))) == 0
        assert librbd.rbd_open(ioctx, b"ctypes", ctypes.byref(image), None) == 0
        eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            assert librbd.rbd_set_image_notification(image, eventfd, 2) == 0  # EVENT_TYPE_EVENTFD
            parts = [os.urandom(MiB), os.urandom(64 * 1024)]
            sources = [ctypes.create_string_buffer(part, len(part)) for part in parts]
            # A write's completion says 0 when it succeeded, a read's the bytes it read.
            assert aio(librbd, image, eventfd, "rbd_aio_writev", sources, 5 * MiB) == 0
            sinks = [ctypes.create_string_buffer(len(part)) for part in parts]
            assert aio(librbd, image, eventfd, "rbd_aio_readv", sinks, 5 * MiB) == sum(map(len, parts))
            assert [sink.raw for sink in sinks] == parts
        finally:
            librbd.rbd_close(image)
            os.close(eventfd)
    finally:
        if ioctx:
            librados.rados_ioctx_destroy(ioctx)
        librados.rados_shutdown(cluster)


def aio(librbd: ctypes.CDLL, image: ctypes.c_void_p, eventfd: int, call: str, buffers: list, offset: int) -> int:
    """One vectored request without a callback: its completion comes back through the eventfd
    and rbd_poll_io_events, as an event loop would take it.  Its return value."""
    iov = (IOVec * len(buffers))(*(IOVec(ctypes.addressof(b), len(b)) for b in buffers))
    completion = ctypes.c_void_p()
    assert librbd.rbd_aio_create_completion(None, None, ctypes.byref(completion)) == 0
    try:
        assert getattr(librbd, call)(image, iov, len(buffers), offset, completion) == 0
        done = (ctypes.c_void_p * 4)()
        polled = 0
        while polled == 0:
            select.select([eventfd], [], [], 60)  # the eventfd turns readable when it completes
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(eventfd)
            polled = librbd.rbd_poll_io_events(image, done, len(done))
        assert polled == 1 and done[0] == completion.value
        return librbd.rbd_aio_get_return_value(completion)
    finally:
        librbd.rbd_aio_release(completion)
