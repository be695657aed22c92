"""The integral ablation: what the pyramid in pre-training and MFM each add (``tools/ablate_integral.py``).

Tiny iTPN fine-tuned from each variant of :data:`.ablation_variants.VARIANTS` (scratch,
backbone-only MIM, encoder of the integral MIM, integral MIM, integral MIM + MFM), per task,
seed and pre-training budget (equal iterations, or equal FLOPs: :func:`pretrain_flops`,
:func:`budget_iters`).

:func:`run_ablation` runs the whole experiment into one folder and reports it
(:mod:`.ablation_report`). Its layout, which later sessions read back:

* ``flops.json``: FLOPs per pre-training iteration of each kind (:data:`FLOP_CONVENTION`) and
  its iterations under each budget; counts of another convention are redone;
* ``pretrain_<kind>_<iters>it_s<seed>[_data]/``: one pre-training run;
* ``ft_<task>_<variant>[@flops]_s<seed>[_data]/``: one fine-tuning run (``_data``: with
  ``vary_data``, the seed also seeds the data stream);
* ``results.json``, ``results.md``, ``curves_<task>.png``, ``mim_loss.png``: the report.

A run whose ``model_final.pth`` exists is finished and only read back (:func:`pretrain`,
:func:`finetune`); any other is started with ``--resume``, so an interrupted one continues.
Each run is a ``tools/lazyconfig_train_net.py`` subprocess (:func:`run`).
"""
import difflib
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from itpn_d2.utils.checkout import REPO_ROOT
from itpn_d2.utils.flops import FLOP_CONVENTION
from itpn_d2.utils.metrics_json import read_metrics

from .ablation_report import claims, mim_claim, plot, plot_mim, summarise, write_report
from .ablation_variants import (
    BUDGETS,
    FINETUNE_CFG,
    PRETRAININGS,
    SEG_FINETUNE_CFG,
    VARIANTS,
    Task,
    budget_of,
    make_tasks,
)

__all__ = [
    "AblationError",
    "AblationOptions",
    "run_ablation",
    "run",
    "pretrain_flops",
    "budget_iters",
    "pretrain",
    "mim_curve",
    "finetune",
]


class AblationError(RuntimeError):
    """The ablation cannot go on: a bad option, a missing file or a failed run (the message says which)."""


@dataclass
class AblationOptions:
    """Everything :func:`run_ablation` needs; ``tools/ablate_integral.py`` has one flag per field
    and ``results.json`` records them under ``"args"``.

    Attributes:
        output_dir: the experiment's folder (every run and the report).
        seeds: fine-tuning seeds.
        pretrain_seeds: pre-training seeds; fine-tuning seed number i uses pre-training seed
            i mod their count. None: one pre-training per fine-tuning seed (seed s fine-tunes
            from the pre-trainings of seed s), so the intervals cover pre-training noise too.
        pretrain_iters: the equal-iterations budget (500: ``configs/pretrain/mim_mfm_itpn_tiny_cpu.py``'s length).
        finetune_iters: iterations of each fine-tuning; None: each task's config's own
            ``train.max_iter`` (the task configs' own schedules).
        evals: evaluations during each fine-tuning run.
        variants: names of :data:`VARIANTS` to run.
        budgets: names of :data:`BUDGETS` to run.
        tasks: "det" and / or "seg".
        det_config: the detection fine-tuning config.
        seg_config: the segmentation fine-tuning config (task "seg").
        seg_metric: metrics.json key of the segmentation metric.
        pretrain_mim_mfm: a finished MIM + MFM pre-training checkpoint (same config and
            ``pretrain_iters``) to stand for the equal-iterations one of the first pre-training
            seed; its metrics.json beside it gives the MIM-loss curve.
        report_only: no new runs: report the finished ones.
        jobs: runs at once, each with cores / jobs torch threads.
        vary_data: also seed the data stream with each seed (``dataloader.train.seed``: image order,
            augmentations, MIM masks), so the intervals cover the order of the data too. Off: every
            run sees data seed 0 and a seed varies initialisation and drop path only (the committed
            5-seed run). Its folders are named ``..._s<seed>_data``, apart from the others.
    """

    # field order is the order of the tool's flags and of "args" in results.json
    output_dir: str = "output/ablation"
    seeds: Sequence[int] = (0, 1, 2, 3, 4)
    pretrain_seeds: Optional[Sequence[int]] = None
    pretrain_iters: int = 500
    finetune_iters: Optional[int] = None
    evals: int = 3
    variants: Sequence[str] = tuple(VARIANTS)
    budgets: Sequence[str] = BUDGETS
    tasks: Sequence[str] = ("det", "seg")
    det_config: str = FINETUNE_CFG
    seg_config: Optional[str] = SEG_FINETUNE_CFG
    seg_metric: str = "sem_seg/mIoU"
    pretrain_mim_mfm: Optional[str] = None
    report_only: bool = False
    jobs: int = 1
    vary_data: bool = False


