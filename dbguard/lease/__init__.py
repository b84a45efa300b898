"""The lease service: who may write a project, with which fencing token, for how long.

``rules`` is the lease table (the rules, no I/O); ``protocol`` and ``requests`` the wire format;
``client`` and ``keys`` how a process reaches a service and proves who it is; ``broker`` and
``store`` the embedded service and its durable state; ``etcd`` the same rules kept in an etcd
cluster, ``etcd_cluster`` a local cluster for one site; ``service`` picks one; ``servers``
starts and stops their processes.
"""
