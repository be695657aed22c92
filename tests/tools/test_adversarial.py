"""Adversarial checks of the checkpoint and command-line paths, as an attacker or a new user
would try them: crafted pickles under every extension through every entry point, corrupt /
mis-typed / non-finite checkpoints, a kill while ``model_final.pth`` is written, two runs on
one output directory, bad config values and typos, configs that register datasets."""
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.train_cli import (
    ROOT,
    TINY_OVERRIDES,
    error_line,
    env_for,
    kill_group,
    load_model,
    make_image_folder,
    paused_write,
    run,
    start,
    train_cmd,
    wait_for,
)
from itpn_d2.checkpoint import (
    CheckpointFileError,
    CheckpointIntegrityError,
    CheckpointWriteError,
    ITPNCheckpointer,
    NonFiniteWeightsError,
    atomic_write,
    last_finite_checkpoint,
    load_checkpoint_file,
)
from itpn_d2.config.overrides import ConfigOverrideError, ConfigValueError, apply_overrides, validate_config
from itpn_d2.engine.run_lock import OutputDirLock, OutputDirLockedError

DET_TINY = os.path.join(ROOT, "configs", "COCO", "mask_rcnn_itpn_tiny_demo.py")


class _RunsCode:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path, marker, how: str):
    payload = {"model": {"w": _RunsCode(marker)}, "__author__": "x"}
    if how == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    elif how == "torch":
        torch.save(payload, path)
    else:  # torch's pre-1.6 (non-zip) format
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    return str(path)


@pytest.mark.parametrize("ext", [".pkl", ".pth", ".pyth", ".bin", ""])
@pytest.mark.parametrize("how", ["pickle", "torch", "legacy"])
def test_crafted_pickle_never_runs_under_any_name(tmp_path, ext, how):
    marker = tmp_path / "PWNED"
    path = _crafted(tmp_path / f"evil{ext}", marker, how)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointFileError) as e:
        ITPNCheckpointer(model).load(path)
    assert path in str(e.value)
    with pytest.raises(CheckpointFileError):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_detectron2_model_zoo_pickles_still_load(tmp_path):
    """The safe reader still takes what detectron2's .pkl branch was for: dicts of numpy arrays
    (model-zoo layout with ``__author__``, and Caffe2 ``blobs``)."""
    model = torch.nn.Linear(3, 2)
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    zoo = tmp_path / "zoo.pkl"
    with open(zoo, "wb") as f:
        pickle.dump({"model": {"weight": w, "bias": np.ones(2, np.float32)}, "__author__": "d2"}, f, protocol=2)
    ITPNCheckpointer(model).load(str(zoo))
    assert torch.equal(model.weight, torch.from_numpy(w))
    caffe = tmp_path / "c2.pkl"
    with open(caffe, "wb") as f:
        pickle.dump({"blobs": {"weight": w * 2, "bias": np.zeros(2, np.float32), "weight_momentum": w}}, f)
    data = ITPNCheckpointer(model)._load_file(str(caffe))
    assert data["__author__"] == "Caffe2" and "weight_momentum" not in data["model"]


@pytest.mark.slow
def test_crafted_pickle_through_every_entry_point(tmp_path):
    """train.init_checkpoint, --eval-only, --resume (last_checkpoint naming a .pkl), tools/demo.py,
    tools/visualize_reconstruction.py: refused, one ERROR line naming the file, nothing run."""
    datasets = tmp_path / "data"
    images = os.path.join(make_image_folder(datasets, n=4), "n000")
    env = env_for(datasets)
    marker = tmp_path / "PWNED"
    evil = _crafted(tmp_path / "evil.pkl", marker, "pickle")

    r = run(train_cmd(tmp_path / "a", f"train.init_checkpoint={evil}", "train.max_iter=2"), env)
    assert r.returncode == 1 and evil in (error_line(r.stderr) or ""), r.stderr[-2000:]
    r = run(train_cmd(tmp_path / "b", f"train.init_checkpoint={evil}", extra_args=["--eval-only"]), env)
    assert r.returncode == 1 and evil in (error_line(r.stderr) or ""), r.stderr[-2000:]
    resume_dir = tmp_path / "c"
    resume_dir.mkdir()
    shutil.copy(evil, resume_dir / "model_0000001.pkl")
    (resume_dir / "last_checkpoint").write_text("model_0000001.pkl")
    r = run(train_cmd(resume_dir, "train.max_iter=4", resume=True), env)
    assert r.returncode == 1 and "model_0000001.pkl" in (error_line(r.stderr) or ""), r.stderr[-2000:]

    r = subprocess.run(
        [sys.executable, "tools/demo.py", "--config-file", DET_TINY, "--input", images,
         "--opts", f"train.init_checkpoint={evil}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 1 and evil in (error_line(r.stderr) or ""), r.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "tools/visualize_reconstruction.py", "--config-file",
         os.path.join(ROOT, "configs", "pretrain", "mim_mfm_itpn_tiny_cpu.py"), "--checkpoint", evil,
         "--input", images, "--output", str(tmp_path / "vis")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 1 and evil in (error_line(r.stderr) or ""), r.stderr[-2000:]
    assert not marker.exists()


def _saved_linear(path, **kw):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 3))
    sd = model.state_dict()
    sd.update(kw)
    torch.save({"model": sd}, path)
    return model


