"""A new SQLite MLflow database is a copy of an empty template of the installed MLflow
(search.schema_cache): the same schema MLflow's migrations build, a store MLflow opens and logs to,
and a template of another MLflow version or schema revision is never copied."""
import sqlite3

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from search import schema_cache
from search.store import open_client


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    return root / "prunetune" / "mlflow-schema"


def _schema(db) -> list:
    """Every table and index with its clauses (columns, constraints) in sorted order: MLflow's own
    migrations, run twice in one process, list a table's constraints in another order."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall()
    finally:
        con.close()
    return sorted((kind, name, tuple(sorted((sql or "").split(", \n\t")))) for kind, name, sql in rows)


def _revision(db) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    finally:
        con.close()


def test_a_copied_database_is_the_store_mlflow_builds_and_logs_to(cache, tmp_path):
    own = tmp_path / "own.db"
    MlflowClient(f"sqlite:///{own}").search_experiments()  # MLflow's own migrations, no template
    db = tmp_path / "copied.db"
    client = open_client(f"sqlite:///{db}")
    template = schema_cache.template_path()
    assert template.parent == cache and template.name == f"mlflow-{mlflow.__version__}-{schema_cache.schema_head()}.db"
    assert template.is_file()
    assert _schema(db) == _schema(own)
    assert _revision(db) == schema_cache.schema_head()
    default = client.get_experiment("0")  # added by MLflow on first open, as for a migrated database
    assert default.name == "Default"
    assert default.artifact_location == MlflowClient(f"sqlite:///{own}").get_experiment("0").artifact_location
    exp = client.create_experiment("e")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "accuracy", 0.5, step=3)
    client.set_terminated(run.info.run_id)
    again = MlflowClient(f"sqlite:///{db}").get_run(run.info.run_id)
    assert again.data.metrics == {"accuracy": 0.5} and again.info.status == "FINISHED"
    second = tmp_path / "second.db"  # the next database copies the same template
    before = template.stat().st_mtime_ns
    open_client(f"sqlite:///{second}").create_experiment("f")
    assert template.stat().st_mtime_ns == before and [e.name for e in MlflowClient(
        f"sqlite:///{second}").search_experiments(order_by=["name"])] == ["Default", "f"]


def test_a_stale_or_foreign_template_is_never_copied(cache, tmp_path, monkeypatch):
    head = schema_cache.schema_head()
    open_client(f"sqlite:///{tmp_path / 'first.db'}")
    template = schema_cache.template_path()
    con = sqlite3.connect(template)  # the file under this version's name records an older revision
    con.execute("UPDATE alembic_version SET version_num = 'stale'")
    con.commit()
    con.close()
    db = tmp_path / "after_stale.db"
    open_client(f"sqlite:///{db}").create_experiment("e")
    assert _revision(db) == head and _revision(template) == head  # rebuilt, then copied

    template.write_bytes(b"not a database")
    db = tmp_path / "after_garbage.db"
    open_client(f"sqlite:///{db}").create_experiment("e")
    assert _revision(db) == head

    monkeypatch.setattr(mlflow, "__version__", "0.0.1")  # another MLflow: another template
    other = schema_cache.template_path()
    assert other != template and not other.exists()
    open_client(f"sqlite:///{tmp_path / 'other.db'}")
    assert other.is_file()


def test_without_a_usable_cache_mlflow_creates_the_database(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache folder cannot be made
    db = tmp_path / "plain.db"
    assert schema_cache.copy_fresh_database(db) is False and not db.exists()
    client = open_client(f"sqlite:///{db}")
    assert _revision(db) == schema_cache.schema_head()
    assert client.get_experiment("0").name == "Default"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
