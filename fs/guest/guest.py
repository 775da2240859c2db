#!/usr/bin/env python3
"""A small QEMU guest that attaches an NBD export with the kernel's own client.

This machine's kernel may have no nbd module, so the kernel client runs in a
guest: Debian's ``linux-image-amd64`` kernel (nbd and ext4 are modules there)
booted straight into a busybox initramfs that carries ``nbd-client``,
``mkfs.ext4`` and ``e2fsck``.  The guest's only way out is one address,
10.0.2.100:10809, which QEMU's user network (``restrict=on``) relays to the
NBD server on the host's loopback, one host connection per guest connection.

A scenario is a shell script from ``fs/scenarios/``, run by the guest's init;
its output comes back on the serial console, and its last line says how it
ended (``@@ SCENARIO name PASS`` or ``FAIL``).  Lines starting with ``@@ HOST``
ask the host for something (``@@ HOST kill``: kill the server; the caller
decides what that means); the guest waits until the host has done it and
answers with a line on the console's input, so that what the guest does next
comes after it (a counter snapshot taken at ``@@ HOST mark`` holds none of it).

    fs/guest/guest.py build                      # build the guest (cached)
    fs/guest/guest.py run --port 10809 ext4      # run scenarios against a server on 127.0.0.1:10809

From the command line, ``@@ HOST`` requests are answered but not acted on, so the scenarios that need the server killed
or restarted (crash, restart) fail there; tests/e2e/test_guest.py acts on them.

The guest is built from the Debian packages of this machine's APT sources
(the kernel is downloaded and unpacked, not installed) and cached in
``$NBDSERVER_GUEST_CACHE`` (default ``~/.cache/nbdserver-guest``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE.parent / "scenarios"
INIT = HERE / "init.sh"
GUEST_ADDRESS = "10.0.2.100"
GUEST_PORT = 10809

# Modules the scenarios need; their dependencies are found in the modules themselves.
MODULES = ("virtio_pci", "virtio_net", "nbd", "crc32c_generic", "ext4")
# Programs and the libraries they link, taken from this machine (Debian 12, like the guest's kernel).
PROGRAMS = {
    "/sbin/nbd-client": "nbd-client",
    "/sbin/mke2fs": "e2fsprogs",
    "/sbin/e2fsck": "e2fsprogs",
    "/bin/busybox": "busybox-static",
}
MARKER = "@@ "


class GuestError(RuntimeError):
    pass


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "nbdserver-guest"
    return Path(os.environ.get("NBDSERVER_GUEST_CACHE", default))


def missing_tools() -> list[str]:
    """What the host lacks to build and boot the guest (empty when everything is there)."""
    needed = ["qemu-system-x86_64", "socat", "apt-get", "dpkg-deb"]
    missing = [tool for tool in needed if shutil.which(tool) is None]
    missing += [path for path in PROGRAMS if not Path(path).exists()]
    return missing


# Building ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    kernel: Path  # uncompressed vmlinux: QEMU boots it through its PVH entry, much faster than bzImage
    initramfs: Path  # everything but the scenarios
    release: str  # the kernel's version string


def build(cache: Path | None = None, log: Callable[[str], None] = print) -> Image:
    """The guest image, built once and cached."""
    cache = cache or cache_dir()
    # A new image whenever the recipe (this file) or the init changes.
    recipe = hashlib.sha256(Path(__file__).read_bytes() + INIT.read_bytes()).hexdigest()[:16]
    stamp = cache / f"image-{recipe}"
    if (stamp / "vmlinux").exists() and (stamp / "initramfs.cpio").exists():
        return Image(stamp / "vmlinux", stamp / "initramfs.cpio", (stamp / "release").read_text())
    missing = missing_tools()
    if missing:
        raise GuestError(f"cannot build the guest without: {', '.join(missing)}")
    stamp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        work = Path(tmp)
        log("guest: downloading the kernel package")
        package = _kernel_package()
        subprocess.run(["apt-get", "download", "-q", package], cwd=work, check=True, capture_output=True)
        (deb,) = work.glob("*.deb")
        root = work / "root"
        subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
        (vmlinuz,) = (root / "boot").glob("vmlinuz-*")
        release = vmlinuz.name.removeprefix("vmlinuz-")
        log(f"guest: kernel {release}: extracting vmlinux, building the initramfs")
        (stamp / "vmlinux.tmp").write_bytes(_extract_vmlinux(vmlinuz.read_bytes()))
        modules = _module_order(root / "lib" / "modules" / release, MODULES)
        (stamp / "initramfs.tmp").write_bytes(_initramfs(root, release, modules))
    (stamp / "release").write_text(release)
    (stamp / "vmlinux.tmp").rename(stamp / "vmlinux")
    (stamp / "initramfs.tmp").rename(stamp / "initramfs.cpio")
    return Image(stamp / "vmlinux", stamp / "initramfs.cpio", release)


def _kernel_package() -> str:
    """The versioned package linux-image-amd64 points at (apt-get download wants a real package)."""
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True).stdout
    match = re.search(r"Depends: (linux-image-\S+-amd64)", out)
    if match is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True).stdout
        match = re.search(r"Depends: (linux-image-\S+-amd64)", out)
    if match is None:
        raise GuestError("apt knows no linux-image-amd64")
    return match.group(1)


def _extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage (Debian compresses it with xz)."""
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise GuestError("no xz stream in the kernel image")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    if not elf.startswith(b"\x7fELF"):
        raise GuestError("the kernel image holds no ELF kernel")
    return elf