def test_bit_flips_inside_a_tensor_are_detected(tmp_path):
    path = tmp_path / "m.pth"
    model = _saved_linear(path)
    raw = bytearray(path.read_bytes())
    data = model.state_dict()["0.weight"].numpy().tobytes()  # stored uncompressed: find it by content
    offset = raw.find(data[:64])
    assert offset > 0
    for i in range(64):
        raw[offset + 100 + i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointIntegrityError, match="CRC-32"):
        ITPNCheckpointer(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 3))).load(str(path))


def test_integer_and_non_finite_weights_are_refused_with_their_names(tmp_path):
    target = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 3))
    as_int = tmp_path / "int.pth"
    src = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 3)).state_dict()
    torch.save({"model": {k: (v * 100).long() for k, v in src.items()}}, as_int)
    with pytest.raises(CheckpointIntegrityError, match=r"0\.weight \(torch\.int64 in the file"):
        ITPNCheckpointer(target).load(str(as_int))
    nan = tmp_path / "nan.pth"
    bad = dict(src)
    bad["1.bias"] = torch.tensor([0.0, float("nan"), 1.0])
    torch.save({"model": bad}, nan)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointIntegrityError, match=r"NaN / inf values in 1\.bias"):
        ITPNCheckpointer(target).load(str(nan))
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), "nothing loaded"


@pytest.mark.parametrize("content", ["just a string", [1, 2, 3], {"model": "str"}, {"model": {"w": "x"}}])
def test_checkpoints_that_are_not_weights(tmp_path, content):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointFileError, match=str(path)):
        ITPNCheckpointer(torch.nn.Linear(2, 2)).load(str(path))


def test_missing_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointFileError, match="not found: .*nope.pth"):
        ITPNCheckpointer(torch.nn.Linear(2, 2)).load(str(tmp_path / "nope.pth"))
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    torch.save({"model": torch.nn.Linear(2, 2).state_dict()}, tmp_path / "model_0000004.pth")
    ck = ITPNCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))
    with pytest.raises(CheckpointFileError, match="names .*model_0000009.pth, which does not exist.*model_0000004.pth"):
        ck.resume_or_load("", resume=True)


