"""The control socket: a running server driven by ``nbdserver ctl`` (status, exports added and
removed at run time), and the state directory that keeps those changes across restarts."""
