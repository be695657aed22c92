"""What would crash, be silently wrong or crawl on CUDA and multi-node, tested on the CPU.

* a 0 in ``model.mfm_weights`` trains under DDP (2 gloo processes through the CLI);
* resume across AMP settings (a checkpoint without GradScaler state into an fp16 trainer,
  and back), with a real fp16 + GradScaler step on the CPU;
* ``train.amp.dtype`` honoured on CUDA (bf16 without scaler, fp16 with), the DDP
  compression hook following it, TF32 for fp32 CUDA runs;
* gradient accumulation: k steps of B images == 1 step of k*B (weights allclose), also
  with the EMA teacher (updated once per optimizer step);
* at most one device sync per training step (counted by patching the host-read methods);
* a node-local output directory refused in a multi-process run (2 gloo processes);
* the relative-position bias is contiguous, in the compute dtype, and unchanged in value;
* masks drawn in the DataLoader workers equal the model's own, and uint8 images give the
  same losses as float ones;
* keyed drop-path masks reach a CUDA device through pinned memory, without a blocking copy;
* the pre-trainer, Mask R-CNN and UPerNet each train a step under bf16 autocast (what every
  stage of ``tools/gpu_check.py`` runs on CUDA): fp32 losses near the fp32 step's, a finite fp32
  gradient for every trainable parameter, the parameters still fp32.
"""
import copy
import logging
import os

import pytest
import torch
import torch.nn as nn
from detectron2.checkpoint import Checkpointer
from detectron2.utils.events import EventStorage
from omegaconf import OmegaConf

from tests.helpers.train_cli import env_for, make_image_folder, metrics, run, train_cmd
from itpn_d2.engine.trainer import ITPNTrainer, NonFiniteLossError, TrainConfigError, amp_settings, build_trainer
from tests.helpers.models import smooth_images, tiny_pretrainer
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- helpers


