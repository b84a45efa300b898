"""The agent: the one process per host that holds its leases and renews them.

``server`` is the agent itself; ``local`` is how commands find, start and talk to it;
``lease_check`` is a writing process's check that this host still holds its lease.
"""
