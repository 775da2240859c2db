#!/usr/bin/env python3
"""A Debian 12 guest with systemd as PID 1: the packaged units under a real service manager.

The root is built from Debian's packages with ``mmdebstrap`` (systemd, udev,
python3-venv, nbd-client, e2fsprogs) into an ext4 disk image, cached under a
hash of this recipe.  It boots with the same Debian kernel as the busybox
guest (``guest.py``): a small first stage loads the disk's modules, mounts it,
copies in this run's payload and hands over to systemd.  The payload is what
an admin would bring: this checkout's source and deploy/ files, the README,
and the Python wheels ``pip`` needs (the guest has no network), with the
scenarios from ``fs/scenarios/systemd/``.

The server and the kernel client both run inside the guest; scenarios report
on the serial console as in ``guest.py`` (``@@ SCENARIO name PASS``).

    fs/guest/systemd_guest.py build
    fs/guest/systemd_guest.py run install start restart stop
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import guest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "chroot"))
import debian_root  # noqa: E402

ROOT = HERE.parents[1]
STAGE1 = HERE / "stage1.sh"
SCENARIOS = ROOT / "fs" / "scenarios" / "systemd"
WRITER = SCENARIOS.parent / "_writer.sh"  # shared with the busybox guest's scenarios
PACKAGES = ("systemd", "systemd-sysv", "udev", "kmod", "nbd-client", "e2fsprogs", "python3", "python3-venv", "procps")
# What the Debian package depends on (the guest has no network to fetch it from).
PACKAGE_DEPENDS = ("python3-uvloop", "python3-prometheus-client")
STAGE1_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")
ROOT_MODULES = ("nbd", "loop")
DISK_SIZE = 3 << 30  # sparse; the root takes about 300 MiB, the scenarios' images the rest
# What pip needs without a network: the server's dependencies and its build backend.
WHEELS = ("uvloop", "prometheus-client", "setuptools>=61", "wheel")
# Files of the checkout the admin has (what `pip install .` and the install steps read).
CHECKOUT = ("pyproject.toml", "setup.py", "build_support", "README.md", "docs", "nbdserver", "deploy")

RUNNER_UNIT = """\
[Unit]
Description=the guest's scenarios
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh /root/payload/run
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""

RUNNER = """\
#!/bin/sh
# Run each scenario in order, report each, then power off at once (the disk is a throwaway overlay).
echo "@@ BOOTED $(uname -r), $(systemctl --version | head -n 1), PID 1 is $(cat /proc/1/comm)"
cd /root/payload
for name in $(cat scenarios/run); do
    echo "@@ START $name"
    started=$(cut -d' ' -f1 /proc/uptime)
    if sh -e "scenarios/$name.sh"; then outcome=PASS; else outcome=FAIL; fi
    ended=$(cut -d' ' -f1 /proc/uptime)
    echo "@@ SCENARIO $name $outcome $(awk "BEGIN { print $ended - $started }") s"
done
sync
systemctl poweroff --force --force
"""


@dataclass(frozen=True)
class Image:
    kernel: Path
    initramfs: Path  # stage one, without the payload
    disk: Path  # the root filesystem, never written: each run boots an overlay of it


def missing_tools() -> list[str]:
    missing = guest.missing_tools()
    missing += [tool for tool in ("mmdebstrap", "depmod", "mkfs.ext4", "qemu-img") if shutil.which(tool) is None]
    return missing


def build(cache: Path | None = None, log: Callable[[str], None] = print) -> Image:
    """The systemd guest, built once and cached."""
    cache = cache or guest.cache_dir()
    kernel = guest.build(cache, log)
    stamp = cache / f"systemd-{_recipe(kernel.release)}"
    if (stamp / "root.img").exists() and (stamp / "stage1.cpio").exists():
        return Image(kernel.kernel, stamp / "stage1.cpio", stamp / "root.img")
    missing = missing_tools()
    if missing:
        raise guest.GuestError(f"cannot build the systemd guest without: {', '.join(missing)}")
    stamp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        work = Path(tmp)
        log("systemd guest: unpacking the kernel's modules")
        package = guest._kernel_package()
        subprocess.run(["apt-get", "download", "-q", package], cwd=work, check=True, capture_output=True)
        (deb,) = work.glob("*.deb")
        kroot = work / "kernel"
        subprocess.run(["dpkg-deb", "-x", deb, kroot], check=True)
        moddir = kroot / "lib" / "modules" / kernel.release
        log("systemd guest: Debian 12 with systemd, from Debian's archive (mmdebstrap)")
        root = work / "root"
        mirror = os.environ.get("NBDSERVER_GUEST_MIRROR", "")  # default: what apt uses here
        debian_root.unpack("bookworm", PACKAGES + PACKAGE_DEPENDS, root, [mirror] if mirror else [])
        _customize(root, moddir, kernel.release)
        log("systemd guest: the root disk")
        disk = stamp / "root.img.tmp"
        with open(disk, "wb") as f:
            f.truncate(DISK_SIZE)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", root, disk], check=True, capture_output=True)
        (stamp / "stage1.tmp").write_bytes(_stage1(moddir))
    (stamp / "stage1.tmp").rename(stamp / "stage1.cpio")
    disk.rename(stamp / "root.img")
    return Image(kernel.kernel, stamp / "stage1.cpio", stamp / "root.img")


