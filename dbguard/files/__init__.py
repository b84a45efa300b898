"""Ordinary files written by the field's own tools (MRC, HDF5, TIFF, numpy, text), under the lease.

`run.py` holds the lease for the life of a command; `guard.py` checks every way those libraries
open a file for writing against this host's writer lease, and `startup.py` installs those checks
in every Python process when ``DBGUARD_GUARD=1``; `transfer.py` imports and exports their formats.
"""