def test_non_finite_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(3, 3)
    ck = ITPNCheckpointer(model, str(tmp_path))
    ck.save("model_0000000")
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"weight.*Last checkpoint with finite weights: .*model_0000000"):
        ck.save("model_0000001")
    assert not (tmp_path / "model_0000001.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    # a directory left by an older version, last_checkpoint naming NaN weights: skipped
    sd = model.state_dict()
    torch.save({"model": sd}, tmp_path / "model_0000002.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000002.pth")
    assert last_finite_checkpoint(str(tmp_path)).endswith("model_0000000.pth")


def test_disk_full_is_one_clear_error(tmp_path, monkeypatch):
    import itpn_d2.checkpoint.atomic_save as ckmod

    real_fdopen = os.fdopen

    class _FullDisk:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 2048:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(ckmod.os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode)))
    target = tmp_path / "model.pth"
    with pytest.raises(CheckpointWriteError, match="No space left on device .*errno 28.*MiB free"):
        atomic_write(str(target), lambda f: torch.save({"w": torch.zeros(10000)}, f))
    assert not target.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_temporaries_carry_their_writer_and_only_dead_ones_are_removed(tmp_path):
    model = torch.nn.Linear(2, 2)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket, re

        host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40]
        dead_pid = 2**22 + 12345  # above the default pid_max: no such process
        (tmp_path / f".model_final.pth.{host}-{dead_pid}.abc123.tmp").write_bytes(b"x")
        (tmp_path / f".model_final.pth.{host}-{live.pid}.def456.tmp").write_bytes(b"x")
        (tmp_path / f".model_final.pth.otherhost-{dead_pid}.ghi789.tmp").write_bytes(b"x")
        ITPNCheckpointer(model, str(tmp_path)).save("model_0000000")
        left = sorted(p for p in os.listdir(tmp_path) if p.endswith(".tmp"))
        assert left == sorted([f".model_final.pth.{host}-{live.pid}.def456.tmp", f".model_final.pth.otherhost-{dead_pid}.ghi789.tmp"])
    finally:
        live.kill()
        live.wait()


@pytest.mark.slow
def test_kill_while_model_final_is_written_then_resume_writes_it(tmp_path):
    datasets = tmp_path / "data"
    make_image_folder(datasets, n=8)
    out = tmp_path / "run"
    marker = tmp_path / "writing_final"
    opts = ["train.max_iter=4", "train.checkpointer.period=2", "dataloader.train.total_batch_size=2"]
    proc = start(paused_write(train_cmd(out, *opts), "model_final", marker), env_for(datasets),
                 tmp_path / "first.log")
    wait_for(marker.exists, proc, what="the model_final write")
    kill_group(proc)
    assert not (out / "model_final.pth").exists() and (out / "last_checkpoint").read_text() == "model_0000003.pth"
    assert [p for p in os.listdir(out) if p.endswith(".tmp")], "the killed write left its temporary"
    r = run(train_cmd(out, *opts, resume=True), env_for(datasets))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model_final.pth").exists()
    final, last = load_model(out / "model_final.pth"), load_model(out / "model_0000003.pth")
    assert all(torch.equal(final[k], last[k]) for k in last)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")], "the dead writer's temporary is removed"


@pytest.mark.slow
def test_two_runs_on_one_output_directory(tmp_path):
    datasets = tmp_path / "data"
    make_image_folder(datasets, n=8)
    out = tmp_path / "run"
    env = env_for(datasets)
    first = start(train_cmd(out, "train.max_iter=100000", "train.checkpointer.period=1000000"), env, tmp_path / "1.log")
    try:
        wait_for(lambda: (out / "metrics.json").exists(), first, timeout=240, what="the first run's first step")
        r = run(train_cmd(out, "train.max_iter=2"), env)
        err = error_line(r.stderr) or ""
        assert r.returncode == 1 and "in use by another live run" in err and f"process {first.pid}" in err, r.stderr[-2000:]
    finally:
        kill_group(first)
    # the killed run's lock is free at once: taken over
    r = run(train_cmd(out, "train.max_iter=2", "train.checkpointer.period=2"), env)
    assert r.returncode == 0, r.stderr[-3000:]