class _Regression(nn.Module):
    """A model whose loss is a batch mean, as every loss here is."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        y = torch.stack([d["y"] for d in batch])
        return {"loss_mse": ((self.net(x).squeeze(1) - y) ** 2).mean(), "loss_l1": (self.net(x).squeeze(1) - y).abs().mean()}


def _samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(8, generator=g), "y": torch.randn((), generator=g)} for _ in range(n)]


def _batches(samples, b):
    return [samples[i : i + b] for i in range(0, len(samples), b)]


def _train(trainer, iters):
    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(iters):
            trainer.iter = storage.iter = it
            trainer.run_step()


def _cfg(device="cpu", enabled=False, dtype=None, **train):
    amp = {"enabled": enabled}
    if dtype is not None:
        amp["dtype"] = dtype
    return OmegaConf.create({"train": {"device": device, "amp": amp, "log_period": 1, **train}})


# --------------------------------------------------------------- 1: zero MFM weight


def test_zero_mfm_weight_freezes_only_that_levels_head():
    model = tiny_pretrainer(mim="fused", mfm=True)

    def frozen():
        return {n for n, p in model.named_parameters() if not p.requires_grad}

    before = frozen()
    model.mfm_weights = (1.0, 0.0, 1.0)
    model._freeze_zero_weight_levels(model.mfm_decoder)
    assert frozen() - before == {n for n, _ in model.named_parameters() if n.startswith(("mfm_decoder.decoder_norm.1.",
                                                                                "mfm_decoder.decoder_pred.1."))}
    model.train()
    with EventStorage(0):
        losses = model([{"image": im} for im in smooth_images(2)])
    assert "loss_mfm_p3" not in losses
    sum(losses.values()).backward()
    # every parameter DDP would wait for gets a gradient: find_unused_parameters=False is safe
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@pytest.mark.slow
def test_zero_mfm_weight_trains_with_two_ddp_processes(tmp_path):
    """Without the fix DDP fails at the second iteration: 'Expected to have finished reduction'."""
    datasets = tmp_path / "datasets"
    make_image_folder(datasets, n=8)
    url = f"file://{tmp_path / 'rendezvous'}"
    res = run(
        train_cmd(tmp_path / "out", "train.max_iter=3", "train.checkpointer.period=100",
                  "dataloader.train.total_batch_size=4", "model.mfm_weights=[1.0,0.0,1.0]",
                  num_gpus=2, extra_args=["--dist-url", url]),
        env_for(datasets),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "terminate called" not in res.stderr  # a rank that aborts at exit (end_process_group)
    m = metrics(tmp_path / "out")
    assert sorted(m) == [0, 1, 2] and "loss_mfm_p3" not in m[2] and "loss_mfm_p4" in m[2]


# ------------------------------------------------------- 2: resume across AMP settings


def _amp_trainer(scaler: bool, init_scale: float = 2.0 ** 10):
    model = _Regression()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = iter(_batches(_samples(64), 4))
    if scaler:  # fp16 autocast + GradScaler, on the CPU (the CUDA path differs by the device type only)
        return ITPNTrainer(model, loader, opt, device_type="cpu", amp_dtype=torch.float16,
                           grad_scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
    return ITPNTrainer(model, loader, opt)


@pytest.mark.parametrize("saved_with,resumed_with", [(False, True), (True, False), (True, True)])
def test_resume_across_amp_settings(tmp_path, caplog, saved_with, resumed_with):
    a = _amp_trainer(saved_with)
    _train(a, 2)
    if saved_with:
        assert a.grad_scaler.get_scale() == 2.0 ** 10  # no overflow: the scale has not moved
    Checkpointer(a.model, str(tmp_path), trainer=a).save("model_0000001")

    b = _amp_trainer(resumed_with, init_scale=3.0)  # a scale the saved state must replace
    ck = Checkpointer(b.model, str(tmp_path), trainer=b)
    with caplog.at_level(logging.INFO, logger="itpn_d2.engine.trainer"):
        ck.resume_or_load("", resume=True)  # detectron2's AMPTrainer: KeyError 'grad_scaler' for (False, True)
    assert b.iter == 1
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert b.optimizer.state_dict()["state"][0]["step"] == a.optimizer.state_dict()["state"][0]["step"]
    if resumed_with and saved_with:
        assert b.grad_scaler.get_scale() == 2.0 ** 10
    elif resumed_with:
        assert "no GradScaler state" in caplog.text and b.grad_scaler.get_scale() == 3.0
    else:
        assert "GradScaler state is not used" in caplog.text
    _train(b, 1)  # and it trains on
    assert (b.grad_scaler is not None) == ("grad_scaler" in b.state_dict())


def test_fp16_with_grad_scaler_steps_like_fp32_on_cpu():
    ref, amp = _amp_trainer(False), _amp_trainer(True)
    _train(ref, 3)
    _train(amp, 3)
    moved = max((p0 - p1).abs().max().item() for p0, p1 in zip(_Regression().parameters(), amp.model.parameters()))
    assert moved > 1e-3
    for pa, pb in zip(ref.model.parameters(), amp.model.parameters()):
        assert torch.allclose(pa, pb, atol=5e-3), (pa - pb).abs().max()


# -------------------------------------------------------- 4: amp dtype honoured on CUDA


def test_amp_dtype_is_honoured_on_cuda_and_cpu():
    assert amp_settings(_cfg("cuda", True)) == ("cuda", torch.float16, True)  # detectron2's default
    assert amp_settings(_cfg("cuda", True, "bfloat16")) == ("cuda", torch.bfloat16, False)
    assert amp_settings(_cfg("cuda", True, "float16")) == ("cuda", torch.float16, True)
    assert amp_settings(_cfg("cpu", True)) == ("cpu", torch.bfloat16, False)
    assert amp_settings(_cfg("cuda", False, "bfloat16")) == ("cuda", None, False)
    with pytest.raises(TrainConfigError, match="train.amp.dtype"):
        amp_settings(_cfg("cuda", True, "float8"))


def test_build_trainer_follows_the_amp_dtype(monkeypatch):
    model = _Regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = build_trainer(_cfg("cuda", True, "bfloat16"), model, [], opt)
    assert t.amp_dtype == torch.bfloat16 and t.grad_scaler is None and t.device_type == "cuda"
    with pytest.warns(UserWarning):  # no CUDA here: torch disables the scaler, but one is built
        t = build_trainer(_cfg("cuda", True, "float16"), model, [], opt)
    assert t.amp_dtype == torch.float16 and isinstance(t.grad_scaler, torch.amp.GradScaler)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        build_trainer(_cfg("cuda", False), model, [], opt)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        build_trainer(_cfg("cuda", False, tf32=False), model, [], opt)
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(TrainConfigError, match="train.grad_accum_steps"):
            build_trainer(_cfg(grad_accum_steps=bad), model, [], opt)


def test_ddp_compression_hook_follows_the_amp_dtype():
    from torch.distributed.algorithms.ddp_comm_hooks import default as hooks

    from itpn_d2.engine.distributed import compression_hook

    assert compression_hook(False, torch.bfloat16) is None
    assert compression_hook(True, None) is hooks.fp16_compress_hook
    assert compression_hook(True, torch.float16) is hooks.fp16_compress_hook
    assert compression_hook(True, torch.bfloat16) is hooks.bf16_compress_hook


# ------------------------------------------------------------ gradient accumulation


@pytest.mark.parametrize("k", [2, 4])
def test_grad_accumulation_equals_the_larger_batch(k):
    samples = _samples(8 * 3)
    big, small = _Regression(), _Regression()
    t_big = ITPNTrainer(big, iter(_batches(samples, 8)), torch.optim.AdamW(big.parameters(), lr=1e-2))
    t_small = ITPNTrainer(small, iter(_batches(samples, 8 // k)), torch.optim.AdamW(small.parameters(), lr=1e-2),
                          grad_accum_steps=k)
    _train(t_big, 3)
    _train(t_small, 3)
    moved = max((p0 - p1).abs().max().item() for p0, p1 in zip(_Regression().parameters(), big.parameters()))
    assert moved > 1e-2
    for pa, pb in zip(big.parameters(), small.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6, rtol=1e-5), (pa - pb).abs().max()
    # one k-th of the loader per micro-step, the logged losses are the large batch's
    h_big, h_small = t_big.storage.history("loss_mse"), t_small.storage.history("loss_mse")
    assert h_small.latest() == pytest.approx(h_big.latest(), rel=1e-5)


def test_grad_accumulation_with_the_pretrainer_and_ema_teacher():
    """MIM + MFM with an EMA teacher: the teacher moves once per optimizer step, not per batch.

    With per-token target normalisation: the default "batch_token" standardises MFM targets over
    the images of each forward pass, so k accumulated batches normalise over B images each, not
    over k*B (as BatchNorm under accumulation); docs/distributed.md says so."""
    images = smooth_images(8, seed=3).round().to(torch.uint8)
    samples = [{"image": im, "mask_seed": 100 + i} for i, im in enumerate(images)]
    big = tiny_pretrainer(mim="fused", mfm=True, momentum=0.9)
    big.mfm_target_norm = "token"
    small = copy.deepcopy(big)

    def opt(m):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

    t_big = ITPNTrainer(big, iter(_batches(samples, 4) * 2), opt(big))
    t_small = ITPNTrainer(small, iter(_batches(samples, 2) * 2), opt(small), grad_accum_steps=2)
    _train(t_big, 2)
    _train(t_small, 2)
    sb, ss = big.state_dict(), small.state_dict()
    assert any(not torch.equal(sb[n], v) for n, v in tiny_pretrainer(mim="fused", mfm=True).state_dict().items()
               if n.startswith("teacher."))
    # atol 1e-5: AdamW divides by the root of each gradient's second moment, so float rounding in a
    # near-zero gradient comes out in the update (up to 3.6e-6 in the prediction layers on an Intel
    # Xeon, under 2e-6 on an AMD EPYC); a teacher moved per batch instead of per step would be ~1e-4 off.
    for n in sb:
        assert torch.allclose(sb[n], ss[n], atol=1e-5, rtol=1e-4), (n, (sb[n] - ss[n]).abs().max())


# ------------------------------------------------------------------ 9: device syncs


class _SyncCounter:
    """Counts the calls that read a tensor's value on the host (each one a device sync on CUDA)."""

    METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.METHODS:
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, orig))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: self.calls.append("cuda.synchronize"))
        self.active = False

    def _wrap(self, name, orig):
        def f(t, *a, **k):
            if self.active:
                self.calls.append(name)
            return orig(t, *a, **k)

        return f


