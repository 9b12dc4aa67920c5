"""How well a trial's validation accuracy at fine-tune epoch k predicts its final accuracy: the
signal early stopping's rungs act on. Reads the full-budget arms (every trial ran every epoch) of
``bench_search_efficiency.py --out DIR`` runs:

    python benchmarks/es_rung_signal.py DIR/mlflow.db [...] [--epochs 9]

Per sweep: Spearman's rho between accuracy at fine-tune epoch k (k = 1, 2, 4) and at the last
epoch over the fine-tuned trials (scratch trains from fresh weights: its own cohort), and for each
trial on the sweep's final front its accuracy after fine-tune epoch 1 -> at the end.
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


def sweep_rows(client, experiment_id: str, epochs: int) -> list[tuple[str, list[float], float]]:
    """(method, accuracy at each fine-tune epoch, MACs) per trial of one sweep."""
    rows = []
    for run in client.search_runs([experiment_id], max_results=1000):
        if "prunetune.trial_id" not in run.data.tags:
            continue
        acc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "accuracy")}
        steps = sorted(acc)[-epochs:]  # the fine-tune epochs are a trial's last steps
        rows.append((run.data.params.get("method", "?"), [acc[s] for s in steps], run.data.metrics["macs"]))
    return rows


def main() -> None:
    from mlflow.tracking import MlflowClient

    from search.pareto import front

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("databases", nargs="+")
    ap.add_argument("--epochs", type=int, default=9, help="the sweeps' finetune.epochs")
    args = ap.parse_args()
    for db in args.databases:
        client = MlflowClient(f"sqlite:///{db}")
        for exp in client.search_experiments():
            if not exp.name.startswith("eff-full"):
                continue
            rows = sweep_rows(client, exp.experiment_id, args.epochs)
            tuned = [r for r in rows if r[0] != FROM_SCRATCH]
            on_front = front([[acc[-1], macs] for _, acc, macs in rows], ("max", "min"))
            rhos = "  ".join(f"k={k}: rho {spearman([r[1][k - 1] for r in tuned], [r[1][-1] for r in tuned]):+.2f}"
                             for k in (1, 2, 4) if k < args.epochs)
            firsts = " ".join(f"{rows[i][1][0]:.2f}->{rows[i][1][-1]:.3f}" for i in sorted(on_front))
            print(f"{exp.name}  {rhos}  front (epoch 1 -> end): {firsts}")


if __name__ == "__main__":
    main()