def _module_order(moddir: Path, wanted: Iterable[str]) -> list[Path]:
    """Module files in an order that loads: each after what it depends on (read from .modinfo)."""
    files = {p.name.removesuffix(".ko").replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[Path] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name not in files:
            raise GuestError(f"module {name} is not in {moddir}")
        if files[name] in order:
            return
        if name in path:
            raise GuestError(f"module dependency cycle: {' -> '.join((*path, name))}")
        match = re.search(rb"\0depends=([^\0]*)\0", b"\0" + files[name].read_bytes())
        for dep in filter(None, (match.group(1).decode().split(",") if match else [])):
            visit(dep, (*path, name))
        order.append(files[name])

    for name in wanted:
        visit(name, ())
    return order


def _libraries(programs: Iterable[str]) -> set[Path]:
    """Shared libraries (and the loader) the programs need, as ldd resolves them here."""
    libs: set[Path] = set()
    for program in programs:
        out = subprocess.run(["ldd", program], capture_output=True, text=True).stdout
        for line in out.splitlines():
            match = re.search(r"(/\S+) \(0x", line)
            if match:
                libs.add(Path(match.group(1)))
    return libs


def _initramfs(root: Path, release: str, modules: list[Path]) -> bytes:
    archive = Cpio()
    for directory in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "etc", "lib", "lib64", "run", "scenarios"):
        archive.directory(directory)
    archive.file("init", INIT.read_bytes(), 0o755)
    archive.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    for program in PROGRAMS:
        if program != "/bin/busybox":
            archive.file(program.lstrip("/"), Path(program).read_bytes(), 0o755)
    archive.symlink("sbin/mkfs.ext4", "mke2fs")
    archive.symlink("sbin/fsck.ext4", "e2fsck")  # for busybox's fsck
    for lib in sorted(_libraries(p for p in PROGRAMS if p != "/bin/busybox")):
        real = lib.resolve()
        archive.file(str(lib).lstrip("/"), real.read_bytes(), 0o755)
    archive.directory("lib/modules")
    names = []
    for module in modules:
        archive.file(f"lib/modules/{module.name}", module.read_bytes(), 0o644)
        names.append(module.name)
    archive.file("lib/modules/load-order", ("\n".join(names) + "\n").encode(), 0o644)
    archive.file("etc/release", release.encode(), 0o644)
    archive.symlink("etc/mtab", "/proc/mounts")  # e2fsck asks it whether the device is mounted
    if Path("/etc/mke2fs.conf").exists():
        archive.file("etc/mke2fs.conf", Path("/etc/mke2fs.conf").read_bytes(), 0o644)
    return archive.finish(trailer=True)


class Cpio:
    """A "newc" cpio archive, as the kernel unpacks an initramfs.  Parents must be added first."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1
        self._seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        if name in self._seen:
            return
        self._seen.add(name)
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, b"")

    def file(self, name: str, data: bytes, mode: int) -> None:
        parts = name.split("/")
        for i in range(1, len(parts)):
            self.directory("/".join(parts[:i]))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self, trailer: bool) -> bytes:
        if trailer:
            self._entry("TRAILER!!!", 0, b"")
        return self._out.getvalue()


def scenario_archive(names: Iterable[str]) -> bytes:
    """The scenarios (and their shared helpers) as a second cpio, appended to the cached one."""
    archive = Cpio()
    archive.directory("scenarios")
    for path in sorted(SCENARIOS.glob("*.sh")):
        archive.file(f"scenarios/{path.name}", path.read_bytes(), 0o755)
    archive.file("scenarios/run", ("\n".join(names) + "\n").encode(), 0o644)
    return archive.finish(trailer=True)


# Booting ----------------------------------------------------------------------------------------


def kvm_usable() -> bool:
    """KVM only where a real one is loaded: a paravirtual /dev/kvm hangs stock kernels at boot."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK) and any(
        Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd")
    )


@dataclass
class Result:
    passed: dict[str, bool]  # scenario -> passed
    console: list[str]  # every line the guest printed
    boot_seconds: float  # from QEMU's start to the first scenario
    accelerator: str

    def lines(self, prefix: str) -> list[str]:
        return [line[line.find(prefix) :] for line in self.console if prefix in line]


