"""Python jobs the benchmarks run (kind ``pynoop``: entrypoint ``bench.jobs:noop``)."""


def noop() -> None:
    """Does nothing: what is measured is everything around it."""


def work(seconds: float = 0.0) -> None:
    """Busy for ``seconds`` (a sleep: the slot is taken, the CPU is not)."""
    import time

    time.sleep(seconds)
