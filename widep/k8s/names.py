"""Kubernetes and LeaderWorkerSet names and limits, in one place: what the generator writes
(:mod:`widep.k8s.lws`, :mod:`widep.k8s.frontdoor`) and what the validator checks
(:mod:`widep.k8s.validate`) read the same constants.

The LWS names follow ``api/leaderworkerset/v1/leaderworkerset_types.go`` (LWS v0.10.0); the name rules follow
``k8s.io/apimachinery/pkg/util/validation``. The regexes end in ``\\Z`` and are used with ``re.match``, so they
match a whole value (Go's ``^...$``).
"""

from __future__ import annotations

import re

# ----------------------------------------------------------------------------------------------
# LeaderWorkerSet API

#: API group of the LeaderWorkerSet CRD.
LWS_GROUP = "leaderworkerset.x-k8s.io"
#: ``apiVersion`` of the LeaderWorkerSet objects widep writes.
LWS_API_VERSION = LWS_GROUP + "/v1"
#: ``kind`` of a LeaderWorkerSet.
LWS_KIND = "LeaderWorkerSet"
#: Prefix of every label and annotation LWS reads or writes (``leaderworkerset.sigs.k8s.io/``).
LWS_PREFIX = "leaderworkerset.sigs.k8s.io/"

#: Label on every pod: the name of its LeaderWorkerSet (``SetNameLabelKey``).
SET_NAME_LABEL = LWS_PREFIX + "name"
#: Label on every pod: the index of its group (``GroupIndexLabelKey``).
GROUP_INDEX_LABEL = LWS_PREFIX + "group-index"
#: Label on every pod: its index inside the group, 0 for the leader (``WorkerIndexLabelKey``).
WORKER_INDEX_LABEL = LWS_PREFIX + "worker-index"
#: Label on every pod: a hash unique to its group (``GroupUniqueHashLabelKey``).
GROUP_KEY_LABEL = LWS_PREFIX + "group-key"
#: Label on every pod: the hash of the template revision (``TemplateRevisionHashKey``).
TEMPLATE_REVISION_HASH_LABEL = LWS_PREFIX + "template-revision-hash"
#: Label on pods of a subgroup: the subgroup's index (``SubGroupIndexLabelKey``).
SUBGROUP_INDEX_LABEL = LWS_PREFIX + "subgroup-index"
#: Label on pods of a subgroup: a hash unique to the subgroup (``SubGroupUniqueHashLabelKey``).
SUBGROUP_KEY_LABEL = LWS_PREFIX + "subgroup-key"
#: Labels the LWS controller and pod webhook put on pods; a Service may select on them.
LWS_POD_LABELS = (
    SET_NAME_LABEL,
    GROUP_INDEX_LABEL,
    WORKER_INDEX_LABEL,
    GROUP_KEY_LABEL,
    TEMPLATE_REVISION_HASH_LABEL,
    SUBGROUP_INDEX_LABEL,
    SUBGROUP_KEY_LABEL,
)

#: Annotation: node label key whose domains each hold exactly one group (``ExclusiveKeyAnnotationKey``).
EXCLUSIVE_TOPOLOGY = LWS_PREFIX + "exclusive-topology"
#: Annotation: the same for each subgroup (``SubGroupExclusiveKeyAnnotationKey``).
SUBGROUP_EXCLUSIVE_TOPOLOGY = LWS_PREFIX + "subgroup-exclusive-topology"

#: Prefix of the environment variables LWS injects; a ``$(LWS_...)`` reference to any other is a mistake.
LWS_ENV_PREFIX = "LWS_"
#: Env var the LWS pod webhook injects: the leader pod's DNS name (``LwsLeaderAddress``).
LWS_LEADER_ADDRESS = "LWS_LEADER_ADDRESS"
#: Env var the LWS pod webhook injects: pods per group (``LwsGroupSize``).
LWS_GROUP_SIZE = "LWS_GROUP_SIZE"
#: Env var the LWS pod webhook injects: this pod's index in its group (``LwsWorkerIndex``).
LWS_WORKER_INDEX = "LWS_WORKER_INDEX"
#: Environment variables the LWS pod webhook injects into every container (pod_utils.go).
LWS_ENV_VARS = (LWS_LEADER_ADDRESS, LWS_GROUP_SIZE, LWS_WORKER_INDEX)

# ----------------------------------------------------------------------------------------------
# Names and values (k8s.io/apimachinery/pkg/util/validation)

#: DNS-1123 label (namespaces, most names): lower-case alphanumerics and '-', alphanumeric at both ends.
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
#: DNS-1123 subdomain (Secret, ConfigMap, PVC names; label-key prefixes): dot-separated DNS-1123 labels.
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
#: DNS-1035 label (Service and LeaderWorkerSet names): a DNS-1123 label that starts with a letter.
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
#: The name part of a qualified name (label and annotation keys, extended resource names).
QUALIFIED_NAME_PART = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
#: A label value (may be empty).
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
#: The API server's quantity syntax (k8s.io/apimachinery resource.Quantity), as the CRD spells it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
QUANTITY = re.compile(QUANTITY_PATTERN[:-1] + r"\Z")

#: Longest DNS-1123 label, label value and qualified-name part.
DNS1123_LABEL_MAX_LENGTH = 63
#: Longest DNS-1123 subdomain.
DNS1123_SUBDOMAIN_MAX_LENGTH = 253
#: Longest label value (pod names are label values: ``statefulset.kubernetes.io/pod-name``).
LABEL_VALUE_MAX_LENGTH = 63
#: Longest qualified-name part (label key after the prefix).
QUALIFIED_NAME_MAX_LENGTH = 63

# ----------------------------------------------------------------------------------------------
# The name-length rule of a LeaderWorkerSet

#: Longest StatefulSet name whose pods can be created: their ``controller-revision-hash`` label is
#: ``<statefulset>-<hash of up to 10 characters>``, a label value of at most 63 characters.
STATEFULSET_NAME_MAX_LENGTH = 52
#: Longest pod name (the pod's hostname and a label value).
POD_NAME_MAX_LENGTH = 63


def lws_name_max_length(replicas: int, size: int) -> int:
    """Longest LeaderWorkerSet name whose StatefulSets and pods the controller can create: with ``size > 1``,
    StatefulSet ``<name>-<group>`` (at most 52) and pod ``<name>-<group>-<worker>`` (at most 63) for the last
    group and worker; with ``size == 1`` the one StatefulSet is ``<name>``."""
    if size <= 1:
        return STATEFULSET_NAME_MAX_LENGTH
    last = replicas - 1
    return min(STATEFULSET_NAME_MAX_LENGTH - len(f"-{last}"), POD_NAME_MAX_LENGTH - len(f"-{last}-{size - 1}"))
