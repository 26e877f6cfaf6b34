"""The channel between PID 1 (init) and the unprivileged comms daemon.

One AF_UNIX SOCK_SEQPACKET socketpair per daemon incarnation; one JSON message per packet
(size-capped), file descriptors beside it with SCM_RIGHTS (close-on-exec on arrival). Three
kinds of message:

* request  ``{"t": "req", "id": N, "op": NAME, "args": {...}}`` daemon -> init
* reply    ``{"t": "rep", "id": N, "ok": true, "result": {...}}`` or
           ``{"t": "rep", "id": N, "ok": false, "error": {"field": F, "msg": M}}`` init -> daemon
* event    ``{"t": "ev", "ev": "exit" | "error" | "stale_reply", ...}`` init -> daemon

Modules: ``wire`` (packets), ``ops`` and ``imageops`` (the typed operations and their
validation), ``state`` (init's process table), ``handlers`` (init acting on an operation),
``netjob`` (netlink work in a forked worker), ``listen`` (the host endpoint init opens),
``sysc`` (mount, reboot, prctl ... through ctypes), ``record`` (light typed records), all
light enough for init (no trio, no protobuf, no dataclasses); ``client`` is the daemon's
side, on trio.
"""
