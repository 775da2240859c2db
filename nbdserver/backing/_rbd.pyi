"""The RBD engine's calls per request in C (_rbd.c): starting a READ or WRITE, reaping completions."""

from collections.abc import Sequence

from .file import Segment

KIND_READ: int
KIND_WRITE: int
KIND_WRITE_FUA: int

def bind(
    create_completion: int,
    readv: int,
    writev: int,
    write2: int,
    poll_io_events: int,
    get_return_value: int,
    get_arg: int,
    release: int,
    /,
) -> None: ...
def start(image: int, kind: int, offset: int, segments: Sequence[Segment], /) -> int: ...
def reap(image: int, eventfd: int, /) -> list[tuple[int, int]]: ...
