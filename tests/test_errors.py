"""Every error prunetune raises is a PruneTuneError (one root to catch), and the ones standing for a
built-in kind still are that kind (``except ValueError`` / ``KeyError`` / ``FileNotFoundError`` work)."""
from __future__ import annotations

import ast
import builtins
import importlib
import inspect
from pathlib import Path

import pytest

from methods.errors import ArgumentError, MissingFileError, NotFoundError, PruneTuneError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("methods", "search", "trainables")
BUILTIN_ERRORS = {name for name, obj in vars(builtins).items()
                  if inspect.isclass(obj) and issubclass(obj, BaseException)}
#: Built-ins a library may still raise: interrupts, and Python's protocol exceptions.
ALLOWED = {"KeyboardInterrupt", "SystemExit", "StopIteration", "NotImplementedError", "AttributeError"}


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            yield path, f"{package}.{path.stem}" if path.stem != "__init__" else package


def test_library_code_raises_no_builtin_error():
    offenders = []
    for path, _ in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                name = node.exc.func.id
                if name in BUILTIN_ERRORS and name not in ALLOWED:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} raise {name}")
    assert not offenders, "raise a methods.errors class instead:\n" + "\n".join(offenders)


def test_every_exception_class_the_library_defines_derives_from_the_root():
    """Private ones (``_Captured``: ThiNet's early exit from a forward pass) never leave their module."""
    outside = []
    for _, module_name in _modules():
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module_name
                    and not name.startswith("_") and not issubclass(obj, PruneTuneError)):
                outside.append(f"{module_name}.{name}")
    assert not outside, outside


def test_kinds_keep_their_builtin_bases_and_plain_messages():
    from trainables.data import DataError
    from trainables.models import create_model

    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope")
    assert issubclass(DataError, PruneTuneError) and issubclass(DataError, ValueError)
    assert issubclass(ArgumentError, ValueError) and issubclass(MissingFileError, FileNotFoundError)
    err = NotFoundError("no channel group is produced by 'conv9'")
    assert isinstance(err, KeyError) and str(err) == "no channel group is produced by 'conv9'"