@pytest.mark.parametrize("mfm", [False, True])
def test_at_most_one_sync_per_training_step(monkeypatch, mfm):
    model = tiny_pretrainer(mim="fused", mfm=mfm)
    # as the loader delivers them: uint8 images and masks drawn in the workers
    from itpn_d2.modeling.masking import mask_from_seed

    data = []
    for it in range(4):
        batch = []
        for i, im in enumerate(smooth_images(2, seed=it).round().to(torch.uint8)):
            keep, mask = mask_from_seed(model.mask_generator, (4, 4), model.mask_ratio, 10 * it + i)
            batch.append({"image": im, "ids_keep": keep, "mask": mask, "skipped_images": 1})
        data.append(batch)
    trainer = ITPNTrainer(model, iter(data), torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True),
                          gather_metric_period=4)
    counter = _SyncCounter(monkeypatch)
    per_step = []
    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(3):  # no metrics gathered in these steps (period 4)
            trainer.iter = storage.iter = it
            counter.calls.clear()
            counter.active = True
            trainer.run_step()
            counter.active = False
            per_step.append(list(counter.calls))
    assert all(calls == ["tolist"] for calls in per_step), per_step  # the finite check's one transfer
    assert storage.history("mask_ratio").latest() == pytest.approx(0.75)


