"""RBD exports in the configuration: how images are named, where the names are accepted, what is
refused, and how many processes serve them.  No cluster: nothing here connects."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from nbdserver import configfile
from nbdserver.backing.librbd import RbdName, allocation_extents, client_name, rbd_name
from nbdserver.cli import build_parser, config_from_args
from nbdserver.config import ConfigError, ExportConfig, ServerConfig, parse_export

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("rbd:rbd/disk", RbdName("rbd", "disk")),
        ("rbd:pool/ns/disk", RbdName("pool", "disk", "ns")),
        ("/srv/disk.img", None),
        ("./rbd:a/b", None),  # a file whose name starts so is written with a directory in front
    ],
)
def test_image_names(text, name):
    assert rbd_name(text) == name
    if name is not None:
        assert str(name) == text


@pytest.mark.parametrize("text", ["rbd:", "rbd:pool", "rbd:/disk", "rbd:pool/", "rbd:a/b/c/d", "rbd:pool/disk@snap"])
def test_bad_image_names(text):
    with pytest.raises(ValueError, match="rbd:"):
        rbd_name(text)


def test_client_names():
    assert client_name(None) == "client.admin"
    assert client_name("nbd") == "client.nbd"
    assert client_name("client.nbd") == "client.nbd"


def serve(*argv: str) -> ServerConfig:
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_positional_export_with_server_wide_cluster_settings():
    config = serve("--rbd-conf", "/etc/ceph/x.conf", "--rbd-id", "nbd", "--rbd-timeout", "7", "rbd:p/ns/img")
    (export,) = config.exports
    assert export.rbd == RbdName("p", "img", "ns")
    assert (config.rbd_conf, config.rbd_id, config.rbd_timeout) == (Path("/etc/ceph/x.conf"), "nbd", 7.0)


def test_export_spec_with_its_own_cluster_settings():
    export = parse_export("name=vm,path=rbd:rbd/vm,rbd-conf=/c.conf,rbd-id=me,read-only")
    assert export.rbd == RbdName("rbd", "vm")
    assert (export.rbd_conf, export.rbd_id, export.read_only) == (Path("/c.conf"), "me", True)
    assert export.rbd_exclusive is None  # as the server says
    assert parse_export("name=vm,path=rbd:rbd/vm,rbd-exclusive").rbd_exclusive is True


def test_exclusive_for_every_rbd_export_or_one(tmp_path):
    assert serve("rbd:rbd/vm").rbd_exclusive is False
    assert serve("--rbd-exclusive", "rbd:rbd/vm").rbd_exclusive is True
    path = tmp_path / "nbd.toml"
    path.write_text(
        'rbd-exclusive = true\n[[export]]\nname = "a"\npath = "rbd:rbd/a"\n'
        '[[export]]\nname = "b"\npath = "rbd:rbd/b"\nrbd-exclusive = false\n'
    )
    config = configfile.load(path)
    config.validate()
    assert config.rbd_exclusive is True
    assert [e.rbd_exclusive for e in config.exports] == [None, False]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "1G", "rbd:rbd/vm"], "a size creates files, not RBD images: create it with rbd create"),
        (["rbd:rbd"], "rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE"),
        (["--export", "name=a,path=/tmp/a.img,rbd-id=x"], "rbd-conf, rbd-id and rbd-exclusive are for RBD images"),
        (["--export", "name=a,path=/tmp/a.img,rbd-exclusive"], "rbd-exclusive are for RBD images"),
        (["--rbd-timeout", "0", "rbd:rbd/vm"], "RBD timeout must be positive"),
    ],
)
def test_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        serve(*argv)


def test_configuration_file_keeps_image_names_and_resolves_the_cluster_file(tmp_path):
    path = tmp_path / "nbd.toml"
    path.write_text(
        'rbd-conf = "ceph.conf"\nrbd-id = "nbd"\nrbd-timeout = 5\n'
        '[[export]]\nname = "a"\npath = "rbd:rbd/a"\n'
        '[[export]]\nname = "b"\npath = "rbd:rbd/b"\nrbd-conf = "other.conf"\nrbd-id = "b"\n'
        '[[export]]\nname = "f"\npath = "f.img"\n'
    )
    config = configfile.load(path)
    config.validate()
    a, b, f = config.exports
    assert a.path == Path("rbd:rbd/a") and a.rbd == RbdName("rbd", "a") and a.rbd_conf is None
    assert b.rbd_conf == tmp_path / "other.conf" and b.rbd_id == "b"
    assert f.path == tmp_path / "f.img" and f.rbd is None
    assert (config.rbd_conf, config.rbd_id, config.rbd_timeout) == (tmp_path / "ceph.conf", "nbd", 5.0)


def test_check_config_validates_without_connecting(tmp_path):
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\n")
    path = tmp_path / "nbd.toml"
    path.write_text(f'rbd-conf = "{conf}"\n[[export]]\nname = "a"\npath = "rbd:rbd/a"\n')
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    assert "1 RBD image(s) not checked: the cluster is not contacted" in result.stdout
    conf.unlink()
    result = check_config(path)
    assert result.returncode == 1 and f"rbd-conf {conf}: does not exist" in result.stderr
    path.write_text('[[export]]\nname = "a"\npath = "rbd:rbd"\n')
    result = check_config(path)
    assert result.returncode == 1 and "rbd:POOL/IMAGE" in result.stderr


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nbdserver", "check-config", str(path)], capture_output=True, text=True, timeout=60
    )


def test_one_worker_process_at_most_with_an_rbd_export():
    files = [ExportConfig("f", Path("/tmp/f.img"))]
    image = [ExportConfig("i", Path("rbd:rbd/i"))]
    assert ServerConfig(exports=files, processes=4).worker_processes == 4
    assert ServerConfig(exports=files + image, processes=4).worker_processes == 1
    assert ServerConfig(exports=files + image, processes=4).asked_processes == 4
    assert ServerConfig(exports=image, processes=1).worker_processes == 0  # this process serves
    assert ServerConfig(exports=image).worker_processes == 1  # auto


def test_allocation_to_extents():
    # Ranges as librbd reports them (whole objects' prefixes), clipped to the range asked.
    assert allocation_extents(0, 16 * MiB, []) == [(16 * MiB, True)]
    assert allocation_extents(MiB, 8 * MiB, [(0, 2 * MiB), (8 * MiB, 4096)]) == [
        (MiB, False),
        (6 * MiB, True),
        (4096, False),
        (MiB - 4096, True),
    ]
    assert allocation_extents(0, 4 * MiB, [(MiB, MiB), (0, MiB)]) == [(2 * MiB, False), (2 * MiB, True)]
    assert allocation_extents(0, 4 * MiB, [(0, 4 * MiB), (MiB, MiB)]) == [(4 * MiB, False)]


class TwoWorkers:
    """What a primary's Server sees of a pool of two worker processes, for a reload."""

    count = 2

    def __init__(self) -> None:
        self.on_room: list = []
        self.sent: list[ServerConfig] = []

    def reload(self, config: ServerConfig) -> None:
        self.sent.append(config)


def test_a_reload_adds_no_rbd_export_to_a_server_with_several_workers(tmp_path):
    from nbdserver.serving.server import Server

    file = tmp_path / "f.img"
    file.write_bytes(bytes(4096))
    workers = TwoWorkers()
    server = Server(ServerConfig(exports=[ExportConfig("f", file)], processes=2, engine="threads"), workers=workers)  # type: ignore[arg-type]
    new = ServerConfig(
        exports=[ExportConfig("f", file), ExportConfig("i", Path("rbd:rbd/i"))], processes=2, engine="threads"
    )
    server.open_exports()
    try:
        changed, refused = asyncio.run(server.reload(new))
    finally:
        for export in server.exports.values():
            export.engine.close()
    assert not changed
    assert any("export 'i' not added: an RBD image is served by one process" in r for r in refused), refused
    assert [e.name for e in workers.sent[0].exports] == ["f"]  # the workers do not open it either
