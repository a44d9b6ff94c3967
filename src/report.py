"""`python -m src.report DIR [metric=val/loss] [curve=train/loss]`: read a sweep without W&B.

DIR is a Hydra multirun directory (`python -m src.train -m ... hydra.sweep.dir=DIR`, grid or Optuna): one
folder per job with its `.hydra/overrides.yaml`, `metrics.json` (final metrics) and `csv/metrics.csv`
(per-step logs). Writes, into DIR:

    report.md             one row per job: the swept values, the chosen metric, the final losses; best first
                          (a job without metrics.json is listed as failed); Optuna's best trial if the sweep
                          was a search (optimization_results.yaml)
    report_<metric>.png   the metric against each swept value (one panel per swept key)
    report_curves.png     the `curve` column of every job's CSV log against the step, one line per job

The metric defaults to the jobs' `optimized_metric`, else `val/loss` where any job has it, else `train/loss`.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

USAGE = "usage: python -m src.report DIR [metric=NAME] [curve=NAME]"
LOSS_COLUMNS = ("train/loss", "val/loss")


@dataclass
class Job:
    name: str
    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float] | None
    optimized_metric: str | None = None
    curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_job(path: Path) -> Job:
    overrides: dict[str, str] = {}
    ov = path / ".hydra" / "overrides.yaml"
    if ov.is_file():
        for item in yaml.safe_load(ov.read_text()) or []:
            key, _, value = str(item).partition("=")
            overrides[key.lstrip("+~")] = value
    metrics = None
    if (path / "metrics.json").is_file():
        metrics = {k: _float(v) for k, v in json.loads((path / "metrics.json").read_text()).items()}
    optimized = None
    cfg = path / "config.yaml"
    if cfg.is_file():
        optimized = (yaml.safe_load(cfg.read_text()) or {}).get("optimized_metric")
    return Job(path.name, path, overrides, metrics, optimized)


def read_curves(job: Job) -> dict[str, list[tuple[int, float]]]:
    """Every numeric column of the job's CSV log(s) against the step."""
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(job.path.glob("csv/**/metrics.csv")):
        with f.open() as fh:
            for row in csv.DictReader(fh):
                step = _float(row.get("step"))
                if math.isnan(step):
                    continue
                for k, v in row.items():
                    value = _float(v)
                    if k not in ("step", "epoch") and not math.isnan(value):
                        out.setdefault(k, []).append((int(step), value))
    return out


def find_jobs(root: Path) -> list[Job]:
    dirs = [p for p in root.iterdir() if p.is_dir() and ((p / "metrics.json").is_file() or (p / ".hydra").is_dir())]
    key = (lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))
    return [read_job(p) for p in sorted(dirs, key=key)]


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value is not the same in every job."""
    keys = sorted({k for j in jobs for k in j.overrides})
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def pick_metric(jobs: list[Job], wanted: str | None) -> str:
    if wanted:
        return wanted
    for j in jobs:
        if j.optimized_metric:
            return j.optimized_metric
    have = {k for j in jobs if j.metrics for k in j.metrics}
    return "val/loss" if "val/loss" in have else "train/loss"


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.6g}"


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def plot_metric(jobs: list[Job], keys: list[str], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [j for j in jobs if j.metrics and metric in j.metrics]
    panels = keys or ["job"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        labels = [j.overrides.get(key, "") if key != "job" else j.name for j in done]
        ys = [j.metrics[metric] for j in done]
        xs = _numeric(labels)
        if xs is not None:
            order = sorted(range(len(xs)), key=lambda i: xs[i])
            # a line only for a one-key grid; with several keys neighbours differ in the others too
            ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-" if len(panels) == 1 else "o")
            if xs and min(xs) > 0 and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
        else:
            ax.scatter(range(len(labels)), ys)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} by swept value ({len(done)} jobs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(jobs: list[Job], keys: list[str], column: str, path: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    n = 0
    for j in jobs:
        points = j.curve.get(column)
        if not points:
            continue
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={j.overrides.get(k)}" for k in keys) or j.name
        ax.plot([p[0] for p in points], [p[1] for p in points], label=f"{j.name}: {label}")
        n += 1
    ax.set_xlabel("step")
    ax.set_ylabel(column)
    ax.grid(alpha=0.3)
    if n:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return n


def report(root: str | Path, metric: str | None = None, curve: str = "train/loss") -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (a multirun dir: hydra.sweep.dir of `src.train -m`)")
    jobs = find_jobs(root)
    if not jobs:
        raise FileNotFoundError(f"{root}: no job folders (each with metrics.json or .hydra/) in it")
    for j in jobs:
        j.curve = read_curves(j)
    keys = swept_keys(jobs)
    metric = pick_metric(jobs, metric)

    def sort_key(j: Job):
        v = (j.metrics or {}).get(metric, math.nan)
        return (math.isnan(v), v)

    ranked = sorted(jobs, key=sort_key)
    extra = [c for c in LOSS_COLUMNS if c != metric and any(j.metrics and c in j.metrics for j in jobs)]
    lines = [f"# Sweep report: `{root}`", "",
             f"{len(jobs)} jobs ({sum(j.metrics is None for j in jobs)} without metrics.json); swept: "
             + (", ".join(f"`{k}`" for k in keys) or "nothing (identical overrides)") + f"; ranked by `{metric}`.", ""]
    header = ["job", *keys, metric, *extra]
    lines += ["| " + " | ".join(f"`{h}`" if h not in ("job",) else h for h in header) + " |",
              "|" + "---|" * len(header)]
    for j in ranked:
        if j.metrics is None:
            cells = [j.name, *(j.overrides.get(k, "") for k in keys), "failed (no metrics.json)", *("—" for _ in extra)]
        else:
            cells = [j.name, *(j.overrides.get(k, "") for k in keys), _cell(j.metrics.get(metric)),
                     *(_cell(j.metrics.get(c)) for c in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    best = root / "optimization_results.yaml"
    if best.is_file():
        res = yaml.safe_load(best.read_text()) or {}
        lines += ["", f"Search result (`optimization_results.yaml`): best value {_cell(_float(res.get('best_value')))} "
                      f"with " + ", ".join(f"`{k}={v}`" for k, v in (res.get("best_params") or {}).items())]
    metric_png = root / f"report_{_safe(metric)}.png"
    plot_metric(jobs, keys, metric, metric_png)
    lines += ["", f"![{metric} by swept value]({metric_png.name})"]
    curves_png = root / "report_curves.png"
    if plot_curves(jobs, keys, curve, curves_png):
        lines += ["", f"`{curve}` per step (CSV logs):", "", f"![{curve} curves]({curves_png.name})"]
    else:
        lines += ["", f"No job has a `{curve}` column in csv/**/metrics.csv (logger=csv or wandb_csv writes it)."]
    out = root / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str]) -> None:
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__}")
        return
    if not argv or "=" in argv[0]:
        raise SystemExit(USAGE)
    opts = {}
    for a in argv[1:]:
        key, eq, value = a.partition("=")
        if not eq or key not in ("metric", "curve"):
            raise SystemExit(f"{USAGE} (got {a!r})")
        opts[key] = value
    path = report(argv[0], opts.get("metric"), opts.get("curve", "train/loss"))
    print(path.read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
