"""train.compile: the backbone and decoders are compiled in place, checkpoint keys stay those
of the eager model, outputs match, and training steps after the first compile nothing new
(a step-dependent Python value inside a compiled region would recompile every step)."""
import copy

import pytest
import torch
from detectron2.utils.events import EventStorage
from torch._dynamo.testing import CompileCounter

from itpn_d2.engine.compile import DEFAULT_COMPILE_MODULES, compile_modules, maybe_compile
from tests.helpers.models import make_tiny_backbone, mask_rcnn_sample, tiny_mask_rcnn
from tests.helpers.models import smooth_images, tiny_pretrainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pretrain_batch(seed):
    return [{"image": im, "mask_seed": seed * 10 + i} for i, im in enumerate(smooth_images(2, seed=seed))]


def test_pretrainer_compiles_in_place_matches_eager_and_does_not_recompile():
    eager = tiny_pretrainer(mim="levels").train()
    model = copy.deepcopy(eager)
    counter = CompileCounter()  # runs the captured graphs eagerly and counts the frames compiled
    done = compile_modules(model, backend=counter)
    assert DEFAULT_COMPILE_MODULES == ("backbone", "pixel_decoder", "mfm_decoder", "teacher")
    # the backbones (online and EMA) name what they compiled: their encoder and pyramid
    assert done == ["backbone.net", "backbone.pyramid", "pixel_decoder", "mfm_decoder",
                    "teacher.model.net", "teacher.model.pyramid"]
    assert list(model.state_dict()) == list(eager.state_dict())  # no "_orig_mod." prefix

    frames_after_first = None
    for it in range(3):
        batch = _pretrain_batch(it)
        with EventStorage(it):
            want = eager(batch)
        with EventStorage(it):
            got = model(batch)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
        sum(got.values()).backward()
        if it == 0:
            frames_after_first = counter.frame_count
            assert frames_after_first > 0, "nothing was compiled"
    assert counter.frame_count == frames_after_first, "later steps recompiled"


def test_detector_backbone_compiles_and_trains(repo_root):
    torch.manual_seed(0)
    model = tiny_mask_rcnn(repo_root).train()
    keys = list(model.state_dict())
    counter = CompileCounter()
    assert compile_modules(model, backend=counter) == ["backbone.net", "backbone.pyramid"]
    assert list(model.state_dict()) == keys
    for it in range(2):
        torch.manual_seed(it)
        with EventStorage(it):
            losses = model([mask_rcnn_sample(128, 160), mask_rcnn_sample(128, 160)])
        sum(losses.values()).backward()
        if it == 0:
            first = counter.frame_count
            assert first > 0
    assert counter.frame_count == first


def test_keyed_drop_path_compiles_matches_eager_and_settles():
    """Every training run keys drop path on (seed, iteration, sample) with host-side hashing that
    dynamo cannot trace (it raised KeyError(torch.uint64)); the masks are drawn outside the graph,
    so a compiled backbone with drop path gives the eager features and gradients, and a new
    iteration's key compiles nothing new."""
    from itpn_d2.modeling.drop_path import DropPathStep, set_drop_path_step

    torch.manual_seed(0)
    eager = make_tiny_backbone(drop_path_rate=0.3).train()
    model = copy.deepcopy(eager)
    counter = CompileCounter()
    assert compile_modules(model, ["net", "pyramid"], backend=counter) == ["net", "pyramid"]
    frames = []
    try:
        for it in range(4):
            set_drop_path_step(DropPathStep(seed=5, iteration=it, rank=0))
            x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(it))
            want, got = eager(x), model(x)
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
            sum(f.square().mean() for f in want.values()).backward()
            sum(f.square().mean() for f in got.values()).backward()
            frames.append(counter.frame_count)
    finally:
        set_drop_path_step(None)
    for (n, a), b in zip(eager.named_parameters(), model.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)
    # the second step may settle a shape (dynamo's automatic dynamic shapes), later ones add nothing
    assert frames[0] > 0 and frames[1] == frames[3], frames
    # and the keys did drop paths: another iteration's key gives other features
    set_drop_path_step(DropPathStep(seed=5, iteration=0, rank=0))
    try:
        a = eager(x)
    finally:
        set_drop_path_step(None)
    assert any(not torch.equal(a[k], want[k]) for k in want)


def test_bad_paths_are_named():
    model = tiny_pretrainer(mfm=False)
    with pytest.raises(ValueError, match="backbone.nett"):
        compile_modules(model, ["backbone.nett"])
    with pytest.raises(TypeError, match="mask_ratio"):
        compile_modules(model, ["mask_ratio"])


def test_switch_off_compiles_nothing():
    model = tiny_pretrainer()
    assert maybe_compile(model, None) == []
    assert maybe_compile(model, {"enabled": False}) == []
    assert model.backbone.net._compiled_call_impl is None


@pytest.mark.slow
def test_train_script_switch(tmp_path):
    """train.compile.enabled=True through tools/lazyconfig_train_net.py: logged, same losses as the
    eager run, and the checkpoint has the eager key names (so it loads into a detector)."""
    from tests.helpers.train_cli import env_for, load_model, make_image_folder, metrics, run, train_cmd

    make_image_folder(tmp_path / "data")
    env = env_for(tmp_path / "data")
    common = ["train.max_iter=3", "train.checkpointer.period=3"]
    eager = run(train_cmd(tmp_path / "eager", *common), env)
    assert eager.returncode == 0, eager.stderr[-3000:]
    compiled = run(train_cmd(tmp_path / "compiled", *common, "train.compile.enabled=True",
                             "train.compile.options.backend=eager"), env)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    log = (tmp_path / "compiled" / "log.txt").read_text()
    assert "torch.compile ({'backend': 'eager'" in log and "backbone.net, backbone.pyramid" in log, log[-2000:]
    m_eager, m_comp = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    for it in range(3):
        assert m_comp[it]["total_loss"] == pytest.approx(m_eager[it]["total_loss"], rel=1e-4), it
    a = load_model(tmp_path / "eager" / "model_final.pth")
    b = load_model(tmp_path / "compiled" / "model_final.pth")
    assert list(a) == list(b)
