"""Side effects live here: processes, sockets, health probes, the launcher and its backends."""