def test_the_one_sync_still_stops_a_non_finite_loss():
    model = _Regression()
    data = _samples(8)
    data[5]["y"] = torch.tensor(float("nan"))
    trainer = ITPNTrainer(model, iter(_batches(data, 4)), torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    _train(trainer, 1)
    moved = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"loss term 'loss_mse' is nan.*iteration 1"):
        with EventStorage(1) as storage:
            trainer.storage = storage
            trainer.iter = 1
            trainer.run_step()
    assert all(torch.equal(a, b) for a, b in zip(moved, model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before, moved))


# ------------------------------------------------------ 6: node-local output directory


def _check_dir_worker(rank, world, init_file, dirs, results):
    import torch.distributed as dist
    from detectron2.utils import comm

    from itpn_d2.engine.distributed import OutputDirNotSharedError, check_shared_output_dir

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    comm.create_local_process_group(world)
    try:
        check_shared_output_dir(dirs[rank])
        results.put((rank, "ok"))
    except OutputDirNotSharedError as e:
        results.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shared", [True, False])
def test_node_local_output_dir_is_refused(tmp_path, shared):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    dirs = [str(tmp_path / "out")] * 2 if shared else [str(tmp_path / "node0"), str(tmp_path / "node1")]
    mp.start_processes(_check_dir_worker, args=(2, str(tmp_path / "init"), dirs, results), nprocs=2,
                       start_method="spawn")
    out = dict(results.get(timeout=60) for _ in range(2))
    if shared:
        assert out == {0: "ok", 1: "ok"}
        assert os.listdir(dirs[0]) == []  # the token is removed
    else:
        for msg in out.values():
            assert "is not shared by all processes: rank 1 on" in msg and "train.output_dir" in msg


