"""The operator surface: the ``jobstream`` command, the demo and the status page."""
