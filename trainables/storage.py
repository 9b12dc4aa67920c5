"""Where shared files live: a local or NFS folder, or an object-store URI such as
``s3://bucket/prefix?endpoint_override=host:9000&scheme=http`` (anything ``pyarrow.fs`` knows, the
layer Ray Tune uses for its own ``storage_path``).

A *location* is a plain string: a local path, or a URI whose query string (pyarrow's filesystem
options) stays at the end when parts are joined on. Every process resolves a location itself, so
credentials never travel with it: each node uses its own AWS credential chain (environment,
``~/.aws``, instance role). ``FORWARDED_ENV`` names the variables Ray Tune already copies from the
driver to its trial actors; :func:`forwarded_env` gives the same to tasks prunetune starts itself.
"""
from __future__ import annotations

import functools
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from methods.errors import MissingFileError

__all__ = ["is_uri", "resolve", "local_path", "join", "name", "exists", "is_file", "read_text", "write_text",
           "upload_dir", "download_dir", "delete", "publish_dir", "forwarded_env", "FORWARDED_ENV"]

#: What Ray Tune copies from the driver's environment into every trial actor (ray.tune.execution.class_cache).
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_LOCAL = pafs.LocalFileSystem()


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


@functools.lru_cache(maxsize=32)
def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``scheme://netloc?query`` (one client per distinct root and process)."""
    return pafs.FileSystem.from_uri(root)


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path on it)``; a local path comes back absolute on the local filesystem."""
    text = str(location)
    if not is_uri(text):
        return _LOCAL, os.path.abspath(os.path.expanduser(text))
    parts = urlsplit(text)
    if parts.scheme == "file":
        return _LOCAL, os.path.abspath(parts.path or "/")
    fs, root = _filesystem(urlunsplit((parts.scheme, parts.netloc, "", parts.query, "")))
    sub = parts.path.strip("/")
    if not sub:
        return fs, root.rstrip("/") or "/"
    return fs, posixpath.join(root, sub) if root and root != "/" else "/" + sub


def local_path(location: str | os.PathLike) -> Path | None:
    """The folder on this machine (local disk or an NFS mount), or None for an object store."""
    fs, path = resolve(location)
    return Path(path) if isinstance(fs, pafs.LocalFileSystem) else None


def join(location: str | os.PathLike, *parts: str) -> str:
    text = str(location)
    if not is_uri(text):
        return os.path.join(text, *parts)
    u = urlsplit(text)
    return urlunsplit((u.scheme, u.netloc, posixpath.join(u.path or "/", *parts), u.query, ""))


def name(location: str | os.PathLike) -> str:
    text = str(location)
    path = urlsplit(text).path if is_uri(text) else text
    return os.path.basename(path.rstrip("/" + os.sep))


def _info(location) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    return _info(location).type == pafs.FileType.File


def read_text(location: str | os.PathLike) -> str:
    """The file's text; FileNotFoundError (naming ``location``) if it is not there."""
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except FileNotFoundError:
        raise MissingFileError(f"{location} does not exist") from None
    except OSError:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise MissingFileError(f"{location} does not exist") from None
        raise


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write a whole file (its folder is created on a local filesystem)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def upload_dir(local_dir: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy the files under ``local_dir`` to ``location`` (created; existing files overwritten)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        shutil.copytree(local_dir, path, dirs_exist_ok=True)
        return
    pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=_LOCAL, destination_filesystem=fs)


def download_dir(location: str | os.PathLike, local_dir: str | os.PathLike) -> None:
    """Copy every file under ``location`` into ``local_dir`` (created)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise MissingFileError(f"{location} does not exist")
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(local_dir).resolve()), source_filesystem=fs, destination_filesystem=_LOCAL)


def delete(location: str | os.PathLike) -> None:
    """Remove a file or a folder with everything under it; nothing if it is not there."""
    fs, path = resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def publish_dir(target: Path, fill: Callable[[Path], None]) -> bool:
    """Fill a new temporary sibling of local folder ``target`` (``fill(folder)``) and rename it to
    ``target``, so a concurrent reader sees a whole folder or none. False when the rename fails
    (another process published ``target`` first: theirs is kept). The sibling is named ``.tmp-*``
    (listings skip dot-names) and never outlives the call; ``fill``'s errors propagate."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            return False
        tmp = None
        return True
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def forwarded_env() -> dict[str, str]:
    """The credential variables of this process that Ray Tune would forward to a trial actor."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
