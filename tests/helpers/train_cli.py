"""Helpers for the tests that run ``tools/lazyconfig_train_net.py`` as a user does (subprocesses)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
SCRIPT = os.path.join(ROOT, "tools", "lazyconfig_train_net.py")
PAUSED_WRITE = os.path.join(ROOT, "tests", "helpers", "paused_checkpoint_write.py")
PRETRAIN_CFG = os.path.join(ROOT, "configs", "pretrain", "mim_mfm_itpn_tiny_cpu.py")
IMG = 64

# The tiny MIM + MFM config at 64 px, 2 attention blocks, no workers: a step takes ~0.1 s on one core.
TINY_OVERRIDES = [
    "dataloader.train.dataset.names=imagenet_train_unlabeled",
    f"dataloader.train.mapper.image_size={IMG}",
    "dataloader.train.num_workers=0",
    f"model.backbone.net.pretrain_img_size={IMG}",
    f"model.mfm_decoder.pretrain_img_size={IMG}",
    "model.backbone.net.depth=2",
    "train.seed=0",
    "train.log_period=1",
]


def make_image_folder(datasets_root, n: int = 12, seed: int = 0) -> str:
    """``$DETECTRON2_DATASETS/imagenet/train`` with ``n`` small smooth RGB PNGs of varied sizes."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(str(datasets_root), "imagenet", "train", "n000")
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        low = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        im = Image.fromarray(low).resize((72 + 4 * (i % 3), 80 - 4 * (i % 2)), Image.BILINEAR)
        im.save(os.path.join(folder, f"img{i:03d}.png"))
    return os.path.join(str(datasets_root), "imagenet", "train")


def env_for(datasets_root, **extra) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        DETECTRON2_DATASETS=str(datasets_root),
        OMP_NUM_THREADS="1",  # one intra-op thread per process: the machine has 2 shared cores
        MKL_NUM_THREADS="1",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_cmd(out_dir, *opts: str, num_gpus: int = 1, resume: bool = False, extra_args=()) -> List[str]:
    cmd = [sys.executable, SCRIPT, "--config-file", PRETRAIN_CFG, "--num-gpus", str(num_gpus), *extra_args]
    if resume:
        cmd.append("--resume")
    return cmd + [*TINY_OVERRIDES, f"train.output_dir={out_dir}", *opts]


def paused_write(cmd: List[str], name: str, marker) -> List[str]:
    """``cmd`` (``python SCRIPT ARGS...``) run so that the write of checkpoint ``name`` (e.g.
    ``model_0000005``) stops half-way and creates ``marker``: tests/helpers/paused_checkpoint_write.py."""
    return [cmd[0], PAUSED_WRITE, name, str(marker), *cmd[1:]]


def run(cmd, env, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def start(cmd, env, log_path) -> subprocess.Popen:
    """Start in its own session, so that the whole group (DataLoader workers included) can be killed."""
    log = open(log_path, "w")
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180, what: str = "") -> None:
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the training process exited (code {proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            kill_group(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metrics(out_dir) -> Dict[int, dict]:
    """iteration -> the last metrics.json record for it (a resumed run appends to the file)."""
    path = os.path.join(str(out_dir), "metrics.json")
    out = {}
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by SIGKILL
                continue
            if "iteration" in rec:
                out[rec["iteration"]] = rec
    return out


def last_iteration(out_dir) -> int:
    m = metrics(out_dir)
    return max(m) if m else -1


def load_model(path) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def max_abs_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def hash_tree(root, skip=()) -> Dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (names in ``skip`` left out)."""
    out = {}
    for d, _, files in os.walk(str(root)):
        for f in files:
            p = os.path.join(d, f)
            rel = os.path.relpath(p, str(root))
            if rel in skip or f in skip:
                continue
            with open(p, "rb") as fh:
                out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def checkpoint_state(out_dir) -> Dict[str, str]:
    """Hashes of what must never change: the checkpoints and last_checkpoint."""
    return {k: v for k, v in hash_tree(out_dir).items() if k.endswith(".pth") or k == "last_checkpoint"}


def error_line(stderr: str) -> Optional[str]:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("ERROR: ")]
    return lines[-1] if lines else None