def _recipe(release: str) -> str:
    """A hash of what goes into the image (not of the payload's code, which each run brings)."""
    parts = [repr((PACKAGES, PACKAGE_DEPENDS, STAGE1_MODULES, ROOT_MODULES, DISK_SIZE, RUNNER_UNIT, release))]
    parts += [inspect.getsource(f) for f in (build, _customize, _stage1)]
    return hashlib.sha256("".join(parts).encode() + STAGE1.read_bytes()).hexdigest()[:16]


def _customize(root: Path, moddir: Path, release: str) -> None:
    """A machine that boots to the scenarios and powers off: no getty, no first-boot questions."""
    target = root / "lib" / "modules" / release
    for module in guest._module_order(moddir, ROOT_MODULES):
        dest = target / module.relative_to(moddir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, dest)
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (moddir / name).exists():
            shutil.copy2(moddir / name, target / name)
    subprocess.run(["depmod", "-b", root, release], check=True)
    (root / "etc" / "fstab").write_text("/dev/vda / ext4 rw,relatime 0 1\n")
    (root / "etc" / "hostname").write_text("guest\n")
    (root / "etc" / "machine-id").write_text("6e6264736572766572677565737430a1\n")  # not a first boot
    units = root / "etc" / "systemd" / "system"
    for unit in ("serial-getty@ttyS0.service", "getty@tty1.service", "systemd-firstboot.service"):
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    (units / "guest-run.service").write_text(RUNNER_UNIT)
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "guest-run.service").symlink_to("/etc/systemd/system/guest-run.service")


def _stage1(moddir: Path) -> bytes:
    archive = guest.Cpio()
    for directory in ("bin", "sbin", "dev", "proc", "sys", "lib", "newroot"):
        archive.directory(directory)
    archive.file("init", STAGE1.read_bytes(), 0o755)
    archive.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    names = []
    for module in guest._module_order(moddir, STAGE1_MODULES):
        archive.file(f"lib/modules/{module.name}", module.read_bytes(), 0o644)
        names.append(module.name)
    archive.file("lib/modules/load-order", ("\n".join(names) + "\n").encode(), 0o644)
    return archive.finish(trailer=True)


def wheels(cache: Path | None = None) -> Path:
    """The wheels pip needs in the guest (cached): the dependencies and the build backend."""
    folder = (cache or guest.cache_dir()) / "wheels"
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(folder)]
        subprocess.run([*pip, *WHEELS], check=True)
        (folder / ".complete").touch()
    return folder


def payload(names: Iterable[str], cache: Path | None = None, extra: Iterable[Path] = ()) -> bytes:
    """This run's payload as a cpio to append to stage one: checkout, wheels, runner, scenarios,
    and ``extra`` files (Debian packages, say) in payload/files/."""
    archive = guest.Cpio()
    archive.directory("payload")
    for path in extra:
        archive.file(f"payload/files/{path.name}", path.read_bytes(), 0o644)
    for name in CHECKOUT:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" not in file.parts and file.suffix != ".so":  # the source, as a clone has it
                archive.file(f"payload/src/{file.relative_to(ROOT)}", file.read_bytes(), 0o644)
    for wheel in sorted(wheels(cache).glob("*.whl")):
        archive.file(f"payload/wheels/{wheel.name}", wheel.read_bytes(), 0o644)
    for script in [*sorted(SCENARIOS.glob("*.sh")), WRITER]:
        archive.file(f"payload/scenarios/{script.name}", script.read_bytes(), 0o755)
    archive.file("payload/scenarios/run", ("\n".join(names) + "\n").encode(), 0o644)
    archive.file("payload/run", RUNNER.encode(), 0o755)
    return archive.finish(trailer=True)


def run(
    image: Image,
    scenarios: list[str],
    *,
    on_request: Callable[[str], None] = lambda request: None,
    memory_mib: int = 1536,
    timeout: float = 1500,
    echo: Callable[[str], None] | None = None,
    files: Iterable[Path] = (),
) -> guest.Result:
    """Boot the guest and run ``scenarios`` (names in fs/scenarios/systemd) in order, with
    ``files`` in /root/payload/files."""
    for name in scenarios:
        if not (SCENARIOS / f"{name}.sh").exists():
            raise guest.GuestError(f"no scenario {name} in {SCENARIOS}")
    accelerator = "kvm" if guest.kvm_usable() else "tcg"
    with tempfile.TemporaryDirectory(prefix="nbdserver-systemd-guest-") as tmp:
        overlay = Path(tmp) / "root.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk), "-F", "raw", str(overlay)], check=True
        )
        initrd = Path(tmp) / "initrd"
        initrd.write_bytes(image.initramfs.read_bytes() + payload(scenarios, extra=files))
        cpus = min(2, os.cpu_count() or 1)
        append = "systemd.show_status=false"
        cmd = [
            *guest.qemu_command(accelerator, image.kernel, initrd, cpus, memory_mib, append),
            "-drive",
            f"file={overlay},format=qcow2,if=virtio,cache=unsafe",
            "-nic",
            "none",
        ]
        return guest._supervise(cmd, scenarios, on_request, timeout, accelerator, echo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the guest (cached)")
    runner = commands.add_parser("run", help="boot it and run scenarios")
    runner.add_argument("scenario", nargs="+", help=", ".join(p.stem for p in sorted(SCENARIOS.glob("*.sh"))))
    args = parser.parse_args()
    image = build()
    if args.command == "build":
        print(image)
        return 0
    result = run(image, args.scenario, echo=print)
    return 0 if all(result.passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
