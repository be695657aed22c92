"""UPerNet, iTPN-tiny, trained as a head on a fine-tuned detector's frozen encoder and pyramid: the
segmentation stage of ``make demo``.

    python tools/lazyconfig_train_net.py --config-file configs/ADE20K/uper_itpn_tiny_demo_frozen.py \
        train.init_checkpoint=output/demo/finetune/model_final.pth

``uper_itpn_tiny_demo.py`` (the segmenter fine-tuned from the pre-training, as the release's recipe
does, and the integral ablation's segmentation task), used differently:

* the weights to start from (``train.init_checkpoint``, given by ``make demo``) are the demo's
  **Mask R-CNN** checkpoint. Its ``backbone.net.*`` and ``backbone.pyramid.*`` tensors have the same
  names and shapes as the segmenter's (one pyramid module serves both tasks), so they load strictly;
  the detector's heads are dropped;
* ``model.backbone.frozen = True`` (this file): the encoder and pyramid are a fixed feature extractor
  (eval mode, no gradients), and only the UPerNet head trains, at a head's lr (this file: 1.2e-2);
* the base config's 300 iterations then cost about what 150 fine-tuning ones did;
* (this file) a stride-8 head (UPerNet's levels at strides 8-32; p2 in the first since, a bullet below)
  without PhotoMetricDistortion: its step was 1.56x cheaper at the stage's 2 threads;
* (this file) batch 2 for 2200 iterations (1800 until `631ddbb` and from `ba04072` to `ec0aa58`, below) instead of batch 8 for 450: at 1800,
  the same images in four times the updates (mIoU 40.5 against 32.0 on the same detector; the stage 114 s
  against 95); no auxiliary
  FCN head: on a frozen backbone its loss trains only itself, and it is not used at inference; and
  ENet's class weights square-rooted (42.7). Over the five demo detectors (seeds 0-4): mIoU 40.4 +- 1.3 against
  31.4 +- 0.7 for the file before, paired difference +9.0 [+7.5, +10.5] (95%); the square root alone
  +1.7 [+0.6, +2.8] (docs/main_job.md);
* (until the last bullet) the backbone offered only the maps the head read (p3-p5, c3-c5), so it
  skipped the pyramid's stride-4 level, most of the pyramid's cost: steps 1.28-1.30x faster, the same
  mIoU to the last digit; the time bought 2200 iterations instead of 1800 in a shorter stage (about
  100 s against 112-114). Over the five demo detectors: mIoU 44.5 +- 1.8 against 40.4 +- 1.3, paired
  difference +4.1 [+2.9, +5.3] (95%; docs/main_job.md); against the batch-8 file, +13.1 [+11.4, +14.8];
* (this file) no dropout before the classifier (the base file: 0.1): 46.1 +- 1.4 over the five
  detectors, paired +1.6 [+0.6, +2.6] over the same with dropout;
* (this file) the finest level reads the pyramid's p2 again, space-to-depth to stride 8 beside p3 and
  c3 (``("p2", "p3", "c3")``; UPerHead), where the detector learnt the shapes, for 1800 iterations,
  which take about the time the 2200 without p2 did: mIoU 53.0 +- 4.5 over four detectors against
  41.6 +- 2.8, paired +11.4 [+5.5, +17.3] (2026-12-06, 2-core AMD EPYC; docs/main_job.md);
* (this file) 2200 iterations again, with p2: over the five demo detectors of the Intel Xeon, mIoU 58.5
  +- 1.5 against 53.4 +- 2.2 at 1800, paired +5.1 [+3.0, +7.2], and 146.4 +- 4.3 against 137.0 +- 3.9
  of the 198 validation objects labelled with their own class, +9.4 [+2.6, +16.2], for 15-30 s
  (2026-12-06; docs/main_job.md). Stride-4 logits from this stride-8 head
  (``model.sem_seg_head.logit_upscale=2``, UPerHead) gave +0.2 [-0.3, +0.7] at 2200: not used.
* (the pre-training, not this file) ``make demo``'s pre-training with its pixel decoder 256 wide instead
  of 64: on the five detectors from it, this file gives mIoU 62.3 +- 1.6 (60.3 to 64.2) and 154.8 +- 3.0
  objects right, paired +3.8 [+0.6, +7.0] and +8.4 [+0.0, +16.8] (one pre-training each side; 2026-12-06,
  Intel Xeon; docs/main_job.md, "A wider pixel decoder").

Why: in the demo's minutes the segmenter learns *which* shape a pixel belongs to only slowly (mIoU
15-19 after 150-300 iterations from the pre-training; ``uper_itpn_tiny_demo.py``), while the detector,
trained first, has learnt to tell the shapes apart. Starting from it gives every class some IoU.
This is a choice for the demo's 15 minutes, not the paper's protocol, which fine-tunes each task from
the pre-training; the ADE20K configs and the ablation do that.

Measured before p2 came back (2026-12-05 and, from the row "without the pyramid's p2 level" down,
2026-12-06; 2-core Intel
Xeon; from the ``make demo`` detector of 2026-12-05, box AP 37.2, 500 pre-training iterations, except the
rows from "the batch-8 file" down (the detectors of ``make demo`` with 700, night of 2026-12-05);
mIoU on the 50 validation images; seed 0 unless stated, one run each; the runs marked * one process
with one thread, two to four at once; the frozen ones above the stride-4 file's row still with drop
path in training mode):

=====================================================================  ==========  =====================
settings                                                                iterations  mIoU (at iterations)
=====================================================================  ==========  =====================
``uper_itpn_tiny_demo.py`` from the pre-training, as ``make demo`` ran   150         15.0
it until 2026-12-05 (2 threads)
the same from the detector, the backbone fine-tuned (*)                  75 / 150    20.3 at 75, 22.0
the same, lr 4e-3, layer decay 0.5 (*)                                   150         22.4
the same, ENet weights square-rooted (*)                                 150         18.7
the same, a 600-iteration schedule (*)                                   600         18.6 / 22.9 / 28.4
from the detector, encoder frozen, pyramid trained (*)                   300         22.2 / 24.9
from the detector, encoder and pyramid frozen, lr 2e-3 (*)               300         22.9 / 25.9
the same, lr 6e-3 / 1.2e-2 (*)                                           300         23.5 / 24.7; 24.4 / 26.8
the same, lr 1.2e-2, head 128 channels (*; 2x the step time)             300         22.0 at 150 (stopped)
the same, lr 1.2e-2, 450 iterations (*)                                  450         23.3 / 25.3 / 28.5
the frozen file as it was until 2026-12-05, stride-4 head (2 threads)    300         26.3 at 300
the same (*), train.seed=1                                               300         24.9 at 300
the same (*), no PhotoMetricDistortion                                   300         27.7 at 300
the same (*), a stride-8 head (levels p3-p5; 0.354 s a step, not 0.519)  300         25.7 at 300
the same (*), a stride-8 head, 450 iterations                            450         28.6 at 450
the stride-8 file (*): 450 iterations at batch 8, no colour jitter       450         29.3 at 450
the same (*), train.seed=1                                               450         29.5 at 450
the same, fresh-clone ``make demo`` at 7feaba2 (2 threads)               450         29.4 at 450
the batch-8 file (until the night of 2026-12-05) in ``make demo``        450         32.0 at 450
the same, on the detectors of detection seeds 1 / 2 / 3 / 4              450         31.3/31.9/31.6/30.3
the same on the seed-0 detector (*)                                      450         32.5 at 450
the same (*), batch 4 for 900 iterations                                 900         37.3 at 900
the same (*), batch 4, no auxiliary head (same mIoU to the last digit)   900         37.3 at 900
the same (*), batch 2 for 1800 iterations                                1800        41.5 at 1800
the same (*), batch 2, no auxiliary head, lr 6e-3 / 2.4e-2               1800        40.0 / 39.9
the same, batch 2, no auxiliary head, 1500 iterations (2 threads, 92 s)  1500        37.7 at 1500
the same (2 threads): batch 2, 1800 iterations, no auxiliary head        1800        40.5 at 1800
the same (*), dropout 0 before the classifier (the file: 0.1)            1800        41.9 at 1800
the same (*), ENet's weights sqrt / 4th root (2 decimals) / none         1800        43.6 / 39.1 / 37.8
the file until 2026-12-06 (2 threads): the weights square-rooted        1800        42.7 at 1800
the same on the detectors of seeds 1 / 2 / 3 / 4 (2 threads)             1800        40.4/40.0/39.2/39.8
the same without the pyramid's p2 level (2 threads; 83 s, not 105)       1800        42.7 (same digits)
the same, 2200 / 2600 iterations (2 threads; 97 s / 118 s)               2200/2600   47.5 / 47.1
the same (2200), on the detectors of seeds 1 / 2 / 3 / 4                2200        43.7/44.0/44.6/42.9
the same, no dropout before the classifier (2 threads)                  2200        48.5 at 2200
the same on the detectors of seeds 1 / 2 / 3 / 4 (2 threads)             2200        46.0/44.9/45.7/45.4
=====================================================================  ==========  =====================

Per class, without dropout (48.5, seed-0 detector): background 98, ring 68, circle 54, cross 36, rectangle 32,
star 28, triangle 25; with dropout (47.5): 98, 68, 51, 35, 30, 28, 21; at 1800 iterations (42.7):
background 97, ring 66, circle 48, cross 32, star 24, rectangle 17, triangle 14 (with the full weights,
40.5: 96, 56, 47, 30, 19, 21, 14). The stride-8 file's
one-thread row (29.3, on the 500-iteration pre-training's detector): background 95, ring 41, circle 33,
cross 13, triangle 11, star 8, rectangle 5 (``make demo`` with 700: 94, 50, 29, 19, 13, 11, 7); the stride-4 file: background 97, ring 38, circle 25, cross 8, rectangle 7, star 7,
triangle 3; the pre-training route (15.0): background 86, circle 10, ring 9, under 0.4 for the rest.
The stride-4 file's 300 iterations took 105 s (idle machine: training, evaluation and start-up), what
the stage before took for its 150 fine-tuning iterations; 450 stride-4 iterations would have added
about 50 s, which the 15 minutes do not have. Most of a frozen step is the head, most of the head its
stride-4 convolutions (0.36 s of a 0.52 s step, one thread), so the stride-8 head buys the 450
iterations for the same minutes (the seed-0 and seed-1 rows: +3.0 and +4.6 over the stride-4 file's
300 at the same seed). Without the colour jitter: the frozen backbone cannot adapt to it, and the test
images have none (+1.4 and +0.7 in the two pairs run).
"""
from detectron2.config import LazyCall as L
from detectron2.evaluation import DatasetEvaluators, SemSegEvaluator

