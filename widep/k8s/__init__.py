"""Kubernetes output of widep: LeaderWorkerSet manifests and their validation.

:mod:`widep.k8s.validate` checks LeaderWorkerSet (and plain Service / Deployment / ConfigMap / ...)
manifests the way a real API server plus the LWS admission webhook would, without a cluster;
:mod:`widep.k8s.cli` is the ``widep lws`` command. Submodules are imported on use so that
``import widep.k8s`` stays cheap.
"""
