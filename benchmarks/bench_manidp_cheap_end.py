"""ManiDP (or ``--method``) at the cheap end of the quickstart: one quickstart trial (ResNet-20 on
8x8 digits, the config's base, phase and fine-tune) per (seed, prune_ratio), validation accuracy and
the fraction of the dense MACs it really uses on average (``1 - macs_reduction``), then per
prune_ratio the min/median/max over the seeds.

    python benchmarks/bench_manidp_cheap_end.py [--ratios 0.6 0.9 0.95 0.97] [--seeds 0 1]
        [--phase-epochs 2] [--code DIR] [--storage /tmp/lead_exp]
        [--method ista --hparam scope=all ...]

``--code DIR`` runs the trials with the package from another checkout (e.g. ``git archive`` of the
commit before a change, unpacked into DIR), so a before/after table comes from one script with the
same config, seeds and dense bases (the base models are cached under ``--storage`` by content hash).
Trials run one after the other with one thread each, as a quickstart worker does.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.6, 0.9, 0.95, 0.97])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--phase-epochs", type=int, default=2)
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1],
                        help="checkout whose methods/trainables/search packages run the trials")
    parser.add_argument("--storage", default="/tmp/lead_exp", help="where the dense base models are cached")
    parser.add_argument("--method", default="manidp", help="the pruning method every trial runs")
    parser.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                        help="a further hyperparameter of every trial (repeatable), e.g. scope=all")
    args = parser.parse_args()
    code = args.code.resolve()
    sys.path.insert(0, str(code))
    import torch

    torch.set_num_threads(1)
    import methods
    from methods.registry import get_method_class
    from search.config import load_config
    from search.sweep import settings_from_config
    from trainables.base_model import ensure_base_model
    from trainables.trial import run_trial

    logging.basicConfig(level=logging.WARNING)
    extra = dict(_parse(kv) for kv in args.hparam)
    if any(hp.name == "phase_epochs" for hp in get_method_class(args.method).hyperparameters):
        extra = {"phase_epochs": args.phase_epochs, **extra}  # methods without a phase (l1_norm) refuse it
    print(f"code: {Path(methods.__file__).parent.parent}")
    rows = []
    for seed in args.seeds:
        cfg = load_config(str(code / "configs" / "quickstart.yaml"), [f"storage_path={args.storage}", f"seed={seed}"])
        settings = settings_from_config(cfg)
        ensure_base_model(settings)
        for ratio in args.ratios:
            t0 = time.perf_counter()
            m = run_trial(settings, args.method, {"prune_ratio": ratio, **extra},
                          lambda metrics, save: None)
            rows.append((seed, ratio, m["accuracy"], 1.0 - m["macs_reduction"], time.perf_counter() - t0))
            print(f"seed {seed} prune_ratio {ratio:g}: val accuracy {m['accuracy']:.3f} at "
                  f"{100 * (1.0 - m['macs_reduction']):.1f}% of the dense MACs ({rows[-1][-1]:.0f} s)", flush=True)
    print("\n| seed | prune_ratio | val accuracy | % of dense MACs |\n| --- | --- | --- | --- |")
    for seed, ratio, acc, frac, _ in rows:
        print(f"| {seed} | {ratio:g} | {acc:.3f} | {100 * frac:.1f}% |")
    print(f"\n{args.method} {extra} over seeds {args.seeds}: min / median / max\n"
          "| prune_ratio | val accuracy | % of dense MACs |\n| --- | --- | --- |")
    for ratio in args.ratios:
        accs = [r[2] for r in rows if r[1] == ratio]
        fracs = [100 * r[3] for r in rows if r[1] == ratio]
        print(f"| {ratio:g} | {_spread(accs, '.3f')} | {_spread(fracs, '.1f')} |")


def _parse(kv: str) -> tuple[str, object]:
    key, _, value = kv.partition("=")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def _spread(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


if __name__ == "__main__":
    main()
