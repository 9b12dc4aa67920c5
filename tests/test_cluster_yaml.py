"""cluster.yaml is a valid Ray cluster-launcher file with the shape the README promises."""
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


def test_cluster_yaml_validates_against_rays_schema():
    config = yaml.safe_load(open("cluster.yaml"))
    validate_config(prepare_config(config))  # Ray's own defaults + JSON-schema check
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # the head runs the driver and MLflow, no trials
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(0 <= w["min_workers"] <= w["max_workers"] for w in workers)
    assert any("pip install -e ." in c for c in config["setup_commands"])
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head_cmds and "--host 127.0.0.1" in head_cmds
    assert "--dashboard-host=127.0.0.1" in head_cmds
