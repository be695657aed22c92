"""The integral ablation's report: per-variant table, paired claims, ``results.md`` and plots.

Works on run records as :func:`itpn_d2.experiments.integral_ablation.finetune` returns them
({"task", "variant", "budget", "seed", "loss", "evals", "final"}) and on pre-training MIM loss
curves ({kind: {pre-training seed: [[iteration, loss], ...]}}):

* :func:`summarise`: one row per (task, budget, variant), mean and sd over seeds;
* :func:`claims` / :func:`mim_claim`: the paired per-seed differences of every claim
  (:func:`itpn_d2.evaluation.paired_stats.paired`) and their verdicts;
* :func:`summary_table`: the claims at the final evaluation, one line each (the README's table);
* :func:`write_report`: ``results.md``; :func:`plot` / :func:`plot_mim`: ``curves_<task>.png``
  and ``mim_loss.png``.
"""
import os
import statistics
from typing import Dict, List, Optional, Sequence

from itpn_d2.evaluation.paired_stats import MIN_PAIRS_TO_ESTABLISH, paired, verdict
from itpn_d2.utils.flops import FLOP_CONVENTION

from .ablation_variants import CLAIMS, Task, budget_of

__all__ = ["summarise", "claims", "mim_claim", "summary_table", "write_report", "plot", "plot_mim"]


def _sel(runs, **kw):
    # the run records whose fields equal ``kw``
    return [r for r in runs if all(r.get(k) == v for k, v in kw.items())]


def _mean_sd(x: Sequence[float]) -> List[float]:
    return [statistics.mean(x), statistics.stdev(x) if len(x) > 1 else 0.0]


def summarise(runs: List[dict], tasks: Dict[str, Task], variants: Sequence[str], budgets: Sequence[str],
              iterations: Optional[Dict[str, Dict[str, int]]] = None) -> List[dict]:
    """One row per (task, budget, variant): seeds, each final metric per seed (``<m>_by_seed``, in
    the order of ``seed_ids``) with its mean and sd, the metric at the first evaluation, and the
    mean curve over the evaluations. ``iterations``: the pre-training lengths per budget
    (:func:`budget_of`)."""
    table = []
    for tname, task in tasks.items():
        for budget in budgets:
            for v in variants:
                rs = _sel(runs, task=tname, variant=v, budget=budget_of(v, budget, iterations))
                if not rs:
                    continue
                rs = sorted(rs, key=lambda r: r["seed"])
                row = {"task": tname, "budget": budget, "variant": v, "seeds": len(rs),
                       "seed_ids": [r["seed"] for r in rs], "eval_iters": [i for i, _ in rs[0]["evals"]]}
                for m in task.metrics:
                    final = [r["final"][m] for r in rs]
                    row[f"{m}_by_seed"] = final
                    first = [r["evals"][0][1][m] for r in rs]
                    row[m] = _mean_sd(final)
                    row[f"{m}_first_eval"] = _mean_sd(first)
                    n_ev = min(len(r["evals"]) for r in rs)
                    row[f"{m}_curve"] = [statistics.mean(r["evals"][k][1][m] for r in rs) for k in range(n_ev)]
                table.append(row)
    return table


def claims(runs: List[dict], tasks: Dict[str, Task], variants: Sequence[str], budgets: Sequence[str],
           iterations: Optional[Dict[str, Dict[str, int]]] = None) -> List[dict]:
    """Paired per-seed differences for every claim whose two variants were run, per task,
    budget and metric, at the final evaluation ("final") and at the first ("first_eval")."""
    out = []
    for tname, task in tasks.items():
        for budget in budgets:
            for label, a, b in CLAIMS:
                if a not in variants or b not in variants:
                    continue
                ra = {r["seed"]: r for r in _sel(runs, task=tname, variant=a, budget=budget_of(a, budget, iterations))}
                rb = {r["seed"]: r for r in _sel(runs, task=tname, variant=b, budget=budget_of(b, budget, iterations))}
                if not ra or not rb:
                    continue
                for m in task.metrics:
                    for when in ("final", "first_eval"):
                        def val(r):
                            return r["final"][m] if when == "final" else r["evals"][0][1][m]
                        p = paired({s: val(r) for s, r in ra.items()}, {s: val(r) for s, r in rb.items()})
                        out.append({"task": tname, "budget": budget, "claim": label, "a": a, "b": b, "metric": m,
                                    "when": when, **p, "verdict": verdict(p)})
    return out


def mim_claim(curves: Dict[str, Dict[int, List[List[float]]]], last: int = 3) -> Optional[dict]:
    """The reconstruction claim: final MIM loss (mean of the last ``last`` logged values) with the
    pyramid (``mim``) minus without (``backbone_only``), paired per pre-training seed."""
    if "mim" not in curves or "backbone_only" not in curves:
        return None

    def final(c):
        return statistics.mean(v for _, v in c[-last:])

    a = {s: final(c) for s, c in curves["mim"].items() if c}
    b = {s: final(c) for s, c in curves["backbone_only"].items() if c}
    p = paired(a, b)
    return {"claim": "pre-training MIM loss, with pyramid minus without", **p, "verdict": verdict(p)}


