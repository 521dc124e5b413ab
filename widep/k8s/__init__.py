"""Kubernetes output of widep: LeaderWorkerSet manifests and their validation.

:mod:`widep.k8s.lws` turns a plan into LeaderWorkerSet / Service / InferencePool dicts (pure; the
pods' scripts are built from the same RankCommands as ``widep render``);
:mod:`widep.k8s.validate` checks LeaderWorkerSet (and plain Service / Deployment / ConfigMap / ...)
manifests the way a real API server plus the LWS admission webhook would, without a cluster;
:mod:`widep.k8s.cli` is the ``widep lws`` command (generated manifests are validated before they
are printed); :mod:`widep.k8s.regen` rewrites the checked-in ``lws/`` examples. Around them:
:mod:`~widep.k8s.frontdoor` (vllm-router or llm-d's InferencePool + routing sidecar + EPP values for P/D),
:mod:`~widep.k8s.providers` (cluster profiles), :mod:`~widep.k8s.resources` (requests, start budget, QoS class,
Pod Security level), :mod:`~widep.k8s.kustomize` (base + one overlay per profile), :mod:`~widep.k8s.cel` (the
shipped CRDs' CEL rules). The CRDs themselves ship in ``widep/k8s/data``. Submodules are imported on use so that
``import widep.k8s`` stays cheap.
"""
