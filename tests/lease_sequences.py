"""The lease operations that the property tests generate, shared so that one rule book is
checked twice: tests/test_lease_model.py drives the lease table (dbguard/lease/rules.py) with
them against a model, and tests/test_lease_rules_etcd.py drives the embedded broker and the etcd
service with the same sequences and compares their replies.

Each kind of step is a rule decorator, ``@ACQUIRE_WRITE`` on the method that carries it out.
Tokens and floors are symbolic (`TOKEN_CHOICES`, `FLOOR_CHOICES`): each test resolves them in
the token numbering of the implementation it drives, because the broker counts grants (1, 2,
3, ...) while etcd's tokens are revisions of its key space.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import rule

from dbguard.lease.rules import Holder

ANN = Holder("alpha", "ann", "agent-1", "/tmp/dbguard-ann")
# The same user, host and cache with a new agent id: ann's agent restarted and reclaims her leases.
ANN_RESTARTED = Holder("alpha", "ann", "agent-2", "/tmp/dbguard-ann")
# The same user and host with another cache directory: a different holder.
ANN_SCRATCH = Holder("alpha", "ann", "agent-3", "/scratch/ann")
BOB = Holder("beta", "bob", "agent-4", "/tmp/dbguard-bob")
CAT = Holder("gamma", "cat", "agent-5", "/tmp/dbguard-cat")
HOLDERS = [ANN, ANN_RESTARTED, ANN_SCRATCH, BOB, CAT]
PROJECTS = ["p1", "p2", "p3"]

# How a request picks its token: the one this holder was last granted for the project, the
# project's newest, an older one, none (a reader's), or one above every token granted so far.
TOKEN_CHOICES = ["mine", "newest", "older", "zero", "future"]
# The fencing floor an acquire reads from the project directory, relative to the newest token.
FLOOR_CHOICES = ["zero", "newest", "above", "below"]

_holder = st.sampled_from(HOLDERS)
_project = st.sampled_from(PROJECTS)

# A rule decorator per kind of step (hypothesis.stateful): a method decorated with one is
# called with the arguments it draws.
ACQUIRE_WRITE = rule(
    holder=_holder,
    project=_project,
    wait=st.booleans(),
    takeover=st.booleans(),
    floor_choice=st.sampled_from(FLOOR_CHOICES),
    unflushed=st.sampled_from([0, 0, 7]),
    dirty=st.sampled_from([False, False, True]),
)
ACQUIRE_READ = rule(holder=_holder, project=_project)
# A heartbeat for one or two projects: (project, token choice, unflushed bytes) each.
RENEW = rule(
    holder=_holder,
    items=st.lists(
        st.tuples(_project, st.sampled_from(TOKEN_CHOICES), st.sampled_from([0, 0, 5])),
        min_size=1,
        max_size=2,
        unique_by=lambda item: item[0],
    ),
)
# A token choice of None releases without a token: whatever this holder has.
RELEASE = rule(
    holder=_holder,
    project=_project,
    choice=st.sampled_from([*TOKEN_CHOICES, None]),
    mode=st.sampled_from(["write", "write", "read"]),
)
LEAVE_QUEUE = rule(holder=_holder, project=_project)
# The holder's agent marks its lease dirty before a write, or clean after a flush.
MARK = rule(
    holder=_holder,
    project=_project,
    choice=st.sampled_from(["mine", "newest", "older"]),
    dirty=st.booleans(),
    unflushed=st.sampled_from([0, 5]),
)
# The holder says where it serves the project to workers, or that it stopped (address None).
SERVE = rule(
    holder=_holder,
    project=_project,
    choice=st.sampled_from(["mine", "newest", "older"]),
    address=st.sampled_from(["tcp://node:7391", "tcp://node:7392", None]),
)
BREAK = rule(project=_project)
STATUS = rule(project=st.sampled_from([*PROJECTS, "never-seen"]))


def pick_floor(choice: str, newest: int) -> int:
    """The floor an acquire sends, given the project's newest token in the driven numbering."""
    return {"zero": 0, "newest": newest, "above": newest + 3, "below": max(0, newest - 1)}[choice]
