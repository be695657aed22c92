"""ENet class weights: the formula, the pixel shares read from a registered dataset, and the
demo segmentation config's weights against the generated data they were computed from."""
import math
import os

import numpy as np
import pytest
from detectron2.config import LazyConfig

from itpn_d2.data.builtin import register_synthetic
from itpn_d2.data.class_weights import enet_class_weights, label_frequencies, main
from itpn_d2.data.synthetic import SEM_SEG_IGNORE, SyntheticSpec, ensure_synthetic, image_rng, render_image, split_paths
from tests.helpers import REPO_ROOT


def test_enet_formula_and_order():
    w = enet_class_weights([0.88, 0.1, 0.02, 0.0])
    assert w[0] == pytest.approx(1 / math.log(1.9)) and w[3] == pytest.approx(1 / math.log(1.02))
    assert w == sorted(w)  # the rarer the class, the larger its weight
    with pytest.raises(ValueError):
        enet_class_weights([0.5, 0.5], c=1.0)


def test_label_frequencies_of_a_registered_dataset(tmp_path):
    root = str(tmp_path / "synth")
    spec = dict(num_train=6, num_val=2, num_unlabeled=0, image_size=64, image_format="png")
    ensure_synthetic(root, SyntheticSpec(**spec))
    names = register_synthetic(root, prefix="cw_test", **spec)
    shares = label_frequencies(names["sem_seg_train"])
    # the same shares from the generator itself, without the files
    counts = np.zeros(256, np.int64)
    for i in range(6):
        _, _, sem_seg = render_image(SyntheticSpec(**spec), image_rng(0, "train", i), first_category=i)
        counts += np.bincount(sem_seg.ravel(), minlength=256)
    counts[SEM_SEG_IGNORE] = 0
    np.testing.assert_allclose(shares, counts[:7] / counts[:7].sum())
    assert main([names["sem_seg_train"]]) == [round(w, 2) for w in enet_class_weights(shares)]

    # a label map with a value that is neither a class nor the ignore label is refused, by name
    import cv2

    bad = os.path.join(split_paths(root, "train")["sem_seg_root"], "000003.png")
    cv2.imwrite(bad, np.full((64, 64), 9, np.uint8))
    with pytest.raises(ValueError, match=r"000003\.png.*\[9\]"):
        label_frequencies(names["sem_seg_train"])
    cv2.imwrite(bad, np.zeros((64, 64, 3), np.uint8))  # a colour image is not a label map
    with pytest.raises(ValueError, match=r"000003\.png.*one 8-bit channel"):
        label_frequencies(names["sem_seg_train"])


def test_demo_segmentation_weights_are_those_of_the_generated_training_split():
    """The demo config's numbers are ENet's weights of the default generated training split
    (rendered here in memory: the same images `make demo` writes)."""
    cfg = LazyConfig.load(os.path.join(REPO_ROOT, "configs/ADE20K/uper_itpn_tiny_demo.py"))
    spec = SyntheticSpec()
    counts = np.zeros(256, np.int64)
    for i in range(spec.num_train):
        _, _, sem_seg = render_image(spec, image_rng(spec.seed, "train", i), first_category=i)
        counts += np.bincount(sem_seg.ravel(), minlength=256)
    shares = counts[:7] / counts[:7].sum()
    expected = [round(w, 2) for w in enet_class_weights(shares)]
    assert list(cfg.model.sem_seg_head.class_weight) == expected
