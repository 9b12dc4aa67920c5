"""A trial's pt2 MLflow model (``search.mlflow_model.log_pt2_model``), traced without per-node stack
traces to save the driver CPU: it is still the program torch.export makes with them (same nodes,
same outputs), loads with ``mlflow.pytorch.load_model`` with pickle refused, keeps a dynamic batch,
and computes what the trial's model computes. Real MLflow on SQLite, a real pruned ResNet-20."""
from __future__ import annotations

from urllib.parse import urlparse

import pytest
import torch
import torch.fx.config as fx_config
from helpers import randomise_bn
from mlflow.tracking import MlflowClient

from methods.base import PruneContext
from methods.registry import create_method
from search.mlflow_model import log_pt2_model, tracking_uri
from trainables.models import create_model

DIGITS = (1, 8, 8)


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    dense = randomise_bn(create_model("resnet20", 10, in_channels=1))
    return create_method("l1_norm", prune_ratio=0.5, scope="all").prune(dense, PruneContext(DIGITS)).eval()


@pytest.fixture(scope="module")
def logged(pruned, tmp_path_factory):
    """(client, ModelInfo) of the pruned model logged as a trial's run's pt2 model."""
    tmp = tmp_path_factory.mktemp("mlflow")
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp_id = client.create_experiment("m", artifact_location=f"file://{tmp}/art")
    run_id = client.create_run(exp_id).info.run_id
    info, _ = log_pt2_model(client, run_id, pruned, torch.randn(4, *DIGITS).numpy(), {"accuracy": 0.5},
                            validate=False, name="l1_norm-t0")
    return client, info


def _program_file(client, model_id):
    location = urlparse(client.get_logged_model(model_id).artifact_location).path
    return f"{location}/data/model.pt2"


def _nodes(program):
    return [(n.op, str(n.target), str(n.args)) for n in program.graph.nodes]


def test_loads_without_pickle_and_computes_the_trials_outputs_at_any_batch(pruned, logged, monkeypatch):
    import mlflow.pytorch

    client, info = logged
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with tracking_uri(client.tracking_uri):
        loaded = mlflow.pytorch.load_model(f"models:/{info.model_id}")
    for batch in (1, 4, 9):  # the example's batch was 4: the batch dimension stayed dynamic
        x = torch.randn(batch, *DIGITS)
        with torch.no_grad():
            assert torch.equal(loaded(x), pruned(x))


def test_the_program_without_stack_traces_is_the_one_torch_exports_with_them(pruned, logged):
    client, info = logged
    program = torch.export.load(_program_file(client, info.model_id))
    assert not any(n.meta.get("stack_trace") for n in program.graph.nodes)
    assert fx_config.do_not_emit_stack_traces is False  # the process-wide flag was put back

    x = torch.randn(4, *DIGITS)
    # As MLflow exports it (a dynamic batch), stack traces on: what was logged before.
    with_traces = torch.export.export(pruned, (x,), dynamic_shapes=[{0: torch.export.Dim.AUTO}])
    assert any(n.meta.get("stack_trace") for n in with_traces.graph.nodes)
    assert _nodes(program) == _nodes(with_traces)
    assert str(program.graph_signature) == str(with_traces.graph_signature)
    assert [str(r) for r in program.range_constraints.values()] == [str(r) for r in with_traces.range_constraints.values()]
    y = torch.randn(7, *DIGITS)
    assert torch.equal(program.module()(y), with_traces.module()(y))


def _live_graphs() -> int:
    import gc

    return sum(1 for o in gc.get_objects() if isinstance(o, torch.fx.Graph))


def test_the_collector_comes_back_on_and_frees_the_exports_graphs(pruned, logged):
    """The collector is off while a model is logged and one young collection follows: it is back on
    after each log (and after a failed one), and the exports' graphs are garbage it frees (at most
    the latest one stays: torch keeps it until the next export)."""
    import gc

    client, info = logged
    run_id = client.create_run(client.get_logged_model(info.model_id).experiment_id).info.run_id
    before = _live_graphs()
    for _ in range(3):
        log_pt2_model(client, run_id, pruned, torch.randn(4, *DIGITS).numpy(), validate=False)
        assert gc.isenabled()
    gc.collect()
    assert _live_graphs() <= before + 1

    class Broken(torch.nn.Module):  # runs eagerly (the signature), fails in torch.export
        def forward(self, x):
            if torch.compiler.is_exporting():
                raise RuntimeError("cannot trace")
            return x

    with pytest.raises(Exception, match="cannot trace"):
        log_pt2_model(client, run_id, Broken(), torch.randn(4, *DIGITS).numpy(), validate=False)
    assert gc.isenabled() and fx_config.do_not_emit_stack_traces is False
