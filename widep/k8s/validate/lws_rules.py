"""The ``lws-webhook`` and ``lws-controller`` layers: the LWS admission webhook's defaulting and validation
(``pkg/webhooks/leaderworkerset_webhook.go`` at v0.10.0), and what fails later when the controller creates
StatefulSets and pods (name lengths, topology keys)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

from widep.k8s.names import (
    EXCLUSIVE_TOPOLOGY,
    LABEL_VALUE_MAX_LENGTH,
    POD_NAME_MAX_LENGTH,
    STATEFULSET_NAME_MAX_LENGTH,
    SUBGROUP_EXCLUSIVE_TOPOLOGY,
)
from widep.k8s.validate.meta import dns1035_label_msg, qualified_name_problem
from widep.k8s.validate.problems import MAX_INT32, get, show

_PERCENT = re.compile(r"[0-9]+%\Z")


def _int(value: Any) -> int | None:
    """An int32 value as the webhook's Go types would hold it; None for anything else (the
    schema layer reports those)."""
    if isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value <= MAX_INT32:
        return value
    return None


def _scaled(value: Any, total: int, round_up: bool) -> int | None:
    """intstr.GetScaledValueFromIntOrPercent; None when the value is not an int or ``N%``."""
    if _int(value) is not None:
        return value
    if isinstance(value, str) and value.endswith("%"):
        try:
            pct = int(value[:-1])
        except ValueError:
            return None
        exact = pct * total / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return None


def webhook_defaults(lws: dict[str, Any]) -> None:
    """The LWS mutating webhook (Default()), in place, after schema defaulting."""
    spec = lws.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    lwt = spec.get("leaderWorkerTemplate")
    if isinstance(lwt, dict):
        if not lwt.get("restartPolicy"):
            lwt["restartPolicy"] = "RecreateGroupOnPodRestart"
        if lwt.get("restartPolicy") == "Default":
            lwt["restartPolicy"] = "None"
    rollout = spec.setdefault("rolloutStrategy", {})
    if isinstance(rollout, dict):
        if not rollout.get("type"):
            rollout["type"] = "RollingUpdate"
        if rollout["type"] == "RollingUpdate" and rollout.get("rollingUpdateConfiguration") is None:
            rollout["rollingUpdateConfiguration"] = {"maxUnavailable": 1, "maxSurge": 0, "partition": 0}
    net = spec.get("networkConfig")
    if net is None:
        spec["networkConfig"] = {"subdomainPolicy": "Shared"}
    elif isinstance(net, dict) and net.get("subdomainPolicy") is None:
        net["subdomainPolicy"] = "Shared"


def _int_or_percent_problems(value: Any, path: tuple) -> Iterator[tuple]:
    """ValidatePositiveIntOrPercent + IsNotMoreThan100Percent of the LWS webhook."""
    if isinstance(value, str):
        if not _PERCENT.match(value):
            yield (
                path,
                (
                    f"Invalid value {show(value)}: a valid percent string must be a numeric string "
                    "followed by an ending '%' (e.g. '1%', or '93%'); or give a non-negative integer"
                ),
            )
        elif int(value[:-1]) > 100:
            yield path, f"Invalid value {show(value)}: must not be greater than 100%"
    elif _int(value) is not None and value < 0:
        yield path, f"Invalid value {value}: must be greater than or equal to 0"


def lws_webhook_problems(raw: dict[str, Any], lws: dict[str, Any]) -> Iterator[tuple]:
    """generalValidate() of the LWS validating webhook on the defaulted object ``lws``."""
    if "spec" not in raw:
        yield (
            ("spec",),
            (
                "Required value: a LeaderWorkerSet needs spec.leaderWorkerTemplate (the webhook "
                "dereferences spec.leaderWorkerTemplate.size, which only exists with it)"
            ),
        )
        return
    spec = lws.get("spec")
    if not isinstance(spec, dict):
        return
    lwt = spec.get("leaderWorkerTemplate") if isinstance(spec.get("leaderWorkerTemplate"), dict) else {}
    replicas, size = _int(spec.get("replicas")), _int(lwt.get("size"))
    rp, sp = ("spec", "replicas"), ("spec", "leaderWorkerTemplate", "size")
    if replicas is not None:
        if replicas < 0:
            yield rp, f"Invalid value {replicas}: replicas must be equal or greater than 0"
        if replicas > 1_000_000:
            yield rp, f"Invalid value {replicas}: replicas must be equal or less than 1000000"
    if size is not None and size < 1:
        yield (
            sp,
            f"Invalid value {size}: size must be equal or greater than 1 (size counts the leader: 1 leader + "
            "size-1 workers)",
        )
    if replicas is not None and size is not None and replicas * size > MAX_INT32:
        yield (
            rp,
            (
                f"Invalid value {replicas}: the product of replicas and size ({replicas} × {size} = "
                f"{replicas * size}) must not exceed {MAX_INT32}"
            ),
        )
    if lwt.get("restartPolicy") == "None" and (get(raw, "spec", "leaderWorkerTemplate", "restartPolicy") == "Default"):
        yield (
            ("spec", "leaderWorkerTemplate", "restartPolicy"),
            (
                "'Default' is deprecated; the LWS webhook rewrites it to 'None'. Write 'None' (or "
                "RecreateGroupOnPodRestart / RecreateGroupAfterStart) explicitly"
            ),
            "note",
        )

    rollout = spec.get("rolloutStrategy") if isinstance(spec.get("rolloutStrategy"), dict) else {}
    ruc = rollout.get("rollingUpdateConfiguration")
    if isinstance(ruc, dict):
        base = ("spec", "rolloutStrategy", "rollingUpdateConfiguration")
        mu, ms = ruc.get("maxUnavailable"), ruc.get("maxSurge")
        bad = set()
        for key, value in (("maxUnavailable", mu), ("maxSurge", ms)):
            found = list(_int_or_percent_problems(value, base + (key,)))
            if found:
                bad.add(key)
            yield from found
        partition = _int(ruc.get("partition"))
        if partition is not None and partition < 0:
            yield base + ("partition",), f"Invalid value {partition}: must be greater than or equal to 0"
        if replicas is not None and not bad:
            muv, msv = _scaled(mu, replicas, False), _scaled(ms, replicas, True)
            if muv == 0 and msv == 0 and replicas != 0:
                yield (
                    base + ("maxUnavailable",),
                    (
                        f"Invalid value {show(mu)}: must not be 0 when `maxSurge` is 0 (with {replicas} "
                        f"replicas maxUnavailable={show(mu)} allows {muv} and maxSurge={show(ms)} adds {msv} "
                        "groups, so a rolling update could never proceed)"
                    ),
                )

    policy = lwt.get("subGroupPolicy")
    sgp = ("spec", "leaderWorkerTemplate", "subGroupPolicy", "subGroupSize")
    annotations = get(lws, "metadata", "annotations")
    annotations = annotations if isinstance(annotations, dict) else {}
    if isinstance(policy, dict):
        sgs = policy.get("subGroupSize")
        if sgs is None:
            yield (
                sgp,
                "Required value: subGroupSize must be set when subGroupPolicy is given (the LWS webhook "
                "dereferences it)",
            )
        elif _int(sgs) is not None and size is not None:
            if sgs < 1:
                yield sgp, f"Invalid value {sgs}: subGroupSize must be equal or greater than 1"
            else:
                if size % sgs != 0 and (size - 1) % sgs != 0:
                    yield (
                        sgp,
                        f"Invalid value {sgs}: size or size - 1 must be divisible by subGroupSize (size is {size})",
                    )
                if size < sgs:
                    yield sgp, f"Invalid value {sgs}: subGroupSize cannot be larger than size ({size})"
                if policy.get("subGroupPolicyType") == "LeaderExcluded" and (size - 1) % sgs != 0:
                    yield (
                        sgp,
                        f"Invalid value {sgs}: size-1 must be divisible by subGroupSize when using "
                        f"LeaderExcluded (size - 1 is {size - 1})",
                    )
    elif SUBGROUP_EXCLUSIVE_TOPOLOGY in annotations:
        yield (
            ("metadata", "annotations", SUBGROUP_EXCLUSIVE_TOPOLOGY),
            (
                f"Invalid value {show(annotations[SUBGROUP_EXCLUSIVE_TOPOLOGY])}: cannot have "
                "subgroup-exclusive-topology without subGroupSize set (add spec.leaderWorkerTemplate.subGroupPolicy)"
            ),
        )


def lws_controller_problems(lws: dict[str, Any]) -> Iterator[tuple]:
    """Failures that surface only when the LWS controller creates StatefulSets and pods."""
    meta = lws.get("metadata") if isinstance(lws.get("metadata"), dict) else {}
    spec = lws.get("spec") if isinstance(lws.get("spec"), dict) else {}
    lwt = spec.get("leaderWorkerTemplate") if isinstance(spec.get("leaderWorkerTemplate"), dict) else {}
    annotations = meta.get("annotations") if isinstance(meta.get("annotations"), dict) else {}
    for key in (EXCLUSIVE_TOPOLOGY, SUBGROUP_EXCLUSIVE_TOPOLOGY):
        value = annotations.get(key)
        if isinstance(value, str) and (msg := qualified_name_problem(value)):
            yield (
                ("metadata", "annotations", key),
                (
                    f"Invalid topology key {show(value)}: {msg}. The pod webhook copies it into "
                    "podAffinity/podAntiAffinity topologyKey, so every pod would be rejected "
                    "(e.g. 'kubernetes.io/hostname', 'cloud.google.com/gke-nodepool')"
                ),
            )
    name, replicas, size = meta.get("name"), _int(spec.get("replicas")), _int(lwt.get("size"))
    if not isinstance(name, str) or not name or replicas is None or size is None or replicas < 1 or size < 1:
        return
    if dns1035_label_msg(name):
        return  # already an error of the name itself
    last = replicas - 1
    if size > 1:
        pod = f"{name}-{last}-{size - 1}"
        if len(pod) > POD_NAME_MAX_LENGTH:
            keep = POD_NAME_MAX_LENGTH - len(f"-{last}-{size - 1}")
            yield (
                ("metadata", "name"),
                (
                    f"Too long for this size: worker pod {pod!r} has {len(pod)} characters; StatefulSet pods "
                    f"use their name as hostname and label value (at most {POD_NAME_MAX_LENGTH}), "
                    "so they could not be created. "
                    f"Valid: a name of at most {keep} characters for replicas={replicas}, size={size}"
                ),
            )
            return
    sts = f"{name}-{last}" if size > 1 else name
    if len(sts) > STATEFULSET_NAME_MAX_LENGTH:
        yield (
            ("metadata", "name"),
            (
                f"StatefulSet {sts!r} has {len(sts)} characters (more than {STATEFULSET_NAME_MAX_LENGTH}): its pods' "
                "controller-revision-hash label '<statefulset>-<hash of up to 10 characters>' can exceed "
                f"{LABEL_VALUE_MAX_LENGTH} characters and the StatefulSet controller then fails to create them. "
                "Keep the name at most "
                f"{STATEFULSET_NAME_MAX_LENGTH - (len(sts) - len(name))} characters"
            ),
            "warning",
        )
