"""Topology spec: strict, documented, and its errors name the field, the value and what is valid."""

import pytest
import yaml
from pydantic import ValidationError

from widep.errors import UserError
from widep.spec.topology import ClusterSpec, RoleSpec, TopologySpec, load_topology, parse_topology

BASE = {"name": "t", "model": {"preset": "deepseek-r1"}, "roles": [{"name": "decode"}]}


def doc(**over):
    d = yaml.safe_load(yaml.safe_dump(BASE))
    for k, v in over.items():
        d[k] = v
    return d


def test_every_field_has_a_docstring():
    import widep.spec.topology as t

    for model in [getattr(t, n) for n in dir(t)]:
        if isinstance(model, type) and issubclass(model, t.Strict) and model is not t.Strict:
            for name, f in model.model_fields.items():
                assert f.description, f"{model.__name__}.{name} has no docstring"


def test_unknown_key_rejected_with_suggestion():
    with pytest.raises(UserError) as e:
        parse_topology(doc(roles=[{"name": "d", "max_num_seq": 4}]))
    msg = str(e.value)
    assert "roles[0].max_num_seq" in msg and "Did you mean 'max_num_seqs'" in msg


def test_typo_backend():
    with pytest.raises(UserError) as e:
        parse_topology(doc(roles=[{"name": "d", "all2all_backend": "deepep_lowlatency"}]))
    msg = str(e.value)
    assert (
        "roles[0].all2all_backend" in msg
        and "'deepep_lowlatency'" in msg
        and "Did you mean 'deepep_low_latency'" in msg
    )


def test_model_needs_exactly_one_source():
    with pytest.raises(UserError, match="exactly one of model.preset or model.config"):
        parse_topology(doc(model={"preset": "deepseek-r1", "config": "x.json"}))


def test_bounds_and_duplicates():
    with pytest.raises(UserError, match="gpu_memory_utilization"):
        parse_topology(doc(roles=[{"name": "d", "gpu_memory_utilization": 1.5}]))
    with pytest.raises(UserError, match="Given twice: d"):
        parse_topology(doc(roles=[{"name": "d"}, {"name": "d"}]))
    with pytest.raises(UserError, match="node names must be unique"):
        parse_topology(doc(cluster={"nodes": [{"name": "a"}, {"name": "a"}]}))
    with pytest.raises(UserError, match="mixed role"):
        parse_topology(doc(roles=[{"name": "a", "kind": "mixed"}, {"name": "b", "kind": "decode"}]))


def test_not_a_mapping():
    with pytest.raises(UserError, match="must be a mapping"):
        parse_topology(["x"])


def test_config_path_relative_to_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(doc(model={"config": "m/config.json"})))
    spec = load_topology(tmp_path / "t.yaml")
    assert spec.model.config == str((tmp_path / "m/config.json").resolve())


def test_bad_yaml_and_missing_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_topology(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="not found"):
        load_topology(tmp_path / "none.yaml")


def test_models_are_frozen():
    spec = TopologySpec.model_validate(BASE)
    with pytest.raises(ValidationError, match="frozen"):
        spec.name = "x"
    assert isinstance(spec.cluster, ClusterSpec) and isinstance(spec.roles[0], RoleSpec)
