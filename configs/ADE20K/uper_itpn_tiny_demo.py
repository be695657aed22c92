"""UPerNet, iTPN-tiny, on the built-in generated label maps (``itpn_synthetic_sem_seg_*``): the
CPU segmentation stage of ``make demo``.

    python tools/lazyconfig_train_net.py --config-file configs/ADE20K/uper_itpn_tiny_demo.py \
        train.init_checkpoint=output/demo/pretrain/model_final.pth

The ADE20K recipe (``uper_itpn_base_160k.py``) scaled for 2 CPU cores: the tiny HiViT (192 wide,
1/1/6 blocks) and the 64-channel depth-2 pyramid of ``configs/pretrain/mim_mfm_itpn_tiny_cpu.py``,
so its checkpoint loads strictly (every encoder and pyramid tensor, none re-initialised); UPerNet
levels concat(pyramid, encoder) as the recipe, a 64-channel head; the recipe's augmentation
(resize 0.5-2.0, crop with at most 75 % of one class, flip, PhotoMetricDistortion) at 128-px crops
of the 256-px images; the release's layer-decay rule (``release_seg``) and poly schedule with a
linear warm-up; whole-image inference at 256 px and ``SemSegEvaluator`` (mIoU over the 7
classes: background and the 6 shapes).

What differs from the full recipe, for time: no relative position bias (it would be new, zero
tables on top of the tiny pixel checkpoint; the ADE20K configs have it), whole-image instead of
sliding-window inference (the images are 256 px), and a higher lr for a run of a few hundred
iterations (3e-5 at 16 images is for 160k).

Status: 300 iterations reach mIoU 12.6 on ``itpn_synthetic_sem_seg_val`` by predicting background
everywhere (docs/main_job.md): the stage runs end to end, but does not learn the task in this budget yet.

Measured (segtune, 2026-11-29; tiny pre-training checkpoint loaded strictly, ``OMP_NUM_THREADS=1``,
two runs sharing the 2 loaded cores, so wall times are about 1.5-2x the CPU time; mIoU on the 50
validation images at 256 px, whole image; "bg only" = IoU background 88.5, every shape 0):

=====================================================================  ========  ============  =====
settings (changes to this file)                                        iters     mIoU          wall
=====================================================================  ========  ============  =====
as this file (docs/main_job.md)                                        300 @ 8   12.6 bg only  -
D: resize short edge 192-320 (0.75-1.25x the test scale), 128 crop,   300 @ 8   12.6 bg only  337 s
   flip, no PhotoMetricDistortion, lr 1e-3
E: no resize or crop (the 256 image, the test scale), flip only        150 @ 4   12.6 bg only  258 s
F: as E, lr 3e-3 with layer decay 0.6 (backbone much slower than head) 150 @ 4   12.6 bg only  172 s
G: as F, 300 iterations (train loss 0.35 at iter 199)                  300 @ 4   12.6 bg only  312 s
A: as D with PhotoMetricDistortion                                     300 @ 8   (killed: the shared venv vanished at eval)
B: as E with PhotoMetricDistortion                                     150 @ 4   (killed likewise; final train loss 0.50)
C: as E at batch 8                                                     150 @ 8   stopped: ~2x the CPU budget
=====================================================================  ========  ============  =====

The whole-image training loss of B/E ends at 0.50, just under the entropy of the pixel-class prior
(0.56: background 88.1 %, each shape 1.3-2.8 % of the training pixels), i.e. the head has learnt the
prior and little else. Checks on D's final checkpoint: 0 % of pixels predicted foreground on val
images at 256 px, resized to 128 px, and on 128-px crops of the original scale, also with BatchNorm
in batch-statistics mode: the collapse is not a train/test scale gap nor BN running statistics.
Its optimizer groups are as intended (head and last blocks at lr 1e-3, patch embedding 2.9e-4).
F (run alone, 172 s with evaluation) ends at a whole-image training loss of 0.41, clearly under the
prior (E: 0.54 at the same iteration), yet still predicts background everywhere: on train and val
images its softmax puts up to 0.84 of a pixel's mass on the 6 shapes together, but spread so that no
single shape beats background. The stage has learnt foreground vs background and not which shape;
argmax mIoU hides that. G (F at 300 iterations) is still background-only. Next to test (not run, out of time): a class-
weighted or OHEM cross-entropy (the release uses plain CE; it would need a head option), fewer
shape classes per pixel of context (the head's input levels). Neither scale matching nor test-scale
training makes the stage separate the shapes within ~150-300 iterations; the settings below are
unchanged.
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.evaluation import SemSegEvaluator

from itpn_d2.data.photometric import PhotoMetricDistortion
from itpn_d2.evaluation.sem_seg import sem_seg_loading_fn
from itpn_d2.modeling import hivit_arch

from .uper_itpn_base_160k import dataloader, lr_multiplier, model, optimizer, train

FPN_DIM = 64
CROP = 128
MAX_ITER = 300  # at 8 images: ~6 passes over the 400 training images

# --- model -------------------------------------------------------------------------
model.backbone.net.update(hivit_arch("tiny", "official"))
model.backbone.net.drop_path_rate = 0.05
model.backbone.net.pretrain_img_size = 128  # the tiny pre-training resolution: same position-table size
model.backbone.net.rel_pos = False
model.backbone.rel_pos_grid = None
model.backbone.net.use_act_checkpoint = False
model.backbone.pyramid.out_dim = FPN_DIM
model.crop_size = None  # whole-image inference
model.sem_seg_head.num_classes = 7
model.sem_seg_head.channels = FPN_DIM
model.sem_seg_head.aux_channels = 32
model.sem_seg_head.norm = "BN"  # one process

# --- data --------------------------------------------------------------------------
# The training mapper (SafeDatasetMapper, from configs/common/data/ade20k.py) skips an unreadable
# image or label map and counts it in the skipped_images metric.
dataloader.train.dataset.names = "itpn_synthetic_sem_seg_train"
dataloader.test.dataset.names = "itpn_synthetic_sem_seg_val"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(CROP, 4 * CROP), max_size=8 * CROP, sample_style="range"),
    L(T.RandomCrop_CategoryAreaConstraint)(
        crop_type="absolute", crop_size=(CROP, CROP), single_category_max_area=0.75, ignored_category=255
    ),
    L(T.RandomFlip)(horizontal=True),
    L(PhotoMetricDistortion)(image_format="${...image_format}"),
]
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=256, max_size=512)]
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 2
dataloader.test.num_workers = 2
dataloader.evaluator = L(SemSegEvaluator)(
    dataset_name="${..test.dataset.names}",
    sem_seg_loading_fn=sem_seg_loading_fn,
    output_dir="${...train.output_dir}/inference",
)

# --- schedule ------------------------------------------------------------------------
train.init_checkpoint = ""  # random init; the demo passes the pre-training checkpoint
train.new_by_design_keys = []  # no relative position bias here: every backbone tensor from the file
train.output_dir = "./output/demo/segmentation"
train.device = "cpu"
train.seed = 0
train.amp.enabled = False
train.max_iter = MAX_ITER
train.eval_period = MAX_ITER
train.checkpointer.period = MAX_ITER
train.log_period = 20

optimizer.lr = 1e-3
optimizer.params.lr_factor_func.lr_decay_rate = 0.9
lr_multiplier.warmup_iters = "${itpn.div:${train.max_iter},10}"  # a tenth of the run, also when shortened
