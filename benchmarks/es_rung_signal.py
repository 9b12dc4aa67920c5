"""How well a trial's validation accuracy at fine-tune epoch k predicts its final accuracy: the
signal early stopping's rungs act on. Reads the full-budget arms (every trial ran every epoch) of
``bench_search_efficiency.py --out DIR`` runs:

    python benchmarks/es_rung_signal.py DIR/mlflow.db [...] [--epochs 9]

Per sweep: Spearman's rho between accuracy at fine-tune epoch k (k = 1, 2, 4) and at the last
epoch over the fine-tuned trials (scratch trains from fresh weights: its own cohort), and for each
trial on the sweep's final front its accuracy after fine-tune epoch 1 -> at the end.

Then a replay of all the sweeps through several stopping rules (``MultiObjectiveHalving.decide``
on every logged fine-tune epoch, in the order the epochs were logged; the times a real sweep would
save are not simulated): how many trials that ended on a front each rule stops, the hypervolume of
the unstopped trials over all (reference: accuracy 0, dense MACs), the share of fine-tune epochs
saved, and the trials stopped.
"""
from __future__ import annotations

import argparse
import statistics

FROM_SCRATCH = "scratch"  # its rungs are its own (search.early_stopping): left out of rho


def _ranks(x: list[float]) -> list[int]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0] * len(x)
    for rank, i in enumerate(order):
        out[i] = rank
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return num / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def sweep_rows(client, experiment_id: str, epochs: int) -> list[tuple[str, list[float], float, list[int]]]:
    """(method, accuracy at each fine-tune epoch, MACs, when each was logged) per trial of one sweep."""
    rows = []
    for run in client.search_runs([experiment_id], max_results=1000):
        if "prunetune.trial_id" not in run.data.tags:
            continue
        history = {m.step: m for m in client.get_metric_history(run.info.run_id, "accuracy")}
        steps = sorted(history)[-epochs:]  # the fine-tune epochs are a trial's last steps
        rows.append((run.data.params.get("method", "?"), [history[s].value for s in steps], run.data.metrics["macs"],
                     [history[s].timestamp for s in steps]))
    return rows


def replay(rows: list[tuple[str, list[float], float, list[int]]], scheduler) -> dict[int, int]:
    """Index -> fine-tune epoch at which ``scheduler`` stops that trial."""
    from ray.tune.schedulers import TrialScheduler

    stopped: dict[int, int] = {}
    for _, i, k in sorted((r[3][k], i, k) for i, r in enumerate(rows) for k in range(len(r[1]) - 1)):
        method, acc, macs, _ = rows[i]
        if i in stopped:
            continue
        result = {"stage": "finetune", "finetune_epoch": k + 1, "accuracy": acc[k], "macs": macs, "params": 1.0}
        if scheduler.decide(str(i), result, from_scratch=method == FROM_SCRATCH) == TrialScheduler.STOP:
            stopped[i] = k + 1
    return stopped


RULES = {  # name -> MultiObjectiveHalving keyword arguments (objectives accuracy, MACs)
    "grace 1, no guard (before)": {"grace_epochs": 1, "keep_rung_front": False},
    "grace 2, no guard": {"grace_epochs": 2, "keep_rung_front": False},
    "grace 1, rung front kept (now)": {"grace_epochs": 1},
    "grace 2, rung front kept": {"grace_epochs": 2},
}


def replay_table(sweeps: list[list[tuple]], epochs: int, base_epochs: int, dense_macs: float) -> None:
    from search.early_stopping import MultiObjectiveHalving
    from search.pareto import front, hypervolume

    ref, dirs = (0.0, dense_macs), ("max", "min")
    for name, kwargs in RULES.items():
        lost = on = stopped = 0
        kept_hv, saved = [], []
        for rows in sweeps:
            s = MultiObjectiveHalving(["accuracy", "macs"], reduction_factor=2,
                                      budgets=(epochs, epochs + base_epochs), **kwargs)
            stops = replay(rows, s)
            points = [[acc[-1], macs] for _, acc, macs, _ in rows]
            fr = front(points, dirs)
            on, lost, stopped = on + len(fr), lost + sum(i in stops for i in fr), stopped + len(stops)
            kept = [p for i, p in enumerate(points) if i not in stops]
            kept_hv.append(hypervolume(kept, ref, dirs) / hypervolume(points, ref, dirs))
            saved.append(sum(epochs - e for e in stops.values()) / (epochs * len(rows)))
        print(f"{name:32s} front trials stopped {lost} of {on}; HV kept mean {statistics.mean(kept_hv):.4f} "
              f"(min {min(kept_hv):.4f}); fine-tune epochs saved {statistics.mean(saved):.0%}; "
              f"stopped {stopped} of {sum(len(r) for r in sweeps)}")


def main() -> None:
    from mlflow.tracking import MlflowClient

    from search.pareto import front

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("databases", nargs="+")
    ap.add_argument("--epochs", type=int, default=9, help="the sweeps' finetune.epochs")
    ap.add_argument("--base-epochs", type=int, default=10, help="the sweeps' base.epochs (from-scratch budget)")
    args = ap.parse_args()
    sweeps, dense_macs = [], None
    for db in args.databases:
        client = MlflowClient(f"sqlite:///{db}")
        for exp in client.search_experiments():
            if not exp.name.startswith("eff-full"):
                continue
            rows = sweep_rows(client, exp.experiment_id, args.epochs)
            sweeps.append(rows)
            dense_macs = dense_macs or next((r.data.metrics["dense_macs"] for r in client.search_runs([exp.experiment_id])
                                             if "dense_macs" in r.data.metrics), None)
            tuned = [r for r in rows if r[0] != FROM_SCRATCH]
            on_front = front([[acc[-1], macs] for _, acc, macs, _ in rows], ("max", "min"))
            rhos = "  ".join(f"k={k}: rho {spearman([r[1][k - 1] for r in tuned], [r[1][-1] for r in tuned]):+.2f}"
                             for k in (1, 2, 4) if k < args.epochs)
            firsts = " ".join(f"{rows[i][1][0]:.2f}->{rows[i][1][-1]:.3f}" for i in sorted(on_front))
            print(f"{exp.name}  {rhos}  front (epoch 1 -> end): {firsts}")
    print(f"\nreplay of {len(sweeps)} sweeps (factor 2, rungs up to the budget / 2):")
    replay_table(sweeps, args.epochs, args.base_epochs, dense_macs or max(r[2] for rows in sweeps for r in rows))


if __name__ == "__main__":
    main()