def _fmt_ci(p: dict, digits: int = 2) -> str:
    left_out = p.get("non_finite_seeds")
    note = f" (seeds {left_out} left out: not finite)" if left_out else ""
    if p["ci95"] is None:
        return "n/a" + note
    lo, hi = p["ci95"]
    return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]" + note


def summary_table(claim_rows: List[dict]) -> List[str]:
    """Markdown lines: one row per (budget, claim), one column per (task, metric), each cell the
    paired difference at the final evaluation as ``mean [95% CI] n=k``, with the verdict in bold
    when it is "established" or "suggested" (``n=k`` alone with fewer than 2 paired seeds)."""
    final = [c for c in claim_rows if c["when"] == "final"]
    if not final:
        return []
    cols = list(dict.fromkeys((c["task"], c["metric"]) for c in final))
    lines = ["| budget | claim (a - b) | " + " | ".join(f"{t} {m}" for t, m in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for budget, label, a, b in dict.fromkeys((c["budget"], c["claim"], c["a"], c["b"]) for c in final):
        cells = []
        for t, m in cols:
            hit = [c for c in final if (c["budget"], c["claim"], c["task"], c["metric"]) == (budget, label, t, m)]
            if not hit:
                cells.append("-")
                continue
            c = hit[0]
            if c["n"] < 2:  # no interval to show
                cells.append(f"n={c['n']}")
                continue
            shown = c["verdict"].startswith(("established", "suggested"))
            note = f" **{c['verdict']}**" if shown else ""
            cells.append(f"{c['mean']:+.2f} {_fmt_ci(c)} n={c['n']}{note}")
        lines.append(f"| equal {budget} | {label} ({a} - {b}) | " + " | ".join(cells) + " |")
    return lines


def write_report(table, claim_rows, flops, mim, path) -> str:
    """Write ``results.md`` to ``path`` (the summary of :func:`summary_table`, FLOPs per
    pre-training iteration, the table of each task and budget, the paired claims, the MIM-loss
    claim); returns its text."""
    lines = []
    summary = summary_table(claim_rows)
    if summary:
        lines += [f"Summary: paired per-seed differences at the final evaluation, mean [95% t-interval] and "
                  f"the number of seeds; established needs the interval to exclude 0 with at least "
                  f"{MIN_PAIRS_TO_ESTABLISH} seeds (the full table is below).", "", *summary, ""]
    if flops:
        lines += [f"FLOPs per pre-training iteration ({FLOP_CONVENTION}; batch x (3 x student forward + "
                  "teacher forward)):", "",
                  "| pre-training | student fwd / image (GFLOPs) | teacher fwd / image (GFLOPs) | batch | "
                  "per iteration (GFLOPs) | iterations (iters / flops budget) |", "|---|---|---|---|---|---|"]
        for k, f in flops.items():
            its = f.get("iterations", {})
            lines.append(f"| {k} | {f['student_fwd'] / 1e9:.3f} | {f['teacher_fwd'] / 1e9:.3f} | {f['batch']} | "
                         f"{f['per_iter'] / 1e9:.2f} | {its.get('iters', '?')} / {its.get('flops', '?')} |")
        lines.append("")
    for (task, budget) in dict.fromkeys((t["task"], t["budget"]) for t in table):
        rows = [t for t in table if t["task"] == task and t["budget"] == budget]
        metrics = [k for k in rows[0] if k + "_curve" in rows[0]]
        its = " / ".join(str(i) for i in rows[0]["eval_iters"])
        lines += [f"Task {task}, pre-training budget: equal {budget}", "",
                  "| variant | seeds | " + " | ".join(f"{m} (mean ± sd)" for m in metrics)
                  + " | " + " | ".join(f"{m} by seed" for m in metrics)
                  + " | " + " | ".join(f"{m} at iter {its}" for m in metrics) + " |",
                  "|---|---|" + "---|" * (3 * len(metrics))]
        for t in rows:
            lines.append(f"| {t['variant']} | {t['seeds']} | "
                         + " | ".join(f"{t[m][0]:.1f} ± {t[m][1]:.1f}" for m in metrics) + " | "
                         + " | ".join(", ".join(f"s{i} {a:.1f}" for i, a in zip(t["seed_ids"], t[m + "_by_seed"]))
                                      for m in metrics) + " | "
                         + " | ".join(" / ".join(f"{a:.1f}" for a in t[m + '_curve']) for m in metrics) + " |")
        lines.append("")
    if claim_rows:
        lines += ["Paired per-seed differences (a - b): mean, 95% t-interval, exact sign test. A claim is "
                  f"established when the interval excludes 0 with at least {MIN_PAIRS_TO_ESTABLISH} seeds; "
                  "with fewer it is only suggested.", "",
                  "| task | budget | claim | metric | at | n | mean | 95% CI | + / - / = | sign p | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in claim_rows:
            s = c["sign"]
            lines.append(f"| {c['task']} | {c['budget']} | {c['claim']} ({c['a']} - {c['b']}) | {c['metric']} | "
                         f"{c['when']} | {c['n']} | {c['mean']:+.2f} | {_fmt_ci(c)} | {s['pos']} / {s['neg']} / "
                         f"{s['ties']} | {s['p']:.3f} | {c['verdict']} |")
        lines.append("")
    if mim:
        s = mim["sign"]
        lines += [f"{mim['claim']}: n {mim['n']}, mean {mim['mean']:+.4f}, 95% CI {_fmt_ci(mim)}, "
                  f"sign + / - {s['pos']} / {s['neg']} (p {s['p']:.3f}): {mim['verdict']}", ""]
    text = "\n".join(lines)
    with open(path, "w") as f:
        f.write(text + "\n")
    return text


def plot(runs, table, tasks: Dict[str, Task], variants, budgets, out_dir,
         iterations: Optional[Dict[str, Dict[str, int]]] = None) -> List[str]:
    """``curves_<task>.png`` in ``out_dir``: fine-tuning loss and each metric over iterations,
    mean over seeds, one row per budget; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for tname, task in tasks.items():
        metrics = list(task.metrics)
        fig, axes = plt.subplots(len(budgets), 1 + len(metrics), figsize=(5 * (1 + len(metrics)), 3.6 * len(budgets)),
                                 squeeze=False)
        for bi, budget in enumerate(budgets):
            for v in variants:
                rs = _sel(runs, task=tname, variant=v, budget=budget_of(v, budget, iterations))
                if not rs:
                    continue
                n = min(len(r["loss"]) for r in rs)
                its = [i for i, _ in rs[0]["loss"][:n]]
                axes[bi][0].plot(its, [statistics.mean(r["loss"][k][1] for r in rs) for k in range(n)], label=v)
                row = [t for t in table if t["task"] == tname and t["budget"] == budget and t["variant"] == v][0]
                for mi, m in enumerate(metrics):
                    ev = row["eval_iters"][: len(row[m + "_curve"])]
                    axes[bi][1 + mi].plot(ev, row[m + "_curve"], marker="o", label=v)
            axes[bi][0].set(xlabel="fine-tuning iteration", ylabel="total loss (mean over seeds)",
                            title=f"{tname}, equal {budget}: loss")
            for mi, m in enumerate(metrics):
                axes[bi][1 + mi].set(xlabel="fine-tuning iteration", ylabel=f"{m} (mean over seeds)",
                                     title=f"{tname}, equal {budget}: {m}")
            for ax in axes[bi]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"curves_{tname}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_mim(curves: Dict[str, Dict[int, List[List[float]]]], flops: Dict[str, dict], path: str) -> None:
    """Pre-training MIM loss with and without the pyramid, over iterations and over FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_it, ax_fl) = plt.subplots(1, 2, figsize=(11, 4))
    names = {"backbone_only": "no pyramid (backbone only)", "mim": "pyramid (integral MIM)",
             "mim_mfm": "pyramid + MFM"}
    # One colour per pre-training: thin lines per seed, a thick line for the mean over the seeds that
    # logged each iteration, so 3 x 5 noisy curves stay readable.
    for n, (kind, by_seed) in enumerate(curves.items()):
        def draw(its, vals, **style):
            ax_it.plot(its, vals, color=f"C{n}", **style)
            if kind in flops:  # x: the TFLOPs spent after each iteration
                ax_fl.plot([(i + 1) * flops[kind]["per_iter"] / 1e12 for i in its], vals, color=f"C{n}", **style)

        per_iter: Dict[int, List[float]] = {}
        for seed, c in sorted(by_seed.items()):
            for i, v in c:
                per_iter.setdefault(i, []).append(v)
            draw([i for i, _ in c], [v for _, v in c], alpha=0.3, linewidth=0.8)
        if not per_iter:
            continue
        its = sorted(per_iter)
        seeds = sum(1 for c in by_seed.values() if c)
        draw(its, [sum(per_iter[i]) / len(per_iter[i]) for i in its], linewidth=2.2,
             label=f"{names.get(kind, kind)}: mean of {seeds} seeds (thin: each seed)")
    ax_it.set(xlabel="pre-training iteration", ylabel="MIM loss (masked units)",
              title="reconstruction, equal iterations")
    ax_fl.set(xlabel="pre-training TFLOPs", ylabel="MIM loss (masked units)", title="reconstruction, equal compute")
    ax_it.legend(fontsize=7)
    ax_fl.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