from itpn_d2.data.photometric import PhotoMetricDistortion
from itpn_d2.evaluation import ObjectLabelEvaluator, sem_seg_loading_fn

from .uper_itpn_tiny_demo import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

MAX_ITER = 2200

model.backbone.frozen = True
# the head alone trains, from scratch: 2e-3 / 6e-3 / 1.2e-2 gave 25.9 / 24.7 / 26.8 (one run each)
optimizer.lr = 1.2e-2
# A stride-8 head: UPerNet's levels at strides 8-32, its logits upsampled 8x instead of 4x. Most of a
# frozen step is the head (0.36 of 0.52 s, one thread), most of the head its stride-4 convolutions, so
# a step is 1.56-1.57x faster at 2 threads (at batch 8: 0.20 s against 0.32 s, `tools/benchmark.py --what
# finetune` on the stride-8 and stride-4 files, twice each, alternating; docs/performance.md); at batch 8
# the minutes bought 450 iterations instead of 300 (table above; Intel Xeon, as the comments below unless
# they say AMD EPYC).
# The finest level still carries the pyramid's stride-4 map p2, rearranged space-to-depth to stride 8
# (UPerHead: each 2x2 block of p2 becomes one position of 4 x 64 channels, beside p3 and c3). p2 is,
# likely, where the detector learnt the shapes: detectron2's ROI heads pool each box from level floor(4 +
# log2(sqrt(area) / 224)), clamped to p2-p5, which is p2 for every object of the built-in data at these
# sizes (under 112 px), so the class-aware box classifier and mask head read p2 for every object-sized
# box (only larger proposals come from p3 up; the class-agnostic RPN reads all). The stage's command on the detectors
# of detection seeds 0 / 1 / 2 / 3 (2026-12-06, 2-core AMD EPYC, 2 threads): 42.3 / 37.6 / 44.3 / 42.0
# for the file before (p3-p5 and c3-c5, 2200 iterations, 106-115 s); with p2 space-to-depth 57.8 / 49.7 /
# 55.9 / 48.5 at 1800 iterations (113-122 s) and, seeds 0-2, 59.1 / 52.4 / 59.4 at 2200 (131-140 s). At seed 0: p2
# average-pooled instead 50.5, and c2 space-to-depth beside p2 58.1 (both at 2200).
model.sem_seg_head.in_features = [("p2", "p3", "c3"), ("p4", "c4"), ("p5", "c5")]
# The backbone offers just the maps the head reads (it would skip p2's level for a head without it).
model.backbone.out_features = [name for level in model.sem_seg_head.in_features for name in level]
# Resize and flip as the base file, no PhotoMetricDistortion: a frozen backbone cannot adapt to the
# colour jitter, and the test images have none.
dataloader.train.mapper.augmentations = [
    a for a in dataloader.train.mapper.augmentations if a._target_ is not PhotoMetricDistortion
]
# Batch 2, not 8: for a head trained from scratch in a few minutes the updates are what count (on the
# 700-iteration demo detector, 2026-12-05: batch 8 x 450 / 4 x 900 / 2 x 1800 gave mIoU 32.5 / 37.3 /
# 41.5, the same images, one thread each, two at once; table above). With two images, the 1x1
# pyramid-pooling branch still gives its BatchNorm two values per channel. 2200 iterations: with p2
# read (2026-12-06, AMD EPYC, 2 threads, seed-0 detector) 1800 / 2000 / 2200 gave 57.8 / 56.0 / 59.1 in
# 113 / 127 / 134 s, and over three detectors +2.5 [-0.2, +5.3] for 2200 over 1800 (not established);
# on the Intel Xeon, over five detectors, +5.1 [+3.0, +7.2] (established) in 110-117 s against 94-106 s.
# A fresh-clone `make demo` there took 13.5 minutes with 2200 (12.7 with 1800; the stage 122 s against
# 90), 13.0 with the wider pre-training decoder (the stage 120 s); on the AMD EPYC 13.4 with 1800 (2200
# not run there from a fresh clone).
dataloader.train.total_batch_size = 2
train.max_iter = MAX_ITER  # the base file evaluates and saves at train.max_iter
# No auxiliary FCN head: with the backbone frozen its loss reaches nothing but its own weights, and it is
# not used at inference (the same mIoU to the last digit without it, at batch 4; steps 1.09-1.10x faster,
# `tools/benchmark.py --what finetune`, docs/performance.md).
model.sem_seg_head.aux_in_feature = None
# ENet's class weights of the base file, square-rooted (background 1.25, shapes 4.6-5.5, instead of 1.56
# against 21-30). One thread each, seed-0 detector: full 41.5, square-rooted 43.6, fourth root 39.1,
# unweighted 37.8; over five detectors +1.7 [+0.6, +2.8] against the full weights (docs/main_job.md).
model.sem_seg_head.class_weight = [w**0.5 for w in model.sem_seg_head.class_weight]
# No dropout before the classifier (UPerHead's default 0.1): a head trained from scratch for a few
# minutes on fixed features is short of updates, not over-fitting. Five detectors, 2200 iterations,
# 2 threads (2026-12-06, without p2, Intel Xeon): 46.1 +- 1.4 against 44.5 +- 1.8, paired +1.6 [+0.6, +2.6] (docs/main_job.md).
model.sem_seg_head.dropout = 0.0
# In-process loading: on 2 cores the loader's worker processes take CPU from the step (at batch 8, 0.18-0.19 s
# a step instead of 0.19-0.20); the stream, and so the checkpoint, is the same either way
# (itpn_d2.data.resumable).
dataloader.train.num_workers = dataloader.test.num_workers = 0
# mIoU as the base file, and beside it the objects of the 50 images (itpn_synthetic_val, the same
# images with instance masks) painted mostly in their own class: what a look at the rendered
# segmentations judges, where mIoU weighs pixels (ObjectLabelEvaluator; results "object_labels/*").
dataloader.evaluator = L(DatasetEvaluators)(
    evaluators=[
        L(SemSegEvaluator)(
            dataset_name="${dataloader.test.dataset.names}",
            sem_seg_loading_fn=sem_seg_loading_fn,
            output_dir="${train.output_dir}/inference",
        ),
        L(ObjectLabelEvaluator)(instances_dataset="itpn_synthetic_val", sem_seg_dataset="${dataloader.test.dataset.names}"),
    ]
)