def test_lock_in_process(tmp_path):
    with OutputDirLock(str(tmp_path)):
        with pytest.raises(OutputDirLockedError, match=f"process {os.getpid()}"):
            OutputDirLock(str(tmp_path)).acquire()
    OutputDirLock(str(tmp_path)).acquire().release()  # released


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.max_iter=abc", "train.max_iter='abc' is not an integer"),
        ("train.max_iter=-5", "train.max_iter=-5 must be >= 1"),
        ("train.checkpointer.period=0", "train.checkpointer.period=0 must be >= 1"),
        ("train.log_period=0", "train.log_period=0 must be >= 1"),
        ("dataloader.train.total_batch_size=0", "dataloader.train.total_batch_size=0 must be >= 1"),
    ],
)
def test_bad_values_are_refused(override, message):
    from detectron2.config import LazyConfig

    cfg = apply_overrides(LazyConfig.load(DET_TINY), [override])
    with pytest.raises(ConfigValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(cfg)


@pytest.mark.parametrize(
    "override,suggestion",
    [
        ("dataloader.train.total_batch_sise=8", "dataloader.train.total_batch_size"),
        ("dataloader.train.mapper.use_instance_masks=False", "dataloader.train.mapper.use_instance_mask"),
        ("model.roi_heads.batch_size_per_imag=8", "model.roi_heads.batch_size_per_image"),
    ],
)
def test_typos_under_kwargs_callables_are_refused(override, suggestion):
    from detectron2.config import LazyConfig

    with pytest.raises(ConfigOverrideError, match=f"did you mean '{suggestion}'"):
        apply_overrides(LazyConfig.load(DET_TINY), [override])
    # what the **kwargs are forwarded to is accepted
    for ok in ("dataloader.train.pin_memory=True", "dataloader.train.mapper.use_instance_mask=False",
               "model.roi_heads.proposal_append_gt=False"):
        apply_overrides(LazyConfig.load(DET_TINY), [ok])


@pytest.mark.slow
def test_cli_errors_are_one_line_and_never_exit_0(tmp_path):
    datasets = tmp_path / "data"
    make_image_folder(datasets, n=4)
    env = env_for(datasets)
    cases = [
        (["train.max_iter=-5"], [], "train.max_iter=-5 must be >= 1", 2),
        ([f"train.init_checkpoint={tmp_path / 'missing.pth'}"], [], "not found", 1),
        ([], ["--eval-only"], "--eval-only needs weights", 1),
    ]
    for opts, extra, text, code in cases:
        r = run(train_cmd(tmp_path / "o", *opts, extra_args=extra), env)
        err = error_line(r.stderr)
        assert r.returncode == code and err and text in err, (opts, r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, r.stderr[-2000:]


def _coco_json(root, n=3):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, anns = [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        im = np.full((96, 96, 3), 40, np.uint8)
        x, y = 16 + 8 * i, 20
        im[y : y + 40, x : x + 40] = rng.integers(150, 255, 3)
        Image.fromarray(im).save(os.path.join(root, "images", f"{i}.png"))
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 96, "width": 96})
        poly = [x, y, x + 40, y, x + 40, y + 40, x, y + 40]
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 7, "bbox": [x, y, 40, 40], "area": 1600,
                     "iscrowd": 0, "segmentation": [poly]})
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 7, "name": "square"}]}, f)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2])
def test_configs_that_register_datasets_run_through_the_cli(tmp_path, procs):
    """The datasets/README.md recipes: register_coco_instances / register_image_folder called in
    the config file itself; the config is loaded once per process."""
    root = tmp_path / "my"
    js = _coco_json(str(root))
    det_cfg = tmp_path / "my_det.py"
    det_cfg.write_text(
        "from detectron2.config import LazyConfig\n"
        "from detectron2.data.datasets import register_coco_instances\n"
        f"_base = LazyConfig.load({DET_TINY!r})\n"
        f"register_coco_instances('my_train', {{}}, {js!r}, {str(root / 'images')!r})\n"
        "dataloader, model, optimizer, lr_multiplier, train = (_base.dataloader, _base.model, _base.optimizer, "
        "_base.lr_multiplier, _base.train)\n"
        "dataloader.train.dataset.names = 'my_train'\n"
        "dataloader.train.num_workers = 0\n"
        "model.roi_heads.num_classes = 1\n"
    )
    env = env_for(tmp_path)
    _train_cli_ok(
        [sys.executable, os.path.join(ROOT, "tools", "lazyconfig_train_net.py"), "--config-file", str(det_cfg),
         "--num-gpus", str(procs), f"train.output_dir={tmp_path / 'det'}", "train.max_iter=2", "train.eval_period=0",
         "dataloader.train.total_batch_size=2", "train.init_checkpoint=", "train.checkpointer.period=2"],
        env, tmp_path / "det")
    assert (tmp_path / "det" / "model_final.pth").exists()

    folder = make_image_folder(tmp_path / "imgs", n=6)
    pre_cfg = tmp_path / "my_pre.py"
    pre_cfg.write_text(
        "from detectron2.config import LazyConfig\n"
        "from itpn_d2.data.image_folder import register_image_folder\n"
        f"_base = LazyConfig.load({os.path.join(ROOT, 'configs', 'pretrain', 'mim_mfm_itpn_tiny_cpu.py')!r})\n"
        f"register_image_folder('my_unlabeled', {folder!r})\n"
        "dataloader, model, optimizer, lr_multiplier, train = (_base.dataloader, _base.model, _base.optimizer, "
        "_base.lr_multiplier, _base.train)\n"
    )
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("dataloader.train.dataset.names")] + [
        f"train.output_dir={tmp_path / 'pre'}", "train.max_iter=2", "train.checkpointer.period=2",
        "dataloader.train.total_batch_size=2"]
    _train_cli_ok(
        [sys.executable, os.path.join(ROOT, "tools", "lazyconfig_train_net.py"), "--config-file", str(pre_cfg),
         "--num-gpus", str(procs), "dataloader.train.dataset.names=my_unlabeled", *overrides],
        env, tmp_path / "pre")
    assert (tmp_path / "pre" / "model_final.pth").exists()


