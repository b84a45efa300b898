"""The data path: a project on the share, its image databases, and how cached writes reach it.

``project`` is a project's identity and fence on the share; ``store`` its flushed segments and
index; ``view`` a read-only look at them; ``imagedb`` the databases users open; ``flushing``
moves a host's cache to the share; ``durable`` and ``uncached`` are the file-system steps
that make a flush durable and check it.
"""
