"""What ``widep launch`` uses, and where side effects live: the launch request and its processes rendered once
(launch), the backend protocol and registry (backend), the one supervisor (supervisor), the backends (bare_metal,
ray_backend), this machine's facts (host), and the mechanics under them (procs, guard, control, state, preflight)."""
