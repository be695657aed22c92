"""Scale-out on detectron2's launcher: the data stream, the masks and a real 2-process CPU run.

The end-to-end test runs ``tools/lazyconfig_train_net.py --num-gpus 2`` on the CPU (gloo,
spawned by detectron2's ``launch``) and ``--num-gpus 1`` with the same total batch, and
compares the final weights. They can only agree if (a) both see the same global batch
(``build_resumable_train_loader``: rank r takes slice r of each global batch, every sample
a function of its global position), (b) every image gets the same mask whatever rank holds
it (per-sample mask seeds), (c) DDP's gradient average equals the 1-process gradient (equal
masked-unit counts per sample make the per-rank mean losses average to the global mean), and
(d) the EMA teacher, updated inside forward from DDP-synchronised weights, stays identical.
"""
import os

import numpy as np
import pytest
import torch
from detectron2.data.common import DatasetFromList

from tests.helpers.train_cli import env_for, load_model, make_image_folder, max_abs_diff, metrics, run, train_cmd
from itpn_d2.data.resumable import (
    NoReadableImagesError,
    PositionalMapStream,
    ResumableTrainingSampler,
    build_resumable_train_loader,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _take(gen, n):
    return [next(gen) for _ in range(n)]


# --------------------------------------------------------------------------- the stream


def test_ranks_slice_the_global_batch_and_resume_continues():
    size, total, iters = 7, 4, 6
    one = ResumableTrainingSampler(size, total_batch_size=total, seed=3, rank=0, world_size=1)
    glob = _take(iter(one), total * iters)
    assert [p for p, _ in glob] == list(range(total * iters))
    # every epoch is a permutation of the dataset, and epochs differ
    idx = [i for _, i in glob]
    assert sorted(idx[:size]) == list(range(size)) and sorted(idx[size : 2 * size]) == list(range(size))
    assert idx[:size] != idx[size : 2 * size]

    ranks = [ResumableTrainingSampler(size, total_batch_size=total, seed=3, rank=r, world_size=2) for r in range(2)]
    streams = [iter(s) for s in ranks]
    rebuilt = []
    for _ in range(iters):
        for s in streams:
            rebuilt += _take(s, total // 2)
    assert rebuilt == glob, "2 ranks x 2 images must be the 1-process batch of 4, in order"

    # resuming at iteration 4 continues the same stream
    resumed = ResumableTrainingSampler(size, total_batch_size=total, seed=3, rank=0, world_size=1, start_iter=4)
    assert _take(iter(resumed), total * 2) == glob[4 * total :]
    # DataLoader workers: worker w makes local batches w, w + n, ...; round-robin restores the order
    w = [one.positions(k, 3) for k in range(3)]
    interleaved = []
    for step in range(iters):
        interleaved += _take(w[step % 3], total)
    assert interleaved == glob

    with pytest.raises(ValueError, match="multiple of the number of processes"):
        ResumableTrainingSampler(size, total_batch_size=3, rank=0, world_size=2)


def _aug_mapper(d):
    # uses numpy's, Python's and torch's global RNGs as augmentations do
    import random

    return {"i": d["i"], "np": float(np.random.rand()), "py": random.random(), "t": float(torch.rand(()))}


def test_samples_do_not_depend_on_workers_ranks_or_resume():
    data = [{"i": i} for i in range(5)]
    stream = PositionalMapStream(
        DatasetFromList(data, copy=False), _aug_mapper, ResumableTrainingSampler(5, total_batch_size=2, seed=1)
    )
    ref = [stream.map_position(p, stream.sampler.index_of(p)) for p in range(12)]
    assert len({r["mask_seed"] for r in ref}) == 12 and len({r["np"] for r in ref}) == 12
    state = np.random.get_state()[1].copy()
    again = stream.map_position(7, stream.sampler.index_of(7))
    assert again == ref[7]
    assert np.array_equal(np.random.get_state()[1], state), "the caller's global RNG is restored"

    # a real DataLoader with 2 worker processes yields the same batches as the in-process stream
    loader = build_resumable_train_loader(data, mapper=_aug_mapper, total_batch_size=2, num_workers=2, seed=1)
    it = iter(loader)
    got = [d for _ in range(6) for d in next(it)]
    del it
    assert got == ref


def test_unreadable_items_are_replaced_deterministically():
    calls = []

    def mapper(d):
        calls.append(d["i"])
        return None if d["i"] in (1, 3) else {"i": d["i"]}

    mk = lambda: PositionalMapStream(  # noqa: E731
        DatasetFromList([{"i": i} for i in range(6)], copy=False), mapper,
        ResumableTrainingSampler(6, total_batch_size=3, seed=0),
    )
    a, b = mk(), mk()
    out_a = [a.map_position(p, a.sampler.index_of(p))["i"] for p in range(18)]
    out_b = [b.map_position(p, b.sampler.index_of(p))["i"] for p in range(18)]
    assert out_a == out_b and not {1, 3} & set(out_a)
    assert {1, 3} <= set(calls)

    never = PositionalMapStream(DatasetFromList([{"i": 0}], copy=False), lambda d: None,
                                ResumableTrainingSampler(1, total_batch_size=1), max_consecutive_failures=5)
    with pytest.raises(NoReadableImagesError, match="No usable image is left"):
        never.map_position(0, 0)


def test_per_sample_masks_ignore_the_batch():
    from itpn_d2.modeling import FeaturePyramid, HiViT, ITPNBackbone
    from itpn_d2.modeling.decoder import PixelDecoder
    from itpn_d2.modeling.masking import BlockMaskGenerator, RandomMaskGenerator
    from itpn_d2.modeling.pretrainer import MaskedPretrainer

    for gen in (RandomMaskGenerator(), BlockMaskGenerator(min_block=2)):
        model = MaskedPretrainer(
            backbone=ITPNBackbone(
                net=HiViT(embed_dim=32, mlp_depths=(1, 1), depth=1, num_heads=2, pretrain_img_size=64),
                pyramid=FeaturePyramid(embed_dim=32, out_dim=16, depth=1),
            ),
            mask_generator=gen,
            pixel_decoder=PixelDecoder(in_dim=16, dec_dim=16, depth=1, num_heads=2, pretrain_img_size=64),
            pixel_mean=[0, 0, 0],
            pixel_std=[1, 1, 1],
        )
        keep_ab, mask_ab = model.make_mask_from_seeds([11, 22], (4, 4))
        keep_b, mask_b = model.make_mask_from_seeds([22], (4, 4))
        assert torch.equal(mask_ab[1:], mask_b) and torch.equal(keep_ab[1:], keep_b)
        assert not torch.equal(mask_ab[0], mask_ab[1])
        assert int(mask_ab.sum(1)[0]) == int(mask_ab.sum(1)[1]) == 12


# --------------------------------------------------------------------------- 2 processes vs 1


@pytest.mark.slow
def test_two_cpu_processes_train_like_one(tmp_path):
    """detectron2's launch with 2 CPU processes (gloo) == 1 process, same total batch of 4."""
    datasets = tmp_path / "datasets"
    folder = make_image_folder(datasets, n=10)
    with open(os.path.join(folder, "n000", "broken.png"), "wb") as f:  # skipped; counted over both ranks
        f.write(b"\x89PNG\r\n\x1a\n not really")
    env = env_for(datasets)
    common = ["train.max_iter=4", "train.checkpointer.period=100", "dataloader.train.total_batch_size=4"]
    one = run(train_cmd(tmp_path / "one", *common), env)
    assert one.returncode == 0, one.stderr[-3000:]
    url = f"file://{tmp_path / 'rendezvous'}"
    two = run(train_cmd(tmp_path / "two", *common, num_gpus=2, extra_args=["--dist-url", url]), env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "terminate called" not in two.stderr  # a rank that aborts at exit (end_process_group)
    log = (tmp_path / "two" / "log.txt").read_text()
    assert "World size: 2" in log

    a, b = load_model(tmp_path / "one" / "model_final.pth"), load_model(tmp_path / "two" / "model_final.pth")
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sorted(m1) == sorted(m2) == [0, 1, 2, 3]
    assert m1[3]["lr"] > 0, "the weights must actually move for the comparison to mean anything"
    for it in range(4):  # metrics are averaged over ranks by detectron2: the same global batch
        assert m2[it]["total_loss"] == pytest.approx(m1[it]["total_loss"], rel=1e-4), it
        assert m2[it]["loss_mim"] == pytest.approx(m1[it]["loss_mim"], rel=1e-4), it
        assert m2[it]["skipped_images"] == m1[it]["skipped_images"], it  # summed over the 2 ranks
    assert sum(m1[it]["skipped_images"] for it in m1) >= 1
    diff = max_abs_diff(a, b)
    assert diff < 1e-5, f"2-process weights differ from 1-process ones by {diff}"
    teacher = [k for k in a if k.startswith("teacher.model.")]
    assert teacher and all(torch.allclose(a[k], b[k], atol=1e-5) for k in teacher)


def test_a_finished_run_tears_its_process_group_down(tmp_path, monkeypatch):
    """Left to the interpreter's exit, gloo's threads once aborted a finished rank; every process
    of a run now destroys its group when the run returns, and a run without one is untouched."""
    import torch.distributed as dist

    from itpn_d2.engine import lazyconfig_run

    ran = []
    monkeypatch.setattr(lazyconfig_run, "run", lambda args: ran.append(args))
    lazyconfig_run.guarded_run("no group")
    assert ran == ["no group"] and not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", world_size=1, rank=0)
    try:
        lazyconfig_run.guarded_run("one rank")
        assert ran == ["no group", "one rank"]
        assert not dist.is_initialized(), "the run's process group outlives it"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_cpu_processes_share_the_cores(monkeypatch):
    import torch
    from detectron2.utils import comm

    from itpn_d2.engine import distributed

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(comm, "get_local_size", lambda: 2)
        monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
        assert distributed.share_cpu_threads("cpu") == 3 and torch.get_num_threads() == 3
        torch.set_num_threads(5)
        assert distributed.share_cpu_threads("cuda") == 5  # GPU processes: untouched
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        assert distributed.share_cpu_threads("cpu") == 5  # the user's setting wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(comm, "get_local_size", lambda: 1)
        assert distributed.share_cpu_threads("cpu") == 5  # one process keeps every core
    finally:
        torch.set_num_threads(before)
