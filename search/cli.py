"""The ``prunetune`` command line: run, resume, fronts, promote, methods.

Bad input (config fields, paths) is reported as one line on stderr with exit code 2, before Ray or
MLflow start.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

__all__ = ["main"]

log = logging.getLogger("prunetune")
USAGE_ERROR, INTERNAL_ERROR = 2, 1


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:  # search.progress prints one line per trial; the MLflow logger's own is a debug detail
        logging.getLogger("search.tracking").setLevel(logging.WARNING)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)


def _cmd_run(args) -> int:
    from .config import load_config
    from .sweep import run_sweep

    from .store import absolute_uri

    cfg = load_config(args.config, args.set or [])
    result = run_sweep(cfg)
    _print_result(result, absolute_uri(cfg.tracking_uri))
    return 0


def _cmd_resume(args) -> int:
    from .sweep import resume_sweep

    result = resume_sweep(args.experiment_dir)
    _print_result(result, None)
    return 0


def _input_errors() -> tuple[type[BaseException], ...]:
    """What counts as bad input (exit 2): our ConfigError, a data set that does not load, a missing file."""
    from methods.errors import ConfigError
    from trainables.data import DataError

    return ConfigError, DataError, FileNotFoundError


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _print_result(result, tracking_uri) -> None:
    out = sys.stdout
    out.write(f"\nsweep directory: {result.experiment_dir}\n")
    out.write(f"MLflow parent run: {result.parent_run_id}\n")
    stopped = getattr(result, "stopped", 0)
    infeasible = getattr(result, "infeasible", 0)
    out.write(f"trials finished: {result.finished}, stopped early: {stopped}, failed: {result.failed}"
              f"{f', outside the constraints: {infeasible}' if infeasible else ''}, "
              f"hypervolume: {result.hypervolume:.6g}\n")
    out.write(f"Pareto front ({_front_title(result)}):\n")
    out.write(f"  {'method':<10} {'accuracy':>9} {'test acc':>9} {'MACs':>12} {'params':>10} {'latency ms':>11} "
              f"{'lat ratio':>9}  run\n")
    for p in result.front:
        out.write(f"  {p.method:<10} {p.accuracy:>9.4f} {p.test_accuracy:>9.4f} {int(p.macs):>12,} {int(p.params):>10,} "
                  f"{p.latency_ms:>11.3f} {p.latency_ratio:>9.3f}  {p.run_id}\n")
    if tracking_uri:
        from .ui_links import look_at_it

        out.write("\n" + look_at_it(tracking_uri, result.parent_run_id, result.objective))


def _front_title(result) -> str:
    """``validation accuracy vs MACs`` (or the sweep's other objectives)."""
    from . import objectives as _obj

    names = tuple(getattr(result, "objectives", None) or _obj.SHORTHANDS[result.objective or "macs"])
    if names == _obj.SHORTHANDS["latency"]:
        return "validation accuracy vs latency ratio (pruned / dense latency)"
    return " vs ".join("validation accuracy" if n == "accuracy" else _obj.get(n).label for n in names)


def _cmd_methods(args) -> int:
    import methods

    if args.markdown:
        print(methods.markdown_table())
        return 0
    for name in methods.list_methods():
        cls = methods.get_method_class(name)
        flags = [f for f, on in (("from scratch", cls.from_scratch), ("dynamic", cls.dynamic)) if on]
        print(f"{name}{' (' + ', '.join(flags) + ')' if flags else ''}")
        for hp in cls.hyperparameters:
            if hp.kind == "categorical":
                rng = "{" + ", ".join(map(str, hp.choices)) + "}"
            else:
                rng = f"[{hp.low:g}, {hp.high:g}]{' log' if hp.log else ''}"
            print(f"    {hp.name:<18} {hp.kind:<11} {rng:<24} default {hp.default!r}  {hp.doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunetune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a sweep from a YAML config")
    run.add_argument("config", help="sweep config (YAML), e.g. configs/quickstart.yaml")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config key (dotted for nesting; value parsed as YAML); repeatable")
    run.set_defaults(func=_cmd_run)

    resume = sub.add_parser("resume", help="continue an interrupted sweep")
    resume.add_argument("experiment_dir", help="the sweep directory printed by `prunetune run`: a folder or a "
                        "storage URI such as s3://bucket/prefix/NAME-YYYYmmdd-HHMMSS")
    resume.set_defaults(func=_cmd_resume)

    meth = sub.add_parser("methods", help="list the pruning methods and their search spaces")
    meth.add_argument("--markdown", action="store_true", help="print the README's method table instead")
    meth.set_defaults(func=_cmd_methods)

    try:
        from .compare import add_fronts_command
        from .promote import add_promote_command
    except ImportError:  # not yet built
        pass
    else:
        add_fronts_command(sub)
        add_promote_command(sub)
    return parser


def freeze_for_exit() -> None:
    """Put every object alive now out of the cyclic garbage collector's reach, so that the
    interpreter's exit does not traverse the ~1.5 M objects torch, MLflow and Ray import (about 1 s
    of a 2-core machine's exit, 0.2 s after). For a process that ends next only: what is frozen is
    never collected (``atexit`` handlers still run)."""
    import gc

    gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done; 2 bad input; 1 an internal error; 128 + signal number when SIGINT (130)
    or SIGTERM (143) interrupted a sweep. Every error is one line on stderr (``-v``: with the
    traceback in the log). As the program (``argv`` None), it ends with ``freeze_for_exit``."""
    try:
        return _main(argv)
    finally:
        if argv is None:
            freeze_for_exit()


def _main(argv: Sequence[str] | None) -> int:
    from .sweep import SweepInterrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except SweepInterrupted as exc:
        sys.stdout.flush()
        print(str(exc), file=sys.stderr)
        return 128 + int(exc.signum)
    except KeyboardInterrupt:  # outside a sweep (fronts, promote): nothing to resume
        print("interrupted", file=sys.stderr)
        return 128 + 2
    except _input_errors() as exc:
        log.debug("input error", exc_info=True)
        print(f"prunetune: error: {_one_line(exc)}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as exc:  # noqa: BLE001  (reported as one line; the traceback with -v)
        log.debug("internal error", exc_info=True)
        print(f"prunetune: internal error: {type(exc).__name__}: {_one_line(exc)} (-v for the traceback)",
              file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
