"""Python jobs the benchmarks run (kind ``pynoop``: entrypoint ``bench.jobs:noop``)."""


def noop() -> None:
    """Does nothing: what is measured is everything around it."""