# A worker of a 2-process gloo run once died at start-up with only "terminate called without an active
# exception" from libstdc++ (SIGABRT), in the fresh-clone CI of 2026-11-30; this test had passed in every
# earlier CI run and passed in 4 reruns that day, so the cause (gloo, the launcher) is not known. That
# abort, and only it, is retried once, with a warning that keeps the first attempt's output in the test
# report; any other failure, or the abort twice, fails the test.
_NATIVE_ABORT = "terminate called without an active exception"


def _train_cli_ok(cmd, env, out_dir) -> None:
    def attempt():
        return run(cmd, env, timeout=600)

    r = attempt()
    if r.returncode != 0 and _NATIVE_ABORT in r.stderr:
        import warnings

        warnings.warn(f"{os.path.basename(str(out_dir))}: a worker aborted natively; retrying once. "
                      f"stdout tail:\n{r.stdout[-1500:]}\nstderr tail:\n{r.stderr[-1500:]}")
        shutil.rmtree(out_dir, ignore_errors=True)
        r = attempt()
    assert r.returncode == 0, f"stdout tail:\n{r.stdout[-1500:]}\nstderr tail:\n{r.stderr[-3000:]}"


def test_demo_refuses_typos_and_missing_weights_and_skips_unreadable_images(tmp_path, capsys):
    from itpn_d2.utils import demo
    from itpn_d2.utils.predictor import LazyPredictor

    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(images / "ok.png")
    (images / "broken.png").write_bytes(b"not a png")
    (images / "empty.jpg").write_bytes(b"")

    with pytest.raises(SystemExit) as e:
        demo.main(["--config-file", DET_TINY, "--input", str(images), "--opts", "train.init_checkpint=x.pth"])
    assert e.value.code == 2 and "did you mean 'train.init_checkpoint'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        demo.main(["--config-file", DET_TINY, "--input", str(images)])
    assert e.value.code == 1 and "--random-weights" in capsys.readouterr().err

    model = LazyPredictor(demo.setup_cfg(demo.get_parser().parse_args(["--config-file", DET_TINY, "--input", "x"]))).model
    ckpt = tmp_path / "m.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    out = tmp_path / "out"
    demo.main(["--config-file", DET_TINY, "--input", str(images), "--output", str(out),
               "--opts", f"train.init_checkpoint={ckpt}"])
    assert sorted(os.listdir(out)) == ["ok.png"]
    all_bad = tmp_path / "bad"
    all_bad.mkdir()
    (all_bad / "x.png").write_bytes(b"junk")
    with pytest.raises(SystemExit) as e:
        demo.main(["--config-file", DET_TINY, "--input", str(all_bad), "--opts", f"train.init_checkpoint={ckpt}"])
    assert e.value.code == 1 and "none of the 1 files is a readable image" in capsys.readouterr().err


def test_demo_takes_class_names_from_an_unloaded_coco_dataset(tmp_path):
    from detectron2.config import LazyConfig
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from itpn_d2.utils.predictor import metadata_for

    js = _coco_json(str(tmp_path))
    name = f"adv_names_{os.getpid()}"
    register_coco_instances(name, {}, js, str(tmp_path / "images"))
    assert not MetadataCatalog.get(name).get("thing_classes")
    cfg = LazyConfig.load(DET_TINY)
    cfg.dataloader.test.dataset.names = name
    assert metadata_for(cfg).thing_classes == ["square"]
