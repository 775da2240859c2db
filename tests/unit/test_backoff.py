"""The back-off that skips an in-place attempt which keeps failing (page-cache reads, hole checks)."""

from nbdserver.backing.file import Backoff


def skipped(backoff: Backoff, calls: int) -> int:
    return sum(backoff.skip() for _ in range(calls))


def test_failures_skip_a_doubling_number_of_attempts_up_to_the_limit():
    backoff = Backoff(8)
    assert not backoff.skip()  # nothing failed yet
    runs = []
    for _ in range(6):
        backoff.failed()
        runs.append(skipped(backoff, 100))
    assert runs == [1, 2, 4, 8, 8, 8]


def test_a_success_starts_over():
    backoff = Backoff(64)
    for _ in range(5):
        backoff.failed()
    assert skipped(backoff, 100) == 16
    backoff.worked()
    backoff.failed()
    assert skipped(backoff, 100) == 1


def test_a_limit_of_zero_never_skips():
    backoff = Backoff(0)
    for _ in range(10):
        backoff.failed()
        assert not backoff.skip()