# -------------------------------------------------------------- 10: rel-pos bias


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_rel_pos_bias_is_contiguous_in_the_compute_dtype(batched, grid):
    from itpn_d2.modeling.layers import Attention
    from itpn_d2.modeling.layers import relative_position_index as _relative_index

    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4, rel_pos_grid=(4, 4))
    idx = _relative_index(*grid)
    if batched:
        keep = torch.stack([torch.randperm(idx.shape[0])[:7].sort().values for _ in range(3)])
        idx = idx[keep[:, :, None], keep[:, None, :]]
    bias = attn.rel_pos_bias(idx, grid)
    L = idx.shape[-1]
    assert bias.shape == ((3,) if batched else ()) + (4, L, L) and bias.is_contiguous()
    # the former construction, for the values
    table = attn.relative_position_bias_table
    if grid != (4, 4):
        t = table.T.reshape(1, 4, 7, 7)
        t = torch.nn.functional.interpolate(t, size=(2 * grid[0] - 1, 2 * grid[1] - 1), mode="bicubic",
                                            align_corners=False)
        table = t.reshape(4, -1).T
    assert torch.equal(bias, table[idx].movedim(-1, -3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn.rel_pos_bias(idx, grid)
    assert low.dtype == torch.bfloat16 and low.is_contiguous()
    assert torch.equal(low, bias.to(torch.bfloat16))
    low.float().sum().backward()  # gradients still reach the table
    assert attn.relative_position_bias_table.grad is not None


# -------------------------------------------------------- 3/8: the data path


def test_masks_from_the_workers_equal_the_models_and_uint8_equals_float():
    from itpn_d2.modeling.masking import mask_from_seed

    model = tiny_pretrainer(mim="fused", mfm=False).train()
    images = smooth_images(3, seed=1).round()
    seeds = [5, 6, 7]
    with_seeds = [{"image": im, "mask_seed": s} for im, s in zip(images, seeds)]
    in_worker = []
    for im, s in zip(images.to(torch.uint8), seeds):
        keep, mask = mask_from_seed(model.mask_generator, (4, 4), model.mask_ratio, s)
        in_worker.append({"image": im, "ids_keep": keep, "mask": mask})
    ka, ma = model.masks_of(with_seeds, (4, 4))
    kb, mb = model.masks_of(in_worker, (4, 4))
    assert torch.equal(ka, kb) and torch.equal(ma, mb)
    with EventStorage(0):
        torch.manual_seed(0)
        a = model(with_seeds)
        torch.manual_seed(0)
        b = model(in_worker)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = [dict(d, mask=d["mask"][:8]) for d in in_worker]
    with pytest.raises(ValueError, match="mask unit"):
        model.masks_of(bad, (4, 4))


def test_loader_workers_attach_the_models_masks(tmp_path):
    from detectron2.data.common import DatasetFromList

    from itpn_d2.data.resumable import attach_mask_generator, build_resumable_train_loader

    model = tiny_pretrainer(mim="fused", mfm=False)
    data = [{"image": torch.full((3, 64, 64), i, dtype=torch.uint8)} for i in range(6)]
    loader = build_resumable_train_loader(DatasetFromList(data, copy=True), total_batch_size=3, num_workers=1)
    assert attach_mask_generator(loader, model.mask_generator, model.mask_ratio, model.unit_size)
    batch = next(iter(loader))
    keep, mask = model.make_mask_from_seeds([d["mask_seed"] for d in batch], (4, 4))
    assert torch.equal(torch.stack([d["ids_keep"] for d in batch]), keep)
    assert torch.equal(torch.stack([d["mask"] for d in batch]), mask)
    assert not attach_mask_generator([], model.mask_generator, 0.75, 16)


@pytest.mark.slow
def test_grad_accumulation_through_the_cli_and_resume(tmp_path):
    """train.grad_accum_steps=2 at 2 images == 4 images per step (same stream positions), and a
    resumed accumulating run continues the stream where it stopped (iteration * k batches)."""
    from tests.helpers.train_cli import load_model, max_abs_diff

    datasets = tmp_path / "datasets"
    make_image_folder(datasets, n=10)
    env = env_for(datasets)
    # per-token MFM target normalisation: "batch_token" normalises over each accumulated batch
    common = ["train.checkpointer.period=2", "train.max_iter=4", "model.mfm_target_norm=token"]
    big = run(train_cmd(tmp_path / "big", *common, "dataloader.train.total_batch_size=4"), env)
    assert big.returncode == 0, big.stderr[-3000:]
    acc = [*common, "dataloader.train.total_batch_size=2", "train.grad_accum_steps=2"]
    full = run(train_cmd(tmp_path / "acc", *acc), env)
    assert full.returncode == 0, full.stderr[-3000:]
    m_big, m_acc = metrics(tmp_path / "big"), metrics(tmp_path / "acc")
    assert m_big[3]["lr"] > 0
    for it in range(4):
        assert m_acc[it]["total_loss"] == pytest.approx(m_big[it]["total_loss"], rel=1e-4), it
    w_big = load_model(tmp_path / "big" / "model_final.pth")
    assert max_abs_diff(w_big, load_model(tmp_path / "acc" / "model_final.pth")) < 1e-5

    # resume the accumulating run from its iteration-1 checkpoint: iterations 2, 3 again
    (tmp_path / "acc" / "model_final.pth").unlink()
    (tmp_path / "acc" / "last_checkpoint").write_text("model_0000001.pth")
    rest = run(train_cmd(tmp_path / "acc", *acc, resume=True), env)
    assert rest.returncode == 0, rest.stderr[-3000:]
    log = (tmp_path / "acc" / "log.txt").read_text()
    assert "Training data continues at iteration 2 of its deterministic stream (batch 4: 2 batches" in log
    diff = max_abs_diff(w_big, load_model(tmp_path / "acc" / "model_final.pth"))
    assert diff < 1e-5, diff


# ------------------------------------------------------------------ 7: the benchmark


def test_benchmark_flops_leave_out_recomputation():
    from itpn_d2.benchmark import train_step as bench
    from itpn_d2.utils.flops import count_flops

    model = tiny_pretrainer(mim="fused", mfm=False).train()
    data = bench.loader_inputs(model, smooth_images(2).round().to(torch.uint8))
    assert all("ids_keep" in d and d["image"].dtype == torch.uint8 for d in data)

    def step():
        torch.manual_seed(0)
        with EventStorage(0):
            sum(model(data).values()).backward()

    plain = count_flops(step)
    model.backbone.net.use_act_checkpoint = True
    assert count_flops(step) > plain  # the recomputed forward is counted by the flop counter
    assert bench.model_flops(step, model) == plain
    assert model.backbone.net.use_act_checkpoint  # restored


@pytest.mark.slow
def test_benchmark_loop_runs_the_training_path():
    import subprocess
    import sys

    root = REPO_ROOT
    cmd = [sys.executable, os.path.join(root, "tools", "benchmark.py"), "--what", "loop",
           "--config", "configs/pretrain/mim_mfm_itpn_tiny_cpu.py", "--img", "64", "--batch", "4",
           "--dtypes", "fp32", "--warmup", "1", "--reps", "2", "--workers", "1", "--loop-images", "8"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=dict(os.environ, PYTHONPATH=root),
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "masks drawn in the DataLoader workers" in r.stdout and "ITPNTrainer" in r.stdout, r.stdout
    assert "[loop] fp32:" in r.stdout and "img/s" in r.stdout, r.stdout


# --------------------------------------------------------------------- 11: compile


def test_reconstruction_hook_compiles_nothing(tmp_path):
    """The visualiser runs on the main process alone: it must not compile eval-mode graphs
    there while the other ranks wait in their next all-reduce."""
    from PIL import Image
    from torch._dynamo.testing import CompileCounter

    from itpn_d2.engine.compile import compile_modules
    from itpn_d2.engine.hooks import ReconstructionVisualizer

    torch._dynamo.reset()
    try:
        model = tiny_pretrainer(mim="fused", mfm=False).train()
        counter = CompileCounter()
        compile_modules(model, backend=counter)
        with EventStorage(0):
            sum(model([{"image": im, "mask_seed": i} for i, im in enumerate(smooth_images(2))]).values()).backward()
        frames = counter.frame_count
        assert frames > 0
        files = []
        for i, im in enumerate(smooth_images(2, seed=4)):
            files.append(str(tmp_path / f"{i}.png"))
            Image.fromarray(im.permute(1, 2, 0).round().to(torch.uint8).numpy()).save(files[-1])
        hook = ReconstructionVisualizer(1, str(tmp_path / "run"), file_names=files, num_images=2, image_size=64)
        figure = hook.render(model)
        assert figure.ndim == 3 and counter.frame_count == frames
    finally:
        torch._dynamo.reset()


def test_detector_compiles_dynamic_and_stops_recompiling(repo_root):
    from torch._dynamo.testing import CompileCounter

    from itpn_d2.engine.compile import maybe_compile
    from tests.helpers.models import mask_rcnn_sample, tiny_mask_rcnn

    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        model = tiny_mask_rcnn(repo_root).train()
        counter = CompileCounter()
        maybe_compile(model, {"enabled": True, "options": {"backend": counter}})
        assert model.backbone.net._compiled_call_impl is not None
        frames = []
        for i, (h, w) in enumerate([(128, 160), (112, 128), (144, 176)]):
            with EventStorage(i):
                sum(model([mask_rcnn_sample(h, w)]).values()).backward()
            frames.append(counter.frame_count)
        assert frames[2] == frames[1], frames  # the third size compiles nothing new
        pre = tiny_pretrainer(mim="fused", mfm=False)
        seen = {}
        import itpn_d2.engine.compile as compile_mod

        orig = compile_mod.compile_modules
        try:
            compile_mod.compile_modules = lambda m, mods, **o: seen.update(o) or ["x"]
            maybe_compile(pre, {"enabled": True})
            assert seen.get("dynamic") is None  # fixed-size pre-training crops: dynamo's default
            maybe_compile(model, {"enabled": True})
            assert seen.get("dynamic") is True
        finally:
            compile_mod.compile_modules = orig
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_grad_accumulation_with_two_ddp_processes(tmp_path):
    """2 processes x 2 images x 2 accumulated batches (DDP's no_sync on the first) == 1 process
    x 8 images: the same global samples per optimizer step, the same weights."""
    from tests.helpers.train_cli import load_model, max_abs_diff

    datasets = tmp_path / "datasets"
    make_image_folder(datasets, n=10)
    env = env_for(datasets)
    one = run(train_cmd(tmp_path / "one", "train.max_iter=3", "train.checkpointer.period=100",
                        "dataloader.train.total_batch_size=8", "model.mfm_target_norm=token"), env)
    assert one.returncode == 0, one.stderr[-3000:]
    url = f"file://{tmp_path / 'rendezvous'}"
    two = run(train_cmd(tmp_path / "two", "train.max_iter=3", "train.checkpointer.period=100",
                        "dataloader.train.total_batch_size=4", "train.grad_accum_steps=2",
                        "model.mfm_target_norm=token", num_gpus=2, extra_args=["--dist-url", url]), env)
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert m1[2]["lr"] > 0
    for it in range(3):
        assert m2[it]["total_loss"] == pytest.approx(m1[it]["total_loss"], rel=1e-4), it
    diff = max_abs_diff(load_model(tmp_path / "one" / "model_final.pth"), load_model(tmp_path / "two" / "model_final.pth"))
    assert diff < 1e-5, diff


def test_losses_are_gathered_every_log_period_and_at_the_end():
    model = _Regression()
    trainer = ITPNTrainer(model, iter(_batches(_samples(40), 4)), torch.optim.SGD(model.parameters(), lr=0.1),
                          gather_metric_period=4)
    trainer.max_iter = 7
    _train(trainer, 7)
    logged = [it for _, it in trainer.storage.history("loss_mse").values()]
    assert logged == [3, 6]  # iteration 3 (period) and 6 (the last), none in between


# ------------------------------------------------------------ bf16 autocast steps


def _bf16_models():
    from tests.helpers.models import mask_rcnn_sample, tiny_mask_rcnn
    from tests.modeling.test_uper import _inputs, build_tiny

    def pretrainer():
        images = smooth_images(2, seed=3).round()
        return tiny_pretrainer(mim="fused", mfm=True), [{"image": im, "mask_seed": s} for s, im in enumerate(images)]

    def mask_rcnn():
        torch.manual_seed(0)
        samples = [mask_rcnn_sample(128, 128), mask_rcnn_sample(128, 128)]
        return tiny_mask_rcnn(REPO_ROOT), samples

    def uper():
        return build_tiny(drop_path_rate=0.0), _inputs()

    return {"pretrainer": pretrainer, "mask_rcnn": mask_rcnn, "uper": uper}


# Losses whose value a bf16 step must reproduce: all but the ROI heads', whose proposals come from
# the top-k of near-equal objectness logits at initialisation, so bf16 rounding picks other ones.
_COMPARED = {"mask_rcnn": ("loss_rpn_cls", "loss_rpn_loc")}


@pytest.mark.parametrize("name", ["pretrainer", "mask_rcnn", "uper"])
def test_models_train_a_step_under_bf16_autocast(name):
    """bf16 autocast is what the GPU check trains in; a dtype mix-up (an fp32 buffer written into
    with bf16 values, a custom op without an autocast rule) would only show there. CPU autocast
    runs the same Python with its own op lists, so this catches the mix-ups of our code."""
    model, batch = _bf16_models()[name]()
    model.train()

    def step(dtype):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same proposal sampling in both steps
        with EventStorage(0), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            losses = model(batch)
        sum(losses.values()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return losses, grads

    ref, _ = step(None)
    linear_out = []  # autocast really on: the backbone's matmuls give bf16
    hooks = [m.register_forward_hook(lambda m, i, o: linear_out.append(o.dtype))
             for m in model.modules() if isinstance(m, nn.Linear)]
    low, grads = step(torch.bfloat16)
    for h in hooks:
        h.remove()
    assert linear_out and set(linear_out) == {torch.bfloat16}, set(linear_out)
    assert set(low) == set(ref)
    for k, v in low.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), (k, v)
    for k in _COMPARED.get(name, ref):
        # bf16 keeps 8 bits of mantissa; a loss off by more than a few percent is a wrong path
        assert float(low[k]) == pytest.approx(float(ref[k]), rel=0.05, abs=0.02), k
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient under bf16 autocast: {missing[:5]}"
    bad = [n for n, g in grads.items() if g.dtype != torch.float32 or not torch.isfinite(g).all()]
    assert not bad, f"non-fp32 or non-finite gradients under bf16 autocast: {bad[:5]}"
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ------------------------------------------------------------ drop-path masks on CUDA


def test_keyed_drop_path_masks_reach_cuda_through_pinned_memory(monkeypatch):
    """With a step key (every real training run) each DropPath builds its mask on the host. A
    blocking copy from pageable memory to CUDA waits for the GPU: one sync per DropPath per step.
    Faked on the CPU: ``pin_memory`` marks the tensor, ``.to("cuda")`` records how it was asked."""
    from itpn_d2.modeling.drop_path import DropPath, DropPathStep, set_drop_path_step

    copies = []
    real_to = torch.Tensor.to

    def fake_pin(self):
        out = self.clone()
        out._pinned = True
        return out

    def fake_to(self, *args, **kwargs):
        dev = kwargs.get("device", args[0] if args and not isinstance(args[0], torch.dtype) else None)
        if dev is None or torch.device(dev).type != "cuda":
            return real_to(self, *args, **kwargs)
        if not getattr(self, "_on_cuda", False):  # a host-to-device copy
            copies.append((getattr(self, "_pinned", False), kwargs.get("non_blocking", False)))
        out = real_to(self, dtype=kwargs["dtype"]) if "dtype" in kwargs else self.clone()
        out._on_cuda = True
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    dp = DropPath(0.5, layer_id=3)
    set_drop_path_step(DropPathStep(seed=1, iteration=2, rank=0))
    try:
        mask = dp.keep_mask(16, torch.device("cuda"), torch.bfloat16)
        on_cpu = dp.keep_mask(16, torch.device("cpu"), torch.bfloat16)
    finally:
        set_drop_path_step(None)
    assert copies == [(True, True)], copies  # one copy, from pinned memory, asynchronous
    assert mask.dtype == torch.bfloat16 and getattr(mask, "_on_cuda", False)
    assert torch.equal(mask, on_cpu) and 0 < int(on_cpu.sum()) < 16  # the same decisions
