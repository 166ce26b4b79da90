"""``python -m agents.ops.cli``: the ``jobstream`` command."""

from agents.ops.cli import main

main()