# Torch threads per run when several run at once (``jobs``). Module state rather than an
# argument of run() because every run of one experiment shares it and run() is the one
# seam a test replaces.
_threads_per_run: Optional[int] = None


def run(cmd, log_path):
    """Run ``cmd`` from the repository root, its output appended to ``log_path``; raise
    ``RuntimeError`` (the log's tail on stderr) if it fails."""
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if _threads_per_run:
        env.setdefault("OMP_NUM_THREADS", str(_threads_per_run))
    with open(log_path, "a") as log:
        rc = subprocess.call(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        with open(log_path) as f:
            sys.stderr.write("".join(f.readlines()[-30:]))
        raise RuntimeError(f"command failed (exit {rc}); log: {log_path}")


def _finite(v) -> float:
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


# ---------------------------------------------------------------------------- FLOPs


def pretrain_flops(kind: str, overrides: Sequence[str] = ()) -> Dict[str, float]:
    """FLOPs of one pre-training iteration of ``kind`` (``itpn_d2.utils.flops``: 2 per multiply-add).

    Returns {"student_fwd", "teacher_fwd"} per image, "batch", and "per_iter" =
    batch x (3 x student_fwd + teacher_fwd): the student's backward is taken as twice its
    forward (the usual estimate), the teacher runs forward only; losses and the EMA update
    (elementwise) are left out.
    """
    import torch
    from detectron2.config import instantiate

    from itpn_d2.config import load_config
    from itpn_d2.utils.flops import forward_flops

    cfg_path, kind_overrides = PRETRAININGS[kind]
    cfg = load_config(os.path.join(REPO_ROOT, cfg_path), [*kind_overrides, *overrides])
    model = instantiate(cfg.model).eval()
    size = int(cfg.dataloader.train.mapper.image_size)
    grid = (size // model.unit_size, size // model.unit_size)
    images = torch.zeros(1, 3, size, size)
    ids_keep, _ = model.make_mask(1, grid, generator=torch.Generator().manual_seed(0))

    class Student(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, ids):
            out = self.m.predict(x, ids)
            preds = []
            for part in (out["mim"], out["mfm"]):
                if part is not None:
                    preds += list(part) if isinstance(part, (list, tuple)) else [part]
            return tuple(preds)

    student = forward_flops(Student(model), images, ids_keep)
    teacher = forward_flops(model.teacher, images) if model.teacher is not None else 0
    batch = int(cfg.dataloader.train.total_batch_size)
    return {"student_fwd": float(student), "teacher_fwd": float(teacher), "batch": batch,
            "per_iter": float(batch * (3 * student + teacher)), "convention": FLOP_CONVENTION}


def budget_iters(flops: Dict[str, Dict[str, float]], iters: int) -> Dict[str, int]:
    """Equal compute: each kind's iterations so that its FLOPs match the most expensive kind's at ``iters``."""
    ref = max(f["per_iter"] for f in flops.values())
    return {k: int(round(iters * ref / f["per_iter"])) for k, f in flops.items()}


# ---------------------------------------------------------------------------- runs


def pretrain(kind: str, out: str, iters: Optional[int], seed: int = 0, data_seed: Optional[int] = None) -> str:
    """Run (or reuse, or resume) one pre-training; returns its final checkpoint. ``data_seed``:
    ``dataloader.train.seed`` (None: the config's)."""
    ckpt = os.path.join(out, "model_final.pth")
    if os.path.exists(ckpt):
        print(f"[ablation] reusing {ckpt}")
        return ckpt
    cfg, overrides = PRETRAININGS[kind]
    cmd = [sys.executable, "tools/lazyconfig_train_net.py", "--config-file", cfg, "--resume",
           f"train.output_dir={out}", f"train.seed={seed}", *overrides, *_data_overrides(data_seed)]
    if iters:
        cmd += [f"train.max_iter={iters}"]
    os.makedirs(out, exist_ok=True)
    run(cmd, os.path.join(out, "run.log"))
    return ckpt


def _data_overrides(data_seed: Optional[int]) -> List[str]:
    return [] if data_seed is None else [f"dataloader.train.seed={int(data_seed)}"]


def mim_curve(out: str) -> List[List[float]]:
    """[(iteration, MIM loss)] of a pre-training run. A run whose only loss is MIM logs it
    as ``total_loss`` (detectron2 logs a single term under that name alone)."""
    curve = []
    for r in read_metrics(out):
        if "loss_mim" in r:
            curve.append([r["iteration"], r["loss_mim"]])
        elif "total_loss" in r and not any(k.startswith("loss_") for k in r):
            curve.append([r["iteration"], r["total_loss"]])
    return curve


def _without_train(yaml_text: str) -> List[str]:
    """The lines of a saved config without its top-level ``train:`` block (what differs by design
    between the runs of one task: output folder, seed, checkpoint, schedule overrides)."""
    lines, in_train = [], False
    for line in yaml_text.splitlines():
        if line[:1].strip():  # a top-level key
            in_train = line.startswith("train:")
        if not in_train:
            lines.append(line)
    return lines


def _saved_iteration(path: str) -> Optional[int]:
    """The iteration a detectron2 checkpoint was saved at (``model_final.pth`` of an N-iteration run:
    N - 1), or None when the file holds none."""
    from itpn_d2.checkpoint import CheckpointFileError
    from itpn_d2.checkpoint.safe_load import load_checkpoint_file

    try:
        ckpt = load_checkpoint_file(path)
    except CheckpointFileError as e:  # missing, corrupt or refused: it names the file
        raise AblationError(str(e)) from e
    it = ckpt.get("iteration") if isinstance(ckpt, dict) else None
    return None if it is None else int(it)


def saved_recipe(config: str, overrides: Sequence[str] = ()) -> List[str]:
    """``config`` with ``overrides`` as the training script saves it into a run's ``config.yaml``
    (detectron2's ``LazyConfig.save``), without the ``train:`` block: model, data, optimizer and
    schedule."""
    import tempfile

    from detectron2.config import LazyConfig

    path = config if os.path.isabs(config) else os.path.join(REPO_ROOT, config)
    with tempfile.TemporaryDirectory() as d:
        dst = os.path.join(d, "config.yaml")
        LazyConfig.save(LazyConfig.apply_overrides(LazyConfig.load(path), list(overrides)), dst)
        with open(dst) as f:
            return _without_train(f.read())


def _check_reused_run(out: str, ckpt: Optional[str], recipe: Optional[List[str]] = None) -> None:
    """Refuse to reuse (or resume) a fine-tuning folder that was started from another checkpoint
    than the one asked for (e.g. made when every seed shared one pre-training), or, given
    ``recipe`` (:func:`saved_recipe` of the task's config), with another recipe (the config was
    changed since): raise ``RuntimeError`` naming both. The folder's ``config.yaml`` (written by
    the training script) records what it ran."""
    path = os.path.join(out, "config.yaml")
    if not os.path.exists(path):
        return
    with open(path) as f:  # not yaml.safe_load: the saved config has python tags (ShapeSpec, ...)
        saved = f.read()
    if recipe is not None:
        had_recipe = _without_train(saved)
        if had_recipe != recipe:
            diff = [d for d in difflib.unified_diff(had_recipe, recipe, "the run", "the config", n=0, lineterm="")
                    if d[:1] in "+-" and d[:3] not in ("---", "+++")][:6]
            raise RuntimeError(f"{out} was fine-tuned with another recipe than the task's config now gives "
                               "(the config changed since?); first differences:\n" + "\n".join(diff)
                               + "\nmove the folder away or use another --output-dir")
    had, in_train = "", False
    for line in saved.splitlines():
        if line[:1].strip():  # a top-level key
            in_train = line.startswith("train:")
        elif in_train and line.startswith("  init_checkpoint:"):
            had = line.split(":", 1)[1].strip().strip("'\"")
            break
    want = ckpt or ""
    same = os.path.abspath(had) == os.path.abspath(want) if had and want else had == want
    if not same:
        raise RuntimeError(f"{out} was fine-tuned from {had or 'nothing (scratch)'!r}, this experiment asks "
                           f"for {want or 'nothing (scratch)'!r}: move the folder away or use another --output-dir")


def finetune(task: Task, variant: str, ckpt: Optional[str], load_mode: str, seed: int, iters: int, evals: int,
             out: str, budget: str = "iters", recipe: Optional[List[str]] = None,
             data_seed: Optional[int] = None) -> dict:
    """Run (or reuse, or resume) one fine-tuning; returns its record:
    {"task", "variant", "budget", "seed", "loss": [(iter, total_loss)],
     "evals": [(iters trained, {metric: value})], "final": {metric: value}}.
    ``recipe``: :func:`saved_recipe` of the task's config (with the same ``data_seed``), to refuse a
    folder run with another. ``data_seed``: ``dataloader.train.seed`` (None: the config's)."""
    _check_reused_run(out, ckpt, recipe)
    if not os.path.exists(os.path.join(out, "model_final.pth")):
        os.makedirs(out, exist_ok=True)
        cmd = [sys.executable, "tools/lazyconfig_train_net.py", "--config-file", task.config, "--resume",
               f"train.output_dir={out}", f"train.seed={seed}", f"train.max_iter={iters}",
               f"train.eval_period={max(iters // evals, 1)}", f"train.checkpointer.period={iters}",
               "train.log_period=10", f"train.backbone_load={load_mode}",
               f"train.init_checkpoint={ckpt or ''}", *task.extra, *_data_overrides(data_seed)]
        run(cmd, os.path.join(out, "run.log"))
    rows = read_metrics(out)
    loss = [(r["iteration"], r["total_loss"]) for r in rows if "total_loss" in r]
    keys = list(task.metrics.values())
    # the final evaluation is logged one past max_iter - 1
    evs = [(min(r["iteration"] + 1, iters), {m: _finite(r.get(k)) for m, k in task.metrics.items()})
           for r in rows if any(k in r for k in keys)]
    if not evs:
        raise RuntimeError(f"{out}/metrics.json has no {keys}: did the run evaluate?")
    return {"task": task.name, "variant": variant, "budget": budget, "seed": seed, "loss": loss,
            "evals": evs, "final": evs[-1][1]}


# ---------------------------------------------------------------------------- the experiment


def run_ablation(options: AblationOptions) -> List[dict]:
    """Run (or reuse, or resume) every pre-training and fine-tuning ``options`` asks for, then
    write the report into ``options.output_dir``; returns the fine-tuning records.

    Raises :class:`AblationError` for a bad task, a missing ``pretrain_mim_mfm`` file or a failed run.
    """
    global _threads_per_run
    try:
        tasks = make_tasks(options.tasks, options.det_config, options.seg_config, options.seg_metric)
    except (ValueError, FileNotFoundError) as e:
        raise AblationError(str(e)) from e
    _threads_per_run = max(1, (os.cpu_count() or 1) // options.jobs) if options.jobs > 1 else None
    out = os.path.abspath(options.output_dir)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()

    kinds = sorted({VARIANTS[v][0] for v in options.variants} - {None})
    flops_path = os.path.join(out, "flops.json")
    flops = {}
    if os.path.exists(flops_path):
        with open(flops_path) as f:
            # counts of another convention (fvcore's, one per multiply-add, before) are redone
            flops = {k: v for k, v in json.load(f).items() if v.get("convention") == FLOP_CONVENTION}
    for k in kinds:
        if k not in flops:
            flops[k] = pretrain_flops(k)
    iters = {"iters": {k: options.pretrain_iters for k in kinds},
             "flops": budget_iters({k: flops[k] for k in kinds}, options.pretrain_iters)}
    for k in kinds:
        flops[k]["iterations"] = {b: iters[b][k] for b in BUDGETS}
    with open(flops_path, "w") as f:
        json.dump(flops, f, indent=1)

    pre_seeds = list(options.pretrain_seeds or options.seeds)

    # With vary_data a run's data seed is its seed, and its folder says so: it can never be mixed
    # up with (or reuse) a run on data seed 0.
    data_tag = "_data" if options.vary_data else ""

    def data_seed(seed):
        return seed if options.vary_data else None

    def pre_dir(kind, budget, seed):
        return os.path.join(out, f"pretrain_{kind}_{iters[budget][kind]}it_s{seed}{data_tag}")

    if options.pretrain_mim_mfm and "mim_mfm" in kinds:
        given = os.path.abspath(options.pretrain_mim_mfm)
        if not os.path.isfile(given):
            raise AblationError(f"--pretrain-mim-mfm {options.pretrain_mim_mfm}: no such file")
        want = iters["iters"]["mim_mfm"]
        saved_at = _saved_iteration(given)
        if saved_at is None or saved_at + 1 != want:
            # make demo's pre-training is no longer this budget's (700 iterations, not 500): a checkpoint of
            # another length would stand for the equal-iterations run unnoticed
            raise AblationError(
                f"--pretrain-mim-mfm {options.pretrain_mim_mfm}: saved at iteration {saved_at}, but the "
                f"equal-iterations MIM + MFM pre-training it stands for runs {want} iterations (its final "
                f"checkpoint is saved at {want - 1}); make one with `python tools/lazyconfig_train_net.py "
                f"--config-file {PRETRAININGS['mim_mfm'][0]} train.max_iter={want}`, or leave the flag out"
            )
        if options.vary_data and pre_seeds[0] != 0:
            raise AblationError(f"--pretrain-mim-mfm with --vary-data stands for pre-training seed {pre_seeds[0]}, "
                                "whose data seed would be the same, but a given checkpoint's data seed is the "
                                "config's (0): make 0 the first seed, or leave --pretrain-mim-mfm out")
        d = pre_dir("mim_mfm", "iters", pre_seeds[0])
        os.makedirs(d, exist_ok=True)
        beside = os.path.join(os.path.dirname(given), "metrics.json")
        for name, src in (("model_final.pth", given), ("metrics.json", beside)):
            dst = os.path.join(d, name)
            if os.path.exists(src) and not os.path.lexists(dst):
                os.symlink(src, dst)

    # Pre-trainings run when a fine-tuning first needs them (seed by seed, as the fine-tunings),
    # each once: a lock per folder keeps two fine-tunings from starting the same one.
    pre_locks: Dict[str, threading.Lock] = {}
    locks_guard = threading.Lock()

    def ensure_pretrained(kind, budget, seed):
        d = pre_dir(kind, budget, seed)
        with locks_guard:
            lock = pre_locks.setdefault(d, threading.Lock())
        with lock:
            return pretrain(kind, d, iters[budget][kind], seed, data_seed(seed))

    def ft_job(task, v, budget, i, seed):
        kind, load_mode = VARIANTS[v]
        b = budget_of(v, budget, iters)
        ckpt = None
        if kind is not None:
            pre = (kind, b, pre_seeds[i % len(pre_seeds)])
            ckpt = (os.path.join(pre_dir(*pre), "model_final.pth"), pre)
        tag = v if b == "iters" else f"{v}@flops"
        return (task, v, b, seed, ckpt, load_mode, os.path.join(out, f"ft_{task.name}_{tag}_s{seed}{data_tag}"))

    # Seed by seed, both tasks and every variant of a seed together: an experiment stopped part-way
    # (it may span sessions) leaves complete paired seeds for every claim and task.
    jobs = list(dict.fromkeys(ft_job(t, v, b, i, s) for b in options.budgets for i, s in enumerate(options.seeds)
                              for t in tasks.values() for v in options.variants))
    # Each task's schedule and recipe, read once (loading a LazyConfig takes about a second).
    ft_iters = {t.name: options.finetune_iters or t.max_iter() for t in tasks.values()}
    recipes = {(t.name, ds): saved_recipe(t.config, [*t.extra, *_data_overrides(ds)])
               for t in tasks.values() for ds in {data_seed(s) for s in options.seeds}}

    def one(job):
        task, v, b, seed, ckpt, load_mode, d = job
        if options.report_only and not os.path.exists(os.path.join(d, "model_final.pth")):
            return None
        if ckpt is not None:
            ckpt, pre = ckpt
            if not options.report_only and not os.path.exists(os.path.join(d, "model_final.pth")):
                ensure_pretrained(*pre)
        print(f"[ablation] {task.name}: fine-tuning {v} (pre-training budget {b}), seed {seed}", flush=True)
        return finetune(task, v, ckpt, load_mode, seed, ft_iters[task.name], options.evals, d, budget=b,
                        recipe=recipes[task.name, data_seed(seed)], data_seed=data_seed(seed))

    try:
        with ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
            runs = [r for r in pool.map(one, jobs) if r is not None]
    except RuntimeError as e:
        raise AblationError(str(e)) from e

    curves = {}  # the equal-iterations pre-trainings: MIM loss with and without the pyramid
    for k in kinds:
        for s in pre_seeds:
            d = pre_dir(k, "iters", s)
            if os.path.exists(os.path.join(d, "metrics.json")):
                curves.setdefault(k, {})[s] = mim_curve(d)
    table = summarise(runs, tasks, options.variants, options.budgets, iters)
    claim_rows = claims(runs, tasks, options.variants, options.budgets, iters)
    mim = mim_claim(curves)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"args": asdict(options), "flops": flops, "runs": runs, "table": table, "claims": claim_rows,
                   "mim_curves": curves, "mim_claim": mim}, f, indent=1)
    md = write_report(table, claim_rows, flops, mim, os.path.join(out, "results.md"))
    if runs:
        plot(runs, table, tasks, options.variants, options.budgets, out, iters)
    if curves:
        plot_mim(curves, flops, os.path.join(out, "mim_loss.png"))
    print(md)
    print(f"[ablation] {len(runs)} fine-tuning runs in {(time.perf_counter() - t0) / 60:.1f} min; "
          f"wrote {out}/results.md, results.json and the plots")
    return runs
