#!/usr/bin/env python
"""
Visualise what an iTPN pre-training model reconstructs.

For each input image, writes ``OUTPUT/<name>.png``: four titled panels,
original | masked input (masked units grey) | reconstruction | reconstruction with the
visible units pasted back. The masks come from the model's eval-mode generator
(``model.eval_mask_seed``), so figures are reproducible. The log names the checkpoint loaded.
What it runs: :mod:`itpn_d2.utils.reconstruction_figures`.

Example (the checkpoint of ``make demo``'s pre-training stage)::

    python tools/visualize_reconstruction.py \\
        --config-file configs/pretrain/mim_mfm_itpn_tiny_demo.py \\
        --checkpoint output/demo/pretrain/model_final.pth \\
        --input datasets/itpn_synthetic/val/images --output output/recon \\
        --opts train.device=cpu
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from itpn_d2.utils.reconstruction_figures import cli  # noqa: E402

if __name__ == "__main__":
    cli(description=__doc__)
