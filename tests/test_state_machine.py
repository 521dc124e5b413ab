"""The DP group state machine shared by the bare-metal and Ray backends (pure, no processes)."""

from widep.run.state import Failure, GroupState, GroupStatus, RestartPolicy


def f(rank="serve/1", at=1.0, reason="exited with code 1"):
    return Failure(rank=rank, node="n1", reason=reason, at=at)


def test_start_healthy_fail_restart_cycle():
    s = GroupStatus()
    assert s.state == GroupState.STARTING and s.attempt == 0
    s = s.on_all_healthy()
    assert s.state == GroupState.HEALTHY
    s, d = s.on_failure(f(), 0, RestartPolicy(backoff_s=2))
    assert d.action == "restart" and d.backoff_s == 2 and s.state == GroupState.RESTARTING
    s = s.on_restart_begun()
    assert (s.attempt, s.restarts, s.state, s.failure) == (1, 1, GroupState.STARTING, None)


def test_backoff_doubles_and_is_capped_then_fails():
    pol = RestartPolicy(max_restarts=3, backoff_s=5, max_backoff_s=12)
    s = GroupStatus()
    backoffs = []
    for attempt in range(3):
        s, d = s.on_failure(f(at=attempt), attempt, pol)
        backoffs.append(d.backoff_s)
        s = s.on_restart_begun()
    assert backoffs == [5, 10, 12]
    s, d = s.on_failure(f(at=9), 3, pol)
    assert d.action == "fail" and s.state == GroupState.FAILED and s.terminal
    assert len(s.history) == 4


def test_restart_never_fails_at_once():
    s, d = GroupStatus().on_failure(f(), 0, RestartPolicy(mode="never"))
    assert d.action == "fail" and s.state == GroupState.FAILED


def test_stale_reports_are_ignored_and_earliest_failure_kept():
    pol = RestartPolicy()
    s, d = GroupStatus().on_failure(f("serve/1", at=5.0), 0, pol)
    assert d.action == "restart"
    # a second rank of the same attempt reports an EARLIER failure while the group restarts: it is the one kept
    s, d = s.on_failure(f("serve/0", at=3.0), 0, pol)
    assert d.action == "ignore" and s.failure.rank == "serve/0"
    s = s.on_restart_begun()
    # a late report about attempt 0 does not restart attempt 1
    s2, d = s.on_failure(f("serve/1", at=6.0), 0, pol)
    assert d.action == "ignore" and s2 == s


def test_stop_wins_over_failures():
    s = GroupStatus().on_all_healthy().on_stop()
    assert s.state == GroupState.STOPPING
    s2, d = s.on_failure(f(), 0, RestartPolicy())
    assert d.action == "ignore"
    assert s.on_stopped().state == GroupState.STOPPED
    failed, _ = GroupStatus().on_failure(f(), 0, RestartPolicy(mode="never"))
    assert failed.on_stop().state == GroupState.FAILED and failed.on_stopped().state == GroupState.FAILED


def test_as_dict_is_json_ready():
    import json

    s, _ = GroupStatus().on_failure(Failure("a/0", "n", "killed by SIGKILL", 1.0, ("x", "y")), 0, RestartPolicy())
    d = json.loads(json.dumps(s.as_dict()))
    assert d["state"] == "restarting" and d["failure"]["log_tail"] == ["x", "y"]
