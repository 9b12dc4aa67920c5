"""The MLflow store a sweep writes to: opened safely, named absolutely.

``open_client`` builds an ``MlflowClient`` whose store is ready; for SQLite it creates or migrates
the database under a file lock beside it (``<db>.lock``; a new one is a copy of an empty database
of the installed MLflow, ``search.schema_cache``, rather than ~100 schema migrations), so two drivers
that first use one new database at the same time cannot both create its tables (which broke it
for good: ``table experiments already exists``, ``duplicate column name: step``). ``absolute_uri`` resolves a relative
SQLite path, which is what a sweep records so that resume, fronts and promote work from any
directory. Light on imports (no Ray; MLflow only when a client is opened, so the sweep's preflight,
which names the database absolutely, does not wait for MLflow's import before Ray starts): a process
that only reads records loads this alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from methods.errors import ConfigError

from .schema_cache import copy_fresh_database

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["open_client", "absolute_uri", "sqlite_path", "STORE_LOCK_TIMEOUT_S"]

#: How long a driver waits for another process that is creating or migrating the same SQLite database.
STORE_LOCK_TIMEOUT_S = 600.0


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores or in-memory databases)."""
    if urlparse(uri).scheme != "sqlite":
        return None
    path = unquote(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path resolved against the current directory (other URIs as
    they are): what a sweep records, so resume/fronts/promote work from any directory."""
    db = sqlite_path(uri)
    if db is None or db.is_absolute():
        return uri
    return "sqlite:///" + str(db.expanduser().resolve())


def open_client(uri: str, *, create: bool = True) -> MlflowClient:
    """An ``MlflowClient`` whose store is ready. For SQLite the database is created or migrated by
    one process at a time (a file lock beside it): two drivers that first use a new database at once
    would otherwise both create its tables and leave it broken for good. With ``create=False`` a
    missing database is an error (reading a sweep must not leave an empty database behind). A
    database that cannot be opened is one ConfigError line naming the file."""
    from filelock import FileLock, Timeout
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(uri)
    if not db.is_file() and not create:
        raise ConfigError(f"tracking_uri: the MLflow database {db} does not exist (moved or deleted?); "
                          "pass --tracking-uri or move it back")
    try:
        with FileLock(str(db) + ".lock", timeout=STORE_LOCK_TIMEOUT_S):
            copy_fresh_database(db)  # a missing one: a copy of an empty database of this MLflow, no migrations
            client = MlflowClient(uri)  # MLflow 3 builds the store here: creates or migrates the schema
            client.search_experiments(max_results=1)
    except Timeout:
        raise ConfigError(f"tracking_uri: another process held the lock on {db}.lock for "
                          f"{STORE_LOCK_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        raise ConfigError(f"tracking_uri: cannot lock {db}.lock ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001  (MlflowException, sqlalchemy errors: a broken database)
        raise ConfigError(f"tracking_uri: the MLflow database {db} is broken or unreadable "
                          f"({_first_line(exc)})") from None
    return client


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


