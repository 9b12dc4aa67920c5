"""Bad input the config file alone cannot reveal: one ConfigError line naming the field, fast."""
import pickle
import socket
import time

import pytest
import torch

from methods.errors import ConfigError
from search.cli import main
from search.config import load_config
from search.preflight import check_ray_address, check_storage_path, check_tracking_uri, preflight


def _cfg(*overrides):
    return load_config("configs/quickstart.yaml", list(overrides))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_model_that_does_not_fit_the_input_is_refused():
    with pytest.raises(ConfigError, match=r"^model: vgg16_cifar does not run on digits input \(1, 8, 8\)"):
        preflight(_cfg("model=vgg16_cifar"))
    preflight(_cfg("model=vgg16_cifar", "image_size=32", "methods=[l1_norm, thinet]"))  # the suggested fix


def test_weights_file_that_needs_pickle_is_refused(tmp_path):
    bad = tmp_path / "model.pt"
    with open(bad, "wb") as f:
        pickle.dump({"weights": object()}, f)
    with pytest.raises(ConfigError, match=r"model_kwargs.weights: .*does not load with torch.load\(weights_only=True\)"):
        preflight(_cfg(f"model_kwargs.weights={bad}"))


def test_weights_of_another_architecture_are_refused(tmp_path):
    from trainables.models import create_model

    path = tmp_path / "resnet56.pt"
    torch.save(create_model("resnet56", 10, in_channels=1).state_dict(), path)
    with pytest.raises(ConfigError, match=r"^model_kwargs.weights: resnet20 does not run"):
        preflight(_cfg(f"model_kwargs.weights={path}"))


def test_unreachable_mlflow_server_fails_fast():
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"tracking_uri: cannot reach MLflow server http://127.0.0.1:{port}"):
        check_tracking_uri(f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 30  # a refusal, not a hang (generous bound: shared machine)


def test_unreachable_ray_address_fails_fast():
    port = _free_port()
    with pytest.raises(ConfigError, match=rf"address: cannot reach Ray at 127.0.0.1:{port}"):
        check_ray_address(f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="address: expected host:port"):
        check_ray_address("nonsense")


def test_cli_reports_one_line_and_exit_2(tmp_path, capsys):
    port = _free_port()
    code = main(["run", "configs/quickstart.yaml", "--set", f"tracking_uri=http://127.0.0.1:{port}",
                 "--set", f"storage_path={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("prunetune: error: tracking_uri: cannot reach")
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_method_that_cannot_attach_to_the_model_is_refused():
    with pytest.raises(ConfigError, match=r"^methods\[1\]: manidp cannot prune vgg16_cifar"):
        preflight(_cfg("model=vgg16_cifar", "image_size=32", "methods=[l1_norm, manidp]"))


def test_methods_dry_run_prints_no_trial_lines(tmp_path, caplog):
    """The preflight prepares every method on the model to see that it attaches; their INFO lines
    ("csgd: 9 groups clustered (layer1.0.conv1: 16->8, ...)") would describe trials that never ran."""
    import logging

    caplog.set_level(logging.INFO)
    preflight(_cfg(f"storage_path={tmp_path}", f"tracking_uri=sqlite:///{tmp_path}/m.db"))
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("methods")]
    assert logging.getLogger("methods").level == logging.NOTSET  # put back as it was


def test_storage_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(ConfigError, match=rf"^storage_path: {tmp_path / 'taken'} is not a folder$"):
        check_storage_path(str(tmp_path / "taken" / "ray_results"))
    check_storage_path(str(tmp_path / "new" / "ray_results"))  # missing folders are fine: Tune creates them
    check_storage_path(f"file://{tmp_path}/new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # the check creates nothing


def test_storage_uri_of_an_unknown_filesystem_is_refused():
    with pytest.raises(ConfigError, match=r"^storage_path: cannot write to nfs://host/share \(.*nfs"):
        check_storage_path("nfs://host/share")


def test_unreachable_object_store_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    uri = f"s3://bucket/runs?endpoint_override=127.0.0.1:{_free_port()}&scheme=http"
    start = time.monotonic()
    code = main(["run", "configs/quickstart.yaml", "--set", f"storage_path={uri}",
                 "--set", f"tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"prunetune: error: storage_path: cannot write to {uri} (")
    assert time.monotonic() - start < 30  # the S3 client's retries, not a hang
    assert not any(tmp_path.iterdir())  # nothing started: no MLflow database either


def test_http_server_that_is_not_mlflow_is_one_line_and_exit_2(tmp_path, capsys):
    """A URL that answers but is no MLflow server (a plain file server: 404 on /health; an app that
    answers /health but not MLflow's tracking API), or one that refuses the driver's credentials:
    one line naming tracking_uri, exit 2, and nothing written."""
    import functools
    import http.server
    import threading

    class HealthOnly(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/health"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b"OK" if ok else b"<html>not found</html>")

        do_POST = do_GET

        def log_message(self, *args):
            pass

    class Locked(HealthOnly):  # /health is open, the API wants credentials (MLflow's basic-auth app)
        def do_GET(self):
            if self.path == "/health":
                return super().do_GET()
            self.send_response(401)
            self.end_headers()

        do_POST = do_GET

    class Files(http.server.SimpleHTTPRequestHandler):  # serves an empty folder: 404 for everything
        def log_message(self, *args):
            pass

    (tmp_path / "www").mkdir()
    files = functools.partial(Files, directory=str(tmp_path / "www"))
    for handler, expected in ((files, "answered HTTP 404 on /health"),
                              (HealthOnly, "answers but is not an MLflow tracking server"),
                              (Locked, "refused this driver's credentials")):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        store = tmp_path / "store"
        try:
            code = main(["run", "configs/quickstart.yaml", "--set", f"tracking_uri={uri}", "--set",
                         f"storage_path={store}", "--set", "methods=[l1_norm]"])
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"prunetune: error: tracking_uri: {uri} ") and expected in err[0], err[0]
        assert not store.exists()  # nothing started, nothing written


def test_the_model_checks_run_on_one_torch_thread_and_the_drivers_count_comes_back(monkeypatch):
    """A few images through a model: the default thread per core only adds spin-waits. The driver's
    count (its dense base trains with it) is back after preflight, passed or refused."""
    import search.preflight as pf

    seen = []
    check_model = pf.check_model
    monkeypatch.setattr(pf, "check_model", lambda cfg: (seen.append(torch.get_num_threads()), check_model(cfg)))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        preflight(_cfg("methods=[l1_norm]"))
        assert seen == [1] and torch.get_num_threads() == 3
        with pytest.raises(ConfigError, match="^model: vgg16_cifar does not run"):
            preflight(_cfg("model=vgg16_cifar"))
        assert seen == [1, 1] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
