"""A new SQLite MLflow database made by copying an empty one, instead of by MLflow's migrations.

MLflow builds a new SQLite database by creating its first tables and then running every schema
migration since (~100 alembic steps): 2.4 s of a sweep's start on a quiet 2-core machine, 7 s on a
loaded one. The result is the same file each time for one installed MLflow, so it is built once per
MLflow version and schema head (``<cache>/prunetune/mlflow-schema/mlflow-<version>-<head>.db``, cache
= ``$XDG_CACHE_HOME`` or ``~/.cache``) and copied. The template holds the migrated tables and no
rows: MLflow itself adds its Default experiment when it first opens the copy, as it does for a
database it migrated (same artifact location). A template whose recorded schema revision is not the
installed MLflow's head is never copied (rebuilt instead). Anything that goes wrong here (a cache
folder that cannot be written, an MLflow whose internals moved) leaves the database to MLflow's own
path: ``copy_fresh_database`` then returns False.
"""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from methods.errors import PruneTuneError

__all__ = ["copy_fresh_database", "template_path", "schema_head"]

log = logging.getLogger(__name__)
LOCK_TIMEOUT_S = 600.0


def schema_head() -> str:
    """The installed MLflow's latest schema revision (what it checks every database against)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prunetune" / "mlflow-schema"


def template_path(head: str | None = None) -> Path:
    """Where the empty database of the installed MLflow version and schema head is kept."""
    import mlflow

    return _cache_root() / f"mlflow-{mlflow.__version__}-{head or schema_head()}.db"


def _revision(db: Path) -> str | None:
    """The schema revision a database file records, and None unless it also holds no experiment."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            (rev,), = con.execute("SELECT version_num FROM alembic_version").fetchall()
            (n,), = con.execute("SELECT COUNT(*) FROM experiments").fetchall()
        finally:
            con.close()
    except (sqlite3.Error, ValueError):
        return None
    return rev if n == 0 else None


def _build(template: Path, head: str) -> None:
    """MLflow's own table creation and migrations, into a new file renamed into place at the end."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    template.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=template.name + ".", suffix=".tmp", dir=template.parent)
    os.close(fd)
    os.unlink(tmp)  # SQLite creates the file itself
    try:
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        if _revision(Path(tmp)) != head:
            raise PruneTuneError(f"the migrated template records another revision than {head}")
        os.replace(tmp, template)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _ready_template() -> Path:
    """The template of the installed MLflow, built (under a lock) if it is missing or stale."""
    from filelock import FileLock

    head = schema_head()
    template = template_path(head)
    if _revision(template) == head:
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(template) + ".lock", timeout=LOCK_TIMEOUT_S):
        if _revision(template) != head:
            log.info("building the empty MLflow %s database template %s", head, template)
            _build(template, head)
    return template


def copy_fresh_database(db: Path) -> bool:
    """Create the missing SQLite database ``db`` as a copy of the empty template; False (and
    nothing created) if that cannot be done, so the caller lets MLflow create it. The caller holds
    the database's lock."""
    if db.exists():
        return False
    try:
        template = _ready_template()
        tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(template, tmp)
            os.replace(tmp, db)
        finally:
            if tmp.exists():
                tmp.unlink()
    except Exception as exc:  # noqa: BLE001  (the normal path remains)
        log.debug("no database template (%s: %s); MLflow creates %s itself", type(exc).__name__, exc, db)
        return False
    return True
