"""The memory figures tools/benchmark.py reports: live tensor bytes before a step and the
peak allocated during it (the CPU stand-in for torch.cuda.max_memory_allocated); and the
datasheet peak it divides by for GPU MFU."""
import torch

from itpn_d2.modeling import HiViT, hivit_arch
from itpn_d2.utils.memory import live_tensor_bytes, peak_allocated

MB = 1_000_000


def test_peak_allocated_follows_allocations_and_frees():
    def fn():
        a = torch.empty(MB // 4)  # 1 MB
        b = torch.empty(2 * MB // 4)  # 2 MB live with a: the peak, 3 MB
        del a
        c = torch.empty(MB // 4)  # 3 MB again, not more
        del b, c

    m = peak_allocated(fn, baseline=7)
    assert m["delta"] == 3 * MB
    assert m["bytes"] == 3 * MB + 7


def test_live_tensor_bytes_counts_weights_grads_and_optimizer_state_once():
    lin = torch.nn.Linear(100, 50)  # 5050 parameters
    n = 5050 * 4
    opt = torch.optim.AdamW(lin.parameters())
    assert live_tensor_bytes(lin, opt) == n
    lin(torch.randn(3, 100)).sum().backward()
    opt.step()  # grads + exp_avg + exp_avg_sq (+ 4-byte steps)
    assert live_tensor_bytes(lin, opt, [lin.weight]) == 4 * n + 2 * 4
    x = torch.randn(10, 10)
    assert live_tensor_bytes({"a": x, "b": [x, x[1:]]}) == 400  # views share their storage


def test_activation_checkpointing_lowers_the_peak(one_thread):
    """The config switch that lets the base detector fit a card at 1024x1024 does save memory."""
    peaks = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = HiViT(**hivit_arch("tiny"), use_act_checkpoint=ckpt).train()
        x = torch.randn(2, 3, 256, 256)  # at 128 px the tiny model's gradients dominate the peak

        def step():
            f4, f8, f16 = net(x)
            (f4.mean() + f8.mean() + f16.mean()).backward()

        peaks[ckpt] = peak_allocated(step)["delta"]
        assert net.blocks[-1].attn.qkv.weight.grad is not None
    assert peaks[True] < 0.7 * peaks[False], peaks  # measured 36 vs 70 MB


def test_datasheet_peak_matches_the_card_name():
    """MFU's denominator: the specific part (PCIe, NVL) before the generic name; fp32 and unknown
    cards have none, so the benchmark falls back to the measured matmul rate."""
    from itpn_d2.utils.flops import datasheet_tflops

    assert datasheet_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert datasheet_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.5
    assert datasheet_tflops("NVIDIA H200", torch.float16) == 989.4
    assert datasheet_tflops("NVIDIA A100-SXM4-40GB", torch.bfloat16) == 312.0
    assert datasheet_tflops("NVIDIA H100 80GB HBM3", torch.float32) is None
    assert datasheet_tflops("NVIDIA GeForce GTX 1080", torch.bfloat16) is None
