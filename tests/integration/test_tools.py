"""External NBD clients (libnbd tools, qemu, fio) against a real server process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IMAGE_SIZE, make_image

MiB = 1024 * 1024
WRITE_FLAGS = ["flush", "fua", "trim", "zero", "fast-zero", "write"]
ANY_FLAGS = ["cache", "multi-conn", "df", "read", "structured-reply"]

pytestmark = pytest.mark.clients  # every test here runs client programs


def run(
    *cmd: str | os.PathLike[str], timeout: float = 120, check: bool = True, **kwargs
) -> subprocess.CompletedProcess:
    if not shutil.which(str(cmd[0])):
        pytest.skip(f"{cmd[0]} is not installed")
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert result.returncode == 0, f"{cmd} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def nbdinfo_json(*args: str) -> dict:
    return json.loads(run("nbdinfo", "--json", *args).stdout)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


@pytest.fixture
def pair(start_server, tmp_path):
    """Two named exports: ``alpha`` (64 MiB, writable) and ``beta`` (16 MiB, read-only)."""
    alpha, beta = make_image(tmp_path / "alpha.img"), make_image(tmp_path / "beta.img", 16 * MiB)
    return start_server(
        "--export",
        f"name=alpha,path={alpha},description=first disk, with a comma",
        "--export",
        f"name=beta,path={beta},read-only,description=second",
    )


# nbdinfo ------------------------------------------------------------------------------------


def test_nbdinfo_json_writable_export(server):
    (export,) = nbdinfo_json(server.uri())["exports"]
    assert export["export-size"] == IMAGE_SIZE
    assert export["is_read_only"] is False
    flags = ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_multi_conn", "can_df"]
    assert {f: export[f] for f in flags} == dict.fromkeys(flags, True)
    assert "base:allocation" in export["contexts"]


def test_nbdinfo_json_read_only_export(start_server, image):
    server = start_server(image, "--read-only")
    (export,) = nbdinfo_json(server.uri())["exports"]
    assert export["export-size"] == IMAGE_SIZE
    assert export["is_read_only"] is True
    assert not any(export[f] for f in ("can_trim", "can_zero", "can_fast_zero", "can_fua"))


def test_nbdinfo_list_named_exports(pair):
    exports = {e["export-name"]: e for e in nbdinfo_json("--list", pair.uri())["exports"]}
    assert sorted(exports) == ["alpha", "beta"]
    assert exports["alpha"]["description"] == "first disk, with a comma"
    assert exports["beta"]["description"] == "second"
    assert (exports["alpha"]["export-size"], exports["beta"]["export-size"]) == (IMAGE_SIZE, 16 * MiB)
    assert (exports["alpha"]["is_read_only"], exports["beta"]["is_read_only"]) == (False, True)


def test_nbdinfo_size(pair):
    sizes = [int(run("nbdinfo", "--size", pair.uri(n)).stdout) for n in ("alpha", "beta")]
    assert sizes == [IMAGE_SIZE, 16 * MiB]


def test_nbdinfo_can_exit_codes(pair):
    """``--can X`` exits 0 for true and 2 for false."""

    def codes(name: str) -> dict[str, int]:
        got = {f: run("nbdinfo", "--can", f, pair.uri(name), check=False).returncode for f in WRITE_FLAGS + ANY_FLAGS}
        got["is read-only"] = run("nbdinfo", "--is", "read-only", pair.uri(name), check=False).returncode
        return got

    assert codes("alpha") == {**dict.fromkeys(WRITE_FLAGS + ANY_FLAGS, 0), "is read-only": 2}
    assert codes("beta") == {**dict.fromkeys(WRITE_FLAGS, 2), **dict.fromkeys(ANY_FLAGS, 0), "is read-only": 0}


def test_nbdinfo_map_shows_written_data(server):
    run("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "write -P 0xcd 8M 1M", server.uri())
    extents = json.loads(run("nbdinfo", "--map", "--json", server.uri()).stdout)
    assert [e["offset"] for e in extents] == [0, *(e["offset"] + e["length"] for e in extents[:-1])]
    assert extents[-1]["offset"] + extents[-1]["length"] == IMAGE_SIZE

    def kind(offset: int) -> str:
        return next(e["description"] for e in extents if e["offset"] <= offset < e["offset"] + e["length"])

    assert [kind(o) for o in (1 * MiB, 1 * MiB + 65535, 8 * MiB, 9 * MiB - 1)] == ["data"] * 4
    assert [kind(o) for o in (0, 4 * MiB, 9 * MiB, IMAGE_SIZE - 1)] == ["hole,zero"] * 4
    run("qemu-io", "-f", "raw", "-c", "discard 8M 1M", server.uri())
    after = json.loads(run("nbdinfo", "--map", "--json", server.uri()).stdout)
    assert [e["description"] for e in after if e["offset"] <= 8 * MiB < e["offset"] + e["length"]] == ["hole,zero"]
    totals = run("nbdinfo", "--map", "--totals", server.uri()).stdout
    data_line = next(line for line in totals.splitlines() if line.strip().endswith("data"))
    assert int(data_line.split()[0]) == 64 * 1024


# qemu-img and qemu-io -----------------------------------------------------------------------


def test_qemu_img_info(server):
    info = json.loads(run("qemu-img", "info", "--output=json", server.uri()).stdout)
    assert (info["virtual-size"], info["format"]) == (IMAGE_SIZE, "raw")


def test_qemu_img_convert_and_compare(server, image, tmp_path):
    source = make_image(tmp_path / "source.raw")
    with open(source, "r+b") as f:
        for offset in (0, 5 * MiB + 4096, 40 * MiB + 123, IMAGE_SIZE - MiB):
            f.seek(offset)
            f.write(os.urandom(MiB))
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, server.uri())
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri(), out)
    assert sha256(out) == sha256(source) == sha256(image)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", source, out)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri(), image)
    with open(image, "r+b") as f:  # a change behind the server's back must show
        f.seek(40 * MiB + 200)
        flipped = bytes([f.read(1)[0] ^ 0xFF])
        f.seek(40 * MiB + 200)  # the read moved the position on
        f.write(flipped)
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri(), source, check=False).returncode == 1


@pytest.mark.parametrize("offset", [0, 12345, 4 * MiB - 512, IMAGE_SIZE - 256 * 1024])
def test_qemu_io_patterns(server, image, offset):
    o = offset
    commands = [
        f"write -P 0x5a {o} 128k",
        f"read -P 0x5a {o} 128k",
        f"write -z {o + 4096} 8k",
        f"read -P 0 {o + 4096} 8k",
        f"read -P 0x5a {o + 12288} 4k",
        f"discard {o + 64 * 1024} 32k",
        f"read -P 0 {o + 64 * 1024} 32k",
        f"aio_write -P 0x11 {o + 128 * 1024} 64k",
        f"aio_write -P 0x22 {o + 192 * 1024} 64k",
        "aio_flush",
        f"aio_read -P 0x11 {o + 128 * 1024} 64k",
        f"aio_read -P 0x22 {o + 192 * 1024} 64k",
        "aio_flush",
        "flush",
    ]
    result = run("qemu-io", "-f", "raw", *(a for c in commands for a in ("-c", c)), server.uri())
    assert "failed" not in result.stdout + result.stderr
    expected = bytearray(b"\x5a" * (128 * 1024) + b"\x11" * (64 * 1024) + b"\x22" * (64 * 1024))
    expected[4096 : 4096 + 8192] = bytes(8192)
    expected[64 * 1024 : 96 * 1024] = bytes(32 * 1024)
    with open(image, "rb") as f:
        f.seek(o)
        assert f.read(len(expected)) == expected
    bad = run("qemu-io", "-f", "raw", "-c", f"read -P 0x77 {o} 4k", server.uri(), check=False)
    assert bad.returncode != 0 and "Pattern verification failed" in bad.stdout + bad.stderr


# nbdcopy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [[], ["--connections=4", "--requests=64"]], ids=["default", "parallel"])
def test_nbdcopy_round_trip(start_server, tmp_path, options):
    image = make_image(tmp_path / "disk.img", 32 * MiB)
    server = start_server(image)
    source, out = random_file(tmp_path / "source.bin", 32 * MiB), tmp_path / "out.bin"
    run("nbdcopy", *options, source, server.uri())
    assert sha256(image) == sha256(source)
    run("nbdcopy", *options, server.uri(), out)
    assert sha256(out) == sha256(source)


# fio ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job",
    [
        ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=16M"],
        ["--rw=write", "--bs=1M", "--iodepth=8", "--size=48M"],
    ],
    ids=["randwrite-4k", "write-1M"],
)
def test_fio_verify(server, image, tmp_path, job):
    report = tmp_path / "fio.json"
    result = run(
        "fio",
        "--name=nbd",
        "--ioengine=nbd",
        f"--uri={server.uri()}",
        *job,
        "--verify=crc32c",
        "--do_verify=1",
        "--output-format=json",
        f"--output={report}",
        timeout=300,
        cwd=tmp_path,  # fio leaves its verify state file in the working directory
    )
    assert "verify" not in result.stderr.lower()
    (stats,) = json.loads(report.read_text())["jobs"]
    size = int(job[-1].removeprefix("--size=").removesuffix("M")) * MiB
    assert stats["error"] == 0
    assert stats["write"]["io_bytes"] == size
    assert stats["read"]["io_bytes"] == size  # the verify pass read everything back
    with open(image, "rb") as f:
        written = f.read(size)
    assert written.count(0) < size // 2  # the data really reached the backing file


# nbdsh --------------------------------------------------------------------------------------


def nbdsh(uri: str, code: str) -> subprocess.CompletedProcess:
    # nbdsh runs "python3 -m nbd": use the interpreter that can import libnbd's bindings.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return run("nbdsh", "-u", uri, "-c", code, check=False, env=env)


def test_nbdsh_write_and_read(server, image):
    expected = bytearray(b"nbdsh!" * 1000)
    expected[1000:2000] = bytes(1000)
    code = (
        "h.pwrite(b'nbdsh!' * 1000, 70001)\n"
        "assert h.pread(6000, 70001) == b'nbdsh!' * 1000\n"
        "h.zero(1000, 71001)\n"
        f"assert h.pread(6000, 70001) == {bytes(expected)!r}\n"
        "h.flush()\n"
    )
    result = nbdsh(server.uri(), code)
    assert result.returncode == 0, result.stderr
    with open(image, "rb") as f:
        f.seek(70001)
        assert f.read(6000) == expected
    assert nbdsh(server.uri(), "assert h.pread(6, 70001) == b'nope!!'").returncode != 0


def test_the_client_programs_are_of_the_generation_asked_for(request):
    """Debian 12's on this machine, or with --clients current Debian 13's from the chroot."""
    current = request.config.getoption("--clients") == "current"
    expected = {
        ("nbdinfo", "--version"): "nbdinfo 1.22." if current else "nbdinfo 1.14.",
        ("nbdcopy", "--version"): "nbdcopy 1.22." if current else "nbdcopy 1.14.",
        ("qemu-img", "--version"): "qemu-img version 10." if current else "qemu-img version 7.2",
        ("qemu-io", "--version"): "qemu-io version 10." if current else "qemu-io version 7.2",
        ("fio", "--version"): "fio-3.39" if current else "fio-3.33",
    }
    for argv, start in expected.items():
        assert run(*argv).stdout.startswith(start), (argv, start)
