#!/usr/bin/env python
"""Run an iTPN model on images, a folder or a video and write the detectron2
``Visualizer`` rendering (instances or semantic segmentation), in the style of
detectron2's ``demo/demo.py``, for LazyConfig ``.py`` configs. CPU by default.

Examples::

    python tools/demo.py --config-file configs/COCO/mask_rcnn_itpn_base_1x.py \
        --input img1.jpg img2.jpg --output out/ --opts train.init_checkpoint=model_final.pth
    python tools/demo.py --config-file configs/ADE20K/uper_itpn_base_160k.py \
        --input "photos/*.jpg" --output out/ --bf16 --opts train.init_checkpoint=uper.pth
    python tools/demo.py --config-file cfg.py --video-input clip.mp4 --output clip_vis.mp4 \
        --opts train.init_checkpoint=model_final.pth

``--input`` takes files, folders (every image inside) or quoted glob patterns.
``--opts`` (last on the line, as in every tool) are LazyConfig overrides (``key=value``),
checked like the training script's; ``train.device`` defaults to ``cpu`` here, pass
``train.device=cuda`` for a GPU. The log names the checkpoint loaded. Exit status 0, or 1
(2 for a config error) with one ``ERROR:`` line. The demo itself: :mod:`itpn_d2.utils.demo`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from itpn_d2.utils.demo import main  # noqa: E402

if __name__ == "__main__":
    main()