def run(
    image: Image,
    port: int,
    scenarios: list[str],
    *,
    on_request: Callable[[str], None] = lambda request: None,
    cpus: int | None = None,
    memory_mib: int = 768,
    timeout: float = 900,
    echo: Callable[[str], None] | None = None,
) -> Result:
    """Boot the guest with its network relayed to 127.0.0.1:``port``; run ``scenarios`` in order.

    ``on_request`` is called for each ``@@ HOST ...`` line, with the rest of the line.
    """
    for name in scenarios:
        if not (SCENARIOS / f"{name}.sh").exists():
            raise GuestError(f"no scenario {name} in {SCENARIOS}")
    cpus = cpus or min(2, os.cpu_count() or 1)  # never more than the host has
    accelerator = "kvm" if kvm_usable() else "tcg"
    if accelerator == "tcg":
        print("guest: no usable KVM (kvm_intel/kvm_amd not loaded): software emulation (TCG)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="nbdserver-guest-") as tmp:
        initrd = Path(tmp) / "initrd"
        initrd.write_bytes(image.initramfs.read_bytes() + scenario_archive(scenarios))
        # QEMU splits the command like a shell but runs no shell, and the command's stderr is the
        # guest's stream too: a shell sends socat's complaints elsewhere.  While the server restarts,
        # the relay retries (for 10 s), so a client reconnecting at once finds it back.
        relay = f"sh -c 'exec socat - TCP:127.0.0.1:{port},retry=50,interval=0.2 2>/dev/null'"
        cmd = [
            *qemu_command(accelerator, image.kernel, initrd, cpus, memory_mib),
            "-netdev",
            # A comma in an option's value is written twice.
            f"user,id=net0,restrict=on,guestfwd=tcp:{GUEST_ADDRESS}:{GUEST_PORT}-cmd:{relay.replace(',', ',,')}",
            "-device",
            "virtio-net-pci,netdev=net0,romfile=",
        ]
        return _supervise(cmd, scenarios, on_request, timeout, accelerator, echo)


def qemu_command(
    accelerator: str, kernel: Path, initrd: Path, cpus: int, memory_mib: int, append: str = ""
) -> list[str]:
    """QEMU booting ``kernel`` with ``initrd``, its serial console on our stdin and stdout; no devices yet."""
    return [
        "qemu-system-x86_64",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-machine",
        f"q35,accel={accelerator}",
        "-cpu",
        "max" if accelerator == "tcg" else "host",
        "-smp",
        str(cpus),
        "-m",
        str(memory_mib),
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        f"console=ttyS0 panic=-1 quiet loglevel=4 tsc=reliable no_timer_check mitigations=off {append}".strip(),
        "-serial",
        "stdio",
    ]


def _supervise(cmd, scenarios, on_request, timeout, accelerator, echo) -> Result:
    started = time.monotonic()
    boot = 0.0
    passed: dict[str, bool] = {}
    console: list[str] = []
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with _deadline(proc, timeout):
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                console.append(line)
                if echo is not None:
                    echo(line)
                at = line.find(MARKER)  # the firmware's last words may share the line
                if at < 0:
                    continue
                words = line[at + len(MARKER) :].split()
                if words[:1] == ["BOOTED"] and not boot:
                    boot = time.monotonic() - started
                elif words[:1] == ["SCENARIO"] and len(words) >= 3:
                    passed[words[1]] = words[2] == "PASS"
                elif words[:1] == ["HOST"]:
                    on_request(" ".join(words[1:]))
                    _answer(proc)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if time.monotonic() - started >= timeout:
        raise GuestError(f"the guest did not finish in {timeout:.0f} s:\n" + "\n".join(console[-40:]))
    if not boot:
        raise GuestError("the guest did not boot:\n" + "\n".join(console[-40:]))
    for name in scenarios:
        passed.setdefault(name, False)
    return Result(passed, console, boot, accelerator)


def _answer(proc: subprocess.Popen) -> None:
    """Tell the guest, through its serial console, that its request is done."""
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # the guest is gone: nobody waits
        proc.stdin.write(b"done\n")
        proc.stdin.flush()


@contextlib.contextmanager
def _deadline(proc: subprocess.Popen, timeout: float) -> Iterator[None]:
    """Kill ``proc`` once ``timeout`` seconds have passed (the console read then ends)."""
    timer = threading.Timer(timeout, proc.kill)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the guest image (cached)")
    runner = commands.add_parser("run", help="run scenarios against a server on 127.0.0.1:PORT")
    runner.add_argument("--port", type=int, default=GUEST_PORT)
    runner.add_argument("scenario", nargs="+", help=", ".join(p.stem for p in sorted(SCENARIOS.glob("[!_]*.sh"))))
    args = parser.parse_args()
    image = build()
    if args.command == "build":
        print(f"{image.kernel}\n{image.initramfs}")
        return 0
    result = run(image, args.port, args.scenario, echo=print)
    print(f"boot {result.boot_seconds:.1f} s ({result.accelerator})")
    return 0 if all(result.passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
