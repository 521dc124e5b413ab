"""Validate LeaderWorkerSet manifests (and the plain Kubernetes objects beside them) without a cluster.

No API server can run where widep is developed and tested, so this module re-creates what a real
``kubectl apply --validate=strict`` against a cluster with the LWS controller would check, in layers:

``crd-schema``
    The real LWS CRD's ``openAPIV3Schema`` (read from the CRD file, never copied into widep), as the
    API server applies it: non-nullable ``null`` values pruned and schema ``default`` values applied
    first (structural defaulting), unknown fields rejected (``fieldValidation=Strict``: every object
    schema with ``properties`` gets ``additionalProperties: false``), ``int32``/``int64`` ranges,
    quantity and label-key patterns with Go regexp anchors, and ``x-kubernetes-list-type`` map/set
    uniqueness (duplicate container, volume, env or port entries).
``object-meta``
    ``metadata`` as ``apimachinery`` validates it: ObjectMeta fields and types, name syntax per kind,
    label and annotation keys and values.
``lws-webhook``
    The LWS admission webhook (``pkg/webhooks/leaderworkerset_webhook.go`` at v0.10.0) re-implemented:
    its defaulting, then DNS-1035 name, replicas range, ``size >= 1``, ``replicas*size`` overflow,
    ``maxUnavailable``/``maxSurge`` int-or-percent rules, partition, subgroup divisibility and the
    ``subgroup-exclusive-topology`` annotation.
``lws-controller``
    What fails later, when the LWS controller creates StatefulSets and pods: pod names longer than
    63 characters, StatefulSet names too long for the ``controller-revision-hash`` label, exclusive
    topology keys that are not label keys.
``core-schema``
    Leader/worker templates (wrapped as a ``PodTemplate``) and plain Service / Deployment / ConfigMap
    / ... documents against the Kubernetes JSON schemas shipped by ``kubernetes-validate`` (strict).
``core-rules``
    A focused subset of the API server's semantic pod/service validation that JSON schema cannot
    express: enums, port ranges, ``restartPolicy: Always`` for StatefulSet/Deployment pods, volume
    mounts naming a volume, resource names and ``requests <= limits`` (extended resources such as
    ``nvidia.com/gpu``: integers, requests equal to limits), selectors matching template labels.
``cross-doc``
    Warnings across documents of one file: a Service selecting a LeaderWorkerSet's pods by labels
    no template carries; ``$(LWS_...)`` references that the LWS pod webhook never injects.

A problem found by an earlier layer at a path hides later layers' problems at the same path or
below it, so one mistake is reported once. Kinds that are neither built-in nor defined by the CRD
are reported as ``note`` ("not checked"), never silently passed.

The package, one module per layer (each imports only the ones before it):
:mod:`~widep.k8s.validate.problems` (findings, paths, the sink), :mod:`~widep.k8s.validate.schema` (JSON-schema
machinery), :mod:`~widep.k8s.validate.crd` (``crd-schema``, where the CRDs are), :mod:`~widep.k8s.validate.core_schema`
(``core-schema``), :mod:`~widep.k8s.validate.meta` (``object-meta``, quantities), :mod:`~widep.k8s.validate.lws_rules`
(``lws-webhook``, ``lws-controller``), :mod:`~widep.k8s.validate.core_rules` (``core-rules``),
:mod:`~widep.k8s.validate.layers` (every layer over a list of documents, ``cross-doc``) and
:mod:`~widep.k8s.validate.documents` (YAML files and text). The names below are the public ones; the LWS and
Kubernetes names and limits live in :mod:`widep.k8s.names`.
"""

from widep.k8s.validate.core_schema import K8S_VERSION, CoreSchemas, core_schemas
from widep.k8s.validate.crd import (
    CRD_ENV,
    CRD_FILE_NAME,
    GAIE_CRD_FILE_NAME,
    CrdKind,
    CrdSet,
    apply_schema_defaults,
    default_crd_path,
    load_crds,
    packaged_crd,
)
from widep.k8s.validate.documents import (
    MAX_OBJECT_BYTES,
    parse_manifests,
    validate_file,
    validate_file_counted,
    validate_text,
)
from widep.k8s.validate.layers import validate_documents, wrap_pod_template
from widep.k8s.validate.meta import parse_quantity, qualified_name_problem
from widep.k8s.validate.problems import MAX_INT32, SEVERITIES, Problem, format_path
from widep.k8s.validate.schema import go_regex, schema_problems

__all__ = [
    "CRD_ENV",
    "CRD_FILE_NAME",
    "GAIE_CRD_FILE_NAME",
    "K8S_VERSION",
    "MAX_INT32",
    "MAX_OBJECT_BYTES",
    "SEVERITIES",
    "CoreSchemas",
    "CrdKind",
    "CrdSet",
    "Problem",
    "apply_schema_defaults",
    "core_schemas",
    "default_crd_path",
    "format_path",
    "go_regex",
    "load_crds",
    "packaged_crd",
    "parse_manifests",
    "parse_quantity",
    "qualified_name_problem",
    "schema_problems",
    "validate_documents",
    "validate_file",
    "validate_file_counted",
    "validate_text",
    "wrap_pod_template",
]
