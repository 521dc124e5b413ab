"""The DP group's state machine: one implementation, driven by the supervisor for every backend.

A DP group is only useful whole (LeaderWorkerSet's RecreateGroupOnPodRestart): when any rank dies or
stays unhealthy past the grace period, the whole group is torn down and restarted in step, with an
attempt number that increases by one per restart, bounded retries and exponential backoff.

Pure logic, no I/O: callers feed it events and act on the decisions it returns.

States and transitions::

    STARTING --all ranks healthy--> HEALTHY
    STARTING/HEALTHY --failure--> RESTARTING (attempt+1, after backoff) | FAILED (no restarts left / policy never)
    RESTARTING --restart begun--> STARTING
    any --stop requested--> STOPPING --ranks gone--> STOPPED
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Literal


class GroupState(str, Enum):
    STARTING = "starting"
    HEALTHY = "healthy"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Failure:
    """Why a group failed: the first rank that failed, how, and the end of its log."""

    rank: str
    """'role/dp_rank'."""
    node: str
    reason: str
    """e.g. 'exited with code 1', 'killed by SIGKILL', 'unhealthy for 30 s', 'did not become healthy in 300 s'."""
    at: float
    """Monotonic time of the failure (first failure wins)."""
    log_tail: tuple[str, ...] = ()

    def describe(self) -> str:
        s = f"{self.rank} on {self.node}: {self.reason}"
        if self.log_tail:
            s += "\n    " + "\n    ".join(self.log_tail)
        return s


@dataclass(frozen=True)
class RestartPolicy:
    mode: Literal["on-failure", "never"] = "on-failure"
    max_restarts: int = 3
    backoff_s: float = 5.0
    """First backoff; doubles per restart, capped at ``max_backoff_s``."""
    max_backoff_s: float = 60.0


@dataclass(frozen=True)
class Decision:
    action: Literal["restart", "fail", "ignore"]
    backoff_s: float = 0.0


@dataclass(frozen=True)
class GroupStatus:
    """Snapshot of a group's state machine (immutable; transitions return a new one)."""

    attempt: int = 0
    state: GroupState = GroupState.STARTING
    restarts: int = 0
    failure: Failure | None = None
    """The failure that ended the current attempt (earliest one reported)."""
    history: tuple[Failure, ...] = ()

    @property
    def last_failure(self) -> Failure | None:
        """The latest failure of the run, kept after the next attempt starts (``failure`` is the current one's)."""
        return self.failure or (self.history[-1] if self.history else None)

    def on_all_healthy(self) -> GroupStatus:
        if self.state == GroupState.STARTING:
            return replace(self, state=GroupState.HEALTHY)
        return self

    def on_failure(self, failure: Failure, attempt: int, policy: RestartPolicy) -> tuple[GroupStatus, Decision]:
        """A rank of ``attempt`` failed. Stale reports (older attempts) and failures while stopping are ignored;
        the earliest failure of an attempt is the one kept and reported."""
        if attempt != self.attempt or self.state in (
            GroupState.STOPPING,
            GroupState.STOPPED,
            GroupState.FAILED,
            GroupState.RESTARTING,
        ):
            if (
                self.state == GroupState.RESTARTING
                and attempt == self.attempt
                and self.failure
                and failure.at < self.failure.at
            ):
                return replace(self, failure=failure), Decision("ignore")
            return self, Decision("ignore")
        history = self.history + (failure,)
        if policy.mode == "never" or self.restarts >= policy.max_restarts:
            return replace(self, state=GroupState.FAILED, failure=failure, history=history), Decision("fail")
        backoff = min(policy.max_backoff_s, policy.backoff_s * (2**self.restarts))
        return (
            replace(self, state=GroupState.RESTARTING, failure=failure, history=history),
            Decision("restart", backoff),
        )

    def on_restart_begun(self) -> GroupStatus:
        """Teardown of the failed attempt is complete: start the next one."""
        if self.state != GroupState.RESTARTING:
            return self
        return replace(
            self, attempt=self.attempt + 1, restarts=self.restarts + 1, state=GroupState.STARTING, failure=None
        )

    def on_stop(self) -> GroupStatus:
        if self.state in (GroupState.STOPPED, GroupState.FAILED):
            return self
        return replace(self, state=GroupState.STOPPING)

    def on_stopped(self) -> GroupStatus:
        if self.state == GroupState.FAILED:
            return self
        return replace(self, state=GroupState.STOPPED)

    @property
    def terminal(self) -> bool:
        return self.state in (GroupState.FAILED, GroupState.STOPPED)

    def as_dict(self) -> dict:
        return {
            "attempt": self.attempt,
            "state": self.state.value,
            "restarts": self.restarts,
            "failure": None
            if self.failure is None
            else {
                "rank": self.failure.rank,
                "node": self.failure.node,
                "reason": self.failure.reason,
                "log_tail": list(self.failure.log_tail),
            },
            "last_failure": None
            if self.last_failure is None
            else {
                "attempt": self.attempt if self.failure else self.attempt - 1,
                "rank": self.last_failure.rank,
                "node": self.last_failure.node,
                "reason": self.last_failure.reason,
            },
            "failures": len(self.history),
        }


@dataclass(frozen=True)
class HealthVerdict:
    """What a round of health probes means for a group (see :func:`judge_health`)."""

    all_healthy: bool = False
    rank: str | None = None
    """The rank that failed the health rules (None: no failure)."""
    reason: str = ""
    at: float = 0.0


def note_health(health: dict[str, str], unhealthy_since: dict[str, float], name: str, state: str, now: float) -> None:
    """Record one probe result of rank ``name`` ('healthy', 'refused', ...) at ``now``."""
    health[name] = state
    if state == "healthy":
        unhealthy_since.pop(name, None)
    else:
        unhealthy_since.setdefault(name, now)


def judge_health(
    state: GroupState,
    names: list[str],
    health: dict[str, str],
    unhealthy_since: dict[str, float],
    started: float,
    now: float,
    ready_timeout_s: float,
    grace_s: float,
) -> HealthVerdict:
    """The readiness rules both backends apply after probing a group's endpoints ``names``:
    a starting group is healthy once every endpoint is, and fails if one is not healthy ``ready_timeout_s``
    after the attempt started; a healthy group fails when an endpoint stays unhealthy longer than ``grace_s``."""
    if state == GroupState.STARTING:
        if names and all(health.get(n) == "healthy" for n in names):
            return HealthVerdict(all_healthy=True)
        waiting = [n for n in names if health.get(n) != "healthy"]
        if waiting and now - started > ready_timeout_s:
            return HealthVerdict(
                rank=waiting[0],
                at=now,
                reason=f"did not become healthy in {ready_timeout_s:.0f} s (still waiting: {', '.join(waiting)})",
            )
    elif state == GroupState.HEALTHY:
        for name, since in sorted(unhealthy_since.items(), key=lambda kv: kv[1]):
            if now - since > grace_s:
                return HealthVerdict(
                    rank=name, reason=f"unhealthy ({health.get(name)}) for {now - since:.0f} s", at=since
                )
    return HealthVerdict()
