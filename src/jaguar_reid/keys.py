"""Every config key, declared once: a dataclass per section, each field with its type, default,
role, one line of doc and its bounds or choices (`jaguar_reid.schema.key`).

`configs/default.yaml` and the key reference in docs/configuration.md are written from here
(`python tools/schema_docs.py`; a test fails when they differ). A module that implements a
choice reads its list from here (`choices("data.resize")`), so validation never depends on what
a process imported.

Adding a key is one declaration here. A `recipe` key added after folds were trained gives its
`neutral` value (the one that trains exactly as before), so finished folds keep their digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaguar_reid.key_checks import _plain_name, _three, _views, view_reason  # noqa: F401
from jaguar_reid.schema import AFTER, AUTO, RECIPE, RUNTIME, Key, collect, key, section

# The default recipe, as `configs/default.yaml` opens.
HEADER = """\
The competition recipe, and every key the pipeline knows with its one default (written from
src/jaguar_reid/keys.py by `python tools/schema_docs.py`: edit the keys there). Experiment
files name `base: default.yaml` and change a few keys; the command line changes more as
key=value (`bash train.sh fold=0 train.epochs=3`). A key that is not here is an error.
Roles: recipe (decides the trained weights), runtime (where and how fast), after (what
happens after training).

Recipe: EVA-02 Large 448 fine-tuned with GeM over patch tokens, a Linear+BatchNorm neck and an
ArcFace head (s=30, m=0.5), AdamW lr 2e-5, weight decay 1e-3, cosine schedule, batch 4 x
accumulation 4, mixed precision and gradient checkpointing (public write-ups: 0.92 private
identity-balanced mAP at 20 epochs; see docs/COMPETITION.md in the shared folder)."""

@dataclass(frozen=True)
class Data:
    """The competition's files and how an image becomes the model's input."""

    dir: str = key("input/jaguar-re-id", RUNTIME, "holds train.csv, test.csv, "
                   "sample_submission.csv; images anywhere beneath")
    img_size: int = key(448, RECIPE, "square input size of the model", ge=1)
    mean: list[float] = key(AUTO, RECIPE, "the backbone's own normalisation (timm's pretrained "
                            "config; EVA-02: CLIP's) or [r, g, b]; runs save the resolved "
                            "values", auto=True, check=_three)
    std: list[float] = key(AUTO, RECIPE, "as data.mean: auto or [r, g, b], each above 0",
                           auto=True, gt=0, check=_three)
    interpolation: str = key(AUTO, RECIPE, "resizing: auto (the backbone's); large downscales "
                             "use area either way (no aliasing)",
                             choices=(AUTO, "bilinear", "bicubic", "area", "nearest",
                                      "lanczos"))
    resize: str = key("auto", RECIPE, "auto: squash with an alpha mask, crop without | "
                      "squash (EVA-02's own eval) | letterbox (mean-colour padding) | crop "
                      "(short side, centre: full frames) | mask (a square around the mask; "
                      "letterbox without)",
                      choices=("auto", "squash", "letterbox", "crop", "mask"))
    num_workers: int = key(AUTO, RUNTIME, "DataLoader worker processes: auto (the CPU count, at "
                           "most 4) | N; 0: load in the main process", auto=True, ge=0)
    alpha: str = key("rgb", RECIPE, "rgb: whole image | crop: the mask's box | crop_fill / "
                     "crop_blur: box, background filled with data.fill / blurred",
                     choices=("rgb", "crop", "crop_fill", "crop_blur"))
    crop_margin: float = key(0.05, RECIPE, "crop grows the mask's box by this fraction of its "
                             "size on each side", ge=0)
    fill: list[int] = key([128, 128, 128], RECIPE, "crop_fill's background colour", ge=0,
                          le=255, check=_three)
    max_pixels: int = key(60_000_000, RUNTIME, "larger images are refused (decompression "
                          "bombs); jaguars are ~6M", ge=1)
    pseudo: str = key("", RECIPE, "a pseudo.csv (python -m jaguar_reid.pseudo): its test images "
                      "join each fold's training images under their pseudo identity (never the "
                      "validation side; only identities the fold trains on); digested by its "
                      "bytes", content=True)


@dataclass(frozen=True)
class Cache:
    """The preprocessing cache: each source image decoded once."""

    enabled: bool = key(True, RECIPE, "decode each source once into "
                        "<output_dir>/cache/<settings digest>/")
    size: int = key(0, RECIPE, "long side of cached images; 0: 1.25 x data.img_size", ge=0)
    workers: int = key(0, RUNTIME, "processes building it; 0: every CPU core", ge=0)


@dataclass(frozen=True)
class Folds:
    """The cross-validation split."""

    n_folds: int = key(5, RECIPE, "folds of the split", ge=2)
    strategy: str = key("closed", RECIPE, "closed: every identity in every fold, like the "
                        "competition's closed-set test (the only folds that can tune the "
                        "training gallery and prototypes) | grouped: identity-disjoint (open-set "
                        "checks, new-individual calibration)", choices=("closed", "grouped"))
    seed: int = key(42, RECIPE, "seed of the split", ge=0, le=2**32 - 1)
    file: str = key("", RUNTIME, "empty: folds/<data folder name>_<strategy>_<n>f_s<seed>.csv")
    dup_threshold: int = key(10, RECIPE, "near-duplicates (pHash bits apart, of 64) share a "
                             "fold; -1: off", ge=-1)


@dataclass(frozen=True)
class Model:
    """The network: timm backbone, pooling, neck and ArcFace head."""

    backbone: str = key("eva02_large_patch14_448.mim_m38m_ft_in22k_in1k", RECIPE,
                        "any timm model name")
    weights: str = key("", RECIPE, "local .safetensors/.pth/.bin in timm key names, digested by "
                       "its bytes; empty: see model.pretrained", content=True)
    pretrained: bool = key(False, RECIPE, "true: let timm fetch weights from its hub (needs the "
                           "internet)")
    allow_random_init: bool = key(False, RUNTIME, "a backbone with neither weights nor "
                                  "pretrained stops training (EVA-02 L from noise is a "
                                  "300M-parameter mistake); true: train it")
    gem_p: float = key(3.0, RECIPE, "GeM exponent at start (learnable)", gt=0)
    tokens: str = key("patches", RECIPE, "ViT: patches (GeM over patch tokens) | cls | both "
                      "(GeM of patches beside the class token); CNNs: ignored",
                      choices=("patches", "cls", "both"))
    neck_dropout: float = key(0.0, RECIPE, "dropout before the neck's Linear", ge=0, le=1)
    embed_dim: int = key(512, RECIPE, "the neck's output size", ge=1)
    retrieval: str = key("both", RECIPE, "embedding that is scored and submitted: backbone "
                         "= pooled features, both = side by side; every run logs all three out "
                         "of fold, and both was never below neck there so far",
                         choices=("neck", "backbone", "both"))
    arcface_s: float = key(30.0, RECIPE, "ArcFace scale", gt=0)
    arcface_m: float = key(0.5, RECIPE, "margin; with dynamic_margin, the rarest identity's",
                           ge=0)
    arcface_m_min: float = key(0.3, RECIPE, "dynamic_margin: the commonest identity's margin",
                               ge=0)
    dynamic_margin: bool = key(False, RECIPE, "per-identity margins from image counts "
                               "(n^-1/4, rarer = larger)")
    subcenters: int = key(1, RECIPE, ">1: sub-centre ArcFace with this many centres per "
                          "identity", ge=1)
    attention: str = key("none", RECIPE, "glam: global-local channel and spatial attention "
                         "on the feature map before GeM (Song, Han & Avrithis 2022)",
                         choices=("none", "glam"), neutral="none")
    glam_reduction: int = key(8, RECIPE, "glam: its spatial attention works on channels / this",
                              ge=1, neutral=8)
    grad_checkpointing: bool = key(True, RUNTIME, "recompute activations in the backward pass: "
                                   "less memory, same weights")


@dataclass(frozen=True)
class Train:
    """The optimisation of one fold."""

    epochs: int = key(20, RECIPE, "0: no training (the untouched backbone as each fold's "
                      "model)", ge=0)
    batch_size: int = key(4, RECIPE, "images per step per GPU; at least 2: BatchNorm needs two",
                          ge=2)
    grad_accum: int = key(4, RECIPE, "optimiser step every grad_accum batches", ge=1)
    lr: float = key(2.0e-5, RECIPE, "backbone learning rate", ge=0)
    head_lr: float = key(1.0e-3, RECIPE, "GeM, neck and ArcFace head: fresh layers learn "
                         "faster", ge=0)
    weight_decay: float = key(1.0e-3, RECIPE, "on weight matrices and kernels only, never on "
                              "norms and biases", ge=0)
    clip_grad: float = key(1.0, RECIPE, "max global gradient norm per optimiser step; 0: off",
                           ge=0)
    layer_decay: float = key(1.0, RECIPE, "backbone LR x layer_decay^(depth from the top); 1: "
                             "off", gt=0, le=1)
    freeze_epochs: int = key(0, RECIPE, "head-only warm-up: the backbone is frozen (eval mode) "
                             "this many epochs", ge=0)
    warmup_epochs: float = key(1.0, RECIPE, "linear LR warm-up, counted from when each part "
                               "starts training", ge=0)
    ema: bool = key(False, RECIPE, "exponential moving average of the weights, used to "
                    "validate and save")
    ema_decay: float = key(0.999, RECIPE, "EMA decay per step", gt=0, lt=1)
    amp: bool = key(True, RUNTIME, "mixed precision on a GPU (train.amp_dtype); CPU: fp32. "
                    "The machine's choice, at training and at submission alike")
    amp_dtype: str = key(AUTO, RUNTIME, "auto: bf16 where the GPU computes it natively "
                         "(compute capability 8.0+: A100, H100), else fp16 with a loss scaler "
                         "(Kaggle's T4)", choices=(AUTO, "bf16", "fp16"))
    compile: bool = key(False, RUNTIME, "torch.compile the training forward (GPU; first steps "
                        "are slow)")
    sync_bn: bool = key(True, RECIPE, "gpus>1 on CUDA: BatchNorm statistics over all GPUs' "
                        "batches")
    sampler: str = key("random", RECIPE, "pk: P identities x K images per batch (long tail; "
                       "the pair losses need it)", choices=("random", "pk"))
    pk_k: int = key(4, RECIPE, "K for the pk sampler; P = batch_size / K", ge=1)
    select: str = key("last", RECIPE, "weights kept as model.safetensors: last | best (by "
                      "validation)", choices=("last", "best"))
    monitor: str = key("map", RECIPE, "validation metric for best and early stopping",
                       choices=("pair_auc", "map"))
    early_stop: int = key(0, RECIPE, "stop after this many epochs without improvement; 0: off",
                          ge=0)
    freeze_bn: bool = key(True, RECIPE, "keep a pretrained backbone's BatchNorm statistics "
                          "(eval mode): small augmented batches wreck them (dog faces: test "
                          "mAP 0.44 -> 0.84 with it); no effect on EVA-02 (LayerNorm); turn off "
                          "from random init")
    bg_blank_prob: float = key(0.0, RECIPE, "paint the background black in this share of "
                               "training images (round 2)", ge=0, le=1)
    overwrite: bool = key(False, RUNTIME, "true: retrain a fold whose results already exist")
    init: str = key("", RECIPE, "start each fold from this experiment's same fold (head "
                    "included: the identities must match), e.g. a short fine-tune on "
                    "pseudo-labels (4th place: 5 epochs at lr 1e-5); digested by its folds' "
                    "digests; empty: model.weights", content=True)
    teacher: str = key("", RECIPE, "EXP[,EXP2]: train a student towards the teacher "
                       "ensemble's embedding on the training and, unlabelled, the test images; "
                       "no ArcFace. Train it with fold=full and submit.folds=full",
                       content=True)
    distill_loss: str = key("reg", RECIPE, "reg: 1 - cos(student, teacher) | contr_reg: + "
                            "asymmetric contrastive on the labelled images (Budnik & Avrithis "
                            "2021)", choices=("reg", "contr_reg"))
    distill_margin: float = key(0.5, RECIPE, "contr_reg: negatives are pushed below this "
                                "cosine", ge=-1, lt=1)
    metrix_alpha: float = key(0.0, RECIPE, "Metrix mixup for the pair losses, lam ~ Beta(alpha, "
                              "alpha) (SiMix for recall_k); 0: off; papers: 2 (Metrix), 1 "
                              "(SiMix)", ge=0, le=1000, neutral=0.0)


@dataclass(frozen=True)
class Loss:
    """Training losses, summed with these weights (0: off). The pair losses score the neck
    embeddings of a batch and need several images per identity in it (train.sampler=pk)."""

    arcface: float = key(1.0, RECIPE, "cross-entropy of the ArcFace head (model.arcface_*)",
                         ge=0, le=1e6, neutral=1.0)
    contrastive: float = key(0.0, RECIPE, "positives pulled to cosine 1, negatives below "
                             "contrastive_margin", ge=0, le=1e6, neutral=0.0)
    multi_similarity: float = key(0.0, RECIPE, "Wang et al. 2019 (ms_alpha, ms_beta, ms_base)",
                                  ge=0, le=1e6, neutral=0.0)
    smooth_ap: float = key(0.0, RECIPE, "Brown et al. 2020: 1 - smoothed AP per anchor", ge=0,
                           le=1e6, neutral=0.0)
    recall_k: float = key(0.0, RECIPE, "Patel et al. 2022: 1 - smoothed recall@k, averaged "
                          "over recall_ks", ge=0, le=1e6, neutral=0.0)
    contrastive_margin: float = key(0.5, RECIPE, "contrastive: negatives below this cosine",
                                    ge=-1, le=1, neutral=0.5)
    ms_alpha: float = key(2.0, RECIPE, "multi-similarity: positive scale", gt=0, neutral=2.0)
    ms_beta: float = key(50.0, RECIPE, "multi-similarity: negative scale", gt=0, neutral=50.0)
    ms_base: float = key(0.5, RECIPE, "multi-similarity: similarity offset", ge=-1, le=1,
                         neutral=0.5)
    smooth_ap_tau: float = key(0.01, RECIPE, "sigmoid temperature of the rank steps", gt=0,
                               neutral=0.01)
    recall_ks: list[int] = key([1, 2, 4, 8, 16], RECIPE, "the k of recall@k", ge=1,
                               min_items=1, neutral=[1, 2, 4, 8, 16])
    recall_tau1: float = key(0.01, RECIPE, "sigmoid temperature of the rank", gt=0,
                             neutral=0.01)
    recall_tau2: float = key(1.0, RECIPE, "sigmoid temperature of \"rank <= k\"", gt=0,
                             neutral=1.0)
    xbm_size: int = key(0, RECIPE, "cross-batch memory (embeddings of past batches as more "
                        "pairs) for contrastive and multi_similarity; 0: off; at least "
                        "train.batch_size", ge=0, neutral=0)


@dataclass(frozen=True)
class Aug:
    """Training augmentations (albumentations), each drawn per image."""

    crop_scale_min: float = key(0.7, RECIPE, "random resized crop keeps at least this fraction "
                                "of the image", gt=0, le=1)
    affine_p: float = key(0.5, RECIPE, "probability of rotation / scale / shear / shift", ge=0,
                          le=1)
    rotate: float = key(15.0, RECIPE, "degrees either way", ge=0)
    scale: float = key(0.1, RECIPE, "+-10% zoom", ge=0)
    shear: float = key(5.0, RECIPE, "degrees", ge=0)
    translate: float = key(0.05, RECIPE, "fraction of the side", ge=0)
    color_jitter: float = key(0.2, RECIPE, "brightness, contrast, saturation (+-); hue is never "
                              "changed", ge=0)
    color_p: float = key(0.8, RECIPE, "probability of the colour jitter", ge=0, le=1)
    blur_p: float = key(0.1, RECIPE, "Gaussian blur", ge=0, le=1)
    dropout_p: float = key(0.3, RECIPE, "coarse dropout: 1-4 holes of 5-15% of the side", ge=0,
                           le=1)
    hflip: float = key(0.0, RECIPE, "a mirrored left flank is not the right flank: off "
                       "(measured, see notes)", ge=0, le=1)


@dataclass(frozen=True)
class Embed:
    """Test-time embedding."""

    batch_size: int = key(16, RUNTIME, "images per forward pass", ge=1)
    tta: list[str] = key(["orig"], AFTER, "test-time views, each L2-normalised, then averaged: "
                         "orig | flip | zoom<f> (zoom1.15: 15% larger, centre crop; zoom0.9: "
                         "smaller, mean-padded) | flip_zoom<f>; pick them with python -m "
                         "jaguar_reid.tune", min_items=1, check=_views)


@dataclass(frozen=True)
class Post:
    """Post-processing of the test similarities; python -m jaguar_reid.tune picks these out of
    fold and saves them in <exp>/postprocess.json."""

    use_tuned: bool = key(True, AFTER, "submit.py takes <exp>/postprocess.json when it exists; "
                          "false: the keys below")
    qe_k: int = key(0, AFTER, "query expansion: each embedding -> mean of itself and its k "
                    "nearest; 0: off", ge=0)
    qe_alpha: float = key(0.0, AFTER, "alpha-QE: neighbour weights cos^alpha; 0: plain "
                          "average QE", ge=0)
    dba_k: int = key(0, AFTER, "database-side augmentation (same map, applied first); 0: off",
                     ge=0)
    rerank: bool = key(False, AFTER, "k-reciprocal re-ranking (Zhong et al. 2017)")
    k1: int = key(20, AFTER, "re-ranking's k1", ge=1)
    k2: int = key(6, AFTER, "re-ranking's k2 (local query expansion)", ge=1)
    # `lambda` is a Python keyword: the field is declared under another name (see _RENAMED).
    lambda_: float = key(0.3, AFTER, "weight of the original distance inside the re-ranked "
                         "distance", ge=0, le=1)
    rerank_norm: str = key("none", AFTER, "rowmax: each row of d divided by its maximum before "
                           "the weights and the blend, as the authors' code does",
                           choices=("none", "rowmax"))
    blend: float = key(1.0, AFTER, "final = blend * re-ranked + (1 - blend) * raw", ge=0, le=1)
    closed_gallery: bool = key(False, AFTER, "training images join the gallery for query "
                               "expansion and re-ranking")
    proto_weight: float = key(0.0, AFTER, "blend in the identity-prototype similarity; 0: off",
                              ge=0, le=1)
    proto_source: str = key("mean", AFTER, "mean: mean training embedding per identity | "
                            "arcface: the head's weights (neck embedding only)",
                            choices=("mean", "arcface"))
    proto_scale: float = key(30.0, AFTER, "softmax temperature: posteriors = softmax(scale * "
                             "cos to prototypes)", ge=0)
    local: bool = key(False, AFTER, "local-feature verification of each query's top pairs "
                      "(local.*), fused by a calibration only python -m jaguar_reid.tune fits")
    max_dense_gb: float = key(4.0, RUNTIME, "memory guard: estimated size of a dense N x N "
                              "re-ranking step", ge=0)
    on_large: str = key("sparse", RUNTIME, "past max_dense_gb: sparse (the same exact "
                        "re-ranking, pairs only) | stop", choices=("sparse", "stop"))
    knn_backend: str = key(AUTO, RUNTIME, "who screens neighbours for QE, DBA and sparse "
                           "re-ranking: torch | faiss (CPU) | auto (faiss on a CPU from 50,000 "
                           "images, else torch)", choices=(AUTO, "torch", "faiss"))


@dataclass(frozen=True)
class Tune:
    """python -m jaguar_reid.tune: a greedy search, step by step, on out-of-fold pairs."""

    metric: str = key("map", AFTER, "map (identity-balanced, the leaderboard's) | pair_auc",
                      choices=("pair_auc", "map"))
    per_identity: int = key(-1, AFTER, "score each fold on at most this many images per "
                            "identity; -1: the test's own density; 0: every validation image",
                            ge=-1)
    draws: int = key(3, AFTER, "seeded draws of those subsets per fold, scores averaged", ge=1,
                     le=1000)
    min_gain: float = key(0.001, AFTER, "a step is kept only when it raises the metric by more "
                          "than this (negative: every step kept)", ge=-1, le=1)
    noise: float = key(1.0, AFTER, "... and by more than this many standard errors of its "
                       "per-fold gains (demo: +0.006 out of fold that 1 fold in 5 contradicted "
                       "cost 0.03 on the test); 0: off", ge=0, le=100)
    views: list[str] = key(["flip", "zoom1.15", "zoom0.87"], AFTER, "candidate TTA views "
                           "beside orig", check=_views)
    qe_k: list[int] = key([1, 2, 3, 5], AFTER, "grid of post.qe_k", ge=0, min_items=1)
    qe_alpha: list[float] = key([0.0, 3.0], AFTER, "grid of post.qe_alpha", ge=0, min_items=1)
    dba: list[bool] = key([False, True], AFTER, "try DBA off and on", min_items=1)
    k1: list[int] = key([5, 10, 20, 40], AFTER, "grid of post.k1 (write-ups found k1 near 40 "
                        "best)", ge=1, min_items=1)
    k2: list[int] = key([1, 3, 6], AFTER, "grid of post.k2", ge=1, min_items=1)
    lambda_: list[float] = key([0.05, 0.1, 0.3, 0.6], AFTER, "grid of post.lambda (each k1, "
                               "k2 re-ranked once, every lambda a blend of the same two "
                               "distances)", ge=0, le=1, min_items=1)
    rerank_norm: list[str] = key(["none", "rowmax"], AFTER, "grid of post.rerank_norm",
                                 choices=("none", "rowmax"), min_items=1)
    blend: list[float] = key([0.25, 0.5, 0.75], AFTER, "grid of post.blend", ge=0, le=1,
                             min_items=1)
    proto_weight: list[float] = key([0.1, 0.25, 0.5], AFTER, "grid of post.proto_weight", ge=0,
                                    le=1, min_items=1)
    proto_scale: list[float] = key([10.0, 30.0], AFTER, "grid of post.proto_scale", ge=0,
                                   min_items=1)
    local: bool = key(False, AFTER, "true: try local verification as the last step (SIFT on "
                      "every validation image, cached; minutes on a CPU for the jaguars)")


@dataclass(frozen=True)
class Submit:
    """python submit.py: the submission file."""

    folds: str = key("all", AFTER, "which fold models to ensemble: all | 0..4 | 0,2 | full")
    retrieval: str = key("", AFTER, "the retrieval embedding at submission; empty: each "
                         "experiment's model.retrieval", choices=("", "neck", "backbone", "both"))
    ensemble: str = key("mean", AFTER, "folds and experiments: mean of normalised embeddings | "
                        "concat (cosine = mean of cosines; any dims) | similarity (mean of each "
                        "experiment's post-processed similarities)",
                        choices=("mean", "concat", "similarity"))
    weights: list[float] = key([], AFTER, "one weight per experiment of exps (empty: equal)",
                               ge=0, le=1e6)
    score_steps: bool = key(False, AFTER, "with test_labels.csv: also score every step of the "
                            "tuned search on the local test")
    file: str = key("", RUNTIME, "empty: submission.csv in the experiment's work folder")


@dataclass(frozen=True)
class Export:
    """python -m jaguar_reid.export exp=NAME out=DIR: a folder to carry the trained folds to
    another machine (a Kaggle dataset)."""

    dir: str = key("", RUNTIME, "the folder to write (out=DIR on the command line)")
    half: bool = key(False, AFTER, "weights stored in fp16: half the size (5 x 1.2 GB "
                      "for EVA-02 L)")
    onnx: bool = key(False, AFTER, "also one ONNX embedding model per fold (onnxruntime, camera "
                     "traps)")
    onnx_opset: int = key(17, AFTER, "ONNX opset version", ge=7)


@dataclass(frozen=True)
class Pseudo:
    """python -m jaguar_reid.pseudo exps=A[,B]: pseudo-labels for the test images, with a
    threshold chosen out of fold (closed folds)."""

    min_precision: float = key(0.98, AFTER, "keep the test images above the lowest confidence "
                               "whose out-of-fold precision (and every higher one's) reaches "
                               "this", gt=0, le=1)
    scale: float = key(30.0, AFTER, "posteriors = softmax(scale * cos to each training "
                       "identity's mean)", gt=0)
    file: str = key("", RUNTIME, "empty: pseudo.csv in the work folder of <exp> (or a+b)")


@dataclass(frozen=True)
class Local:
    """Local-feature verification (post.local / tune.local): keypoints inside the alpha mask,
    matched for each query's top pairs."""

    top_b: int = key(20, AFTER, "gallery images verified per query: N x top_b pairs, not N^2",
                     ge=1, le=10**6)
    extractor: str = key("sift", AFTER, "sift: OpenCV, no weights; disk: kornia, from "
                         "local.weights", choices=("sift", "disk"))
    weights: str = key("", AFTER, "DISK weight file (local path; nothing is ever downloaded)")
    matcher: str = key("ratio", AFTER, "ratio: mutual ratio test; lightglue: kornia, "
                       "from local.matcher_weights", choices=("ratio", "lightglue"))
    matcher_weights: str = key("", AFTER, "LightGlue weight file for DISK features (local "
                               "path)")
    max_side: int = key(512, AFTER, "working size: longer side in pixels (never upscaled)",
                        ge=16, le=10**6)
    max_keypoints: int = key(512, AFTER, "strongest keypoints kept per image", ge=1, le=10**6)
    mask_erode: int = key(5, AFTER, "pixels the alpha mask is eroded by (no keypoints on the "
                          "silhouette)", ge=0, le=10**6)
    ratio: float = key(0.8, AFTER, "Lowe's ratio test (mutual nearest neighbours)", ge=1e-6,
                       le=1)
    min_matches: int = key(8, AFTER, "fewer matches: 0 inliers, no geometry fitted", ge=4,
                           le=10**6)
    ransac_threshold: float = key(0.02, AFTER, "inlier distance, as a fraction of the image's "
                                  "longer side", ge=1e-6, le=1)
    method: str = key("magsac", AFTER, "OpenCV's robust estimators",
                      choices=("magsac", "ransac"))
    model: str = key("homography", AFTER, "the geometry fitted to the matches",
                     choices=("homography", "affine", "fundamental"))
    fusion: str = key("logistic", AFTER, "the calibration of (similarity, inliers) fitted out of "
                      "fold", choices=("logistic", "isotonic"))
    workers: int = key(1, RUNTIME, "threads matching pairs", ge=1, le=10**6)


@dataclass(frozen=True)
class Floor:
    """The plain frozen floor beside every score: the untouched backbone through timm's own
    eval transform, average pooling, cosine."""

    enabled: bool = key(True, AFTER, "score the floor out of fold and on a labelled test")


@dataclass(frozen=True)
class Report:
    """output/<exp>/report/ (HTML + PNG + Markdown), after training and submit.py."""

    enabled: bool = key(True, AFTER, "write the report")
    worst_queries: int = key(6, AFTER, "retrieval strips for this many worst out-of-fold "
                             "queries", ge=0)
    top_k: int = key(8, AFTER, "gallery images shown beside each of those queries", ge=1)
    local_matches: int = key(2, AFTER, "with tune.local or post.local: this many top candidates "
                             "of each worst query drawn with their matched keypoints", ge=0)
    rank_by: str = key("oof_map", AFTER, "output/leaderboard.csv column python -m "
                       "jaguar_reid.leaderboard ranks by")
    tensorboard: bool = key(False, AFTER, "training also writes TensorBoard event files to "
                            "<exp>/tensorboard/fold<k>/ (per-step loss and learning rate, per-"
                            "epoch validation metrics); needs the extra tensorboard")


@dataclass(frozen=True)
class Sweep:
    """python -m jaguar_reid.sweep: a grid of recipes trained one after another, ranked out of
    fold with their noise (docs/sweep.md)."""

    name: str = key("", RUNTIME, "output/sweeps/<name>/ holds the table and plot; the runs are "
                    "experiments <name>-<changed keys>; empty: the config's exp",
                    check=lambda v: _plain_name(v) if v else None)
    baseline: str = key("zero", AFTER, "the run every other is paired against (same folds and "
                        "seeds): zero (train.epochs=0), floor (the plain frozen floor) or a "
                        "run's name as the table prints it")
    tune: bool = key(False, AFTER, "also tune each run out of fold (python -m jaguar_reid.tune) "
                     "and show its tuned mAP beside the raw one")
    test: bool = key(True, AFTER, "where test_labels.csv exists: also submit each run on its "
                     "folds and show the local test mAP (shown, never used to rank)")
    dry_run: bool = key(False, RUNTIME, "print the runs the grid makes and stop")
    table_only: bool = key(False, RUNTIME, "write the table and plot from the runs finished so "
                           "far (another sweep may still be running them) and start nothing")


@dataclass(frozen=True)
class Identify:
    """jaguar-reid identify PHOTO_OR_FOLDER ... models=PATH: the known individual each
    photo shows, or a new one, with probabilities and a threshold fitted out of fold by python -m
    jaguar_reid.identify.calibrate (docs/identify.md)."""

    target: str = key("max_false_new", AFTER, "what the new-individual threshold is chosen for "
                      "out of fold: max_false_new (known individuals called new at most that "
                      "often) | min_precision (named photos right at least that often)",
                      choices=("max_false_new", "min_precision"))
    max_false_new: float = key(0.05, AFTER, "target max_false_new: the share of a known "
                               "individual's photos called new", gt=0, lt=1)
    min_precision: float = key(0.95, AFTER, "target min_precision: the share of named photos "
                               "given the right name, new individuals at identify.new_share",
                               gt=0, le=1)
    new_share: float = key(0.5, AFTER, "the share of photos expected to show new individuals: "
                           "the prior of the probabilities and of min_precision (0.5: "
                           "AnimalCLEF's balance of known and unknown)", gt=0, lt=1)
    closed_exp: str = key("", AFTER, "calibration: the experiment on closed folds whose "
                          "out-of-fold queries are known individuals; empty: exp, when its "
                          "folds are closed")
    grouped_exp: str = key("", AFTER, "calibration: the experiment on grouped folds whose "
                           "out-of-fold queries are new individuals; empty: exp, when its folds "
                           "are grouped (without one the new-individual rates stay unmeasured)")
    score: str = key("nearest", AFTER, "an individual's similarity to a photo: nearest (its "
                     "closest gallery photo) | prototype (the mean of its gallery photos)",
                     choices=("nearest", "prototype"))
    top_k: int = key(5, AFTER, "candidate individuals listed per photo", ge=1, le=1000)
    gallery: str = key("", AFTER, "labelled photos added to the experiment's training images "
                       "without retraining: a folder of <identity>/ folders, or a CSV of "
                       "filename,ground_truth (names relative to it)")
    local: bool = key(False, AFTER, "match keypoints (local.*) of each photo and each "
                      "candidate's closest gallery photo: drawn on the page, inlier counts in "
                      "the CSV; the probabilities do not use them")
    out: str = key("", RUNTIME, "the folder of identify.csv and identify.html; empty: "
                   "<output_dir>/<exp>/identify/")


@dataclass(frozen=True)
class Settings:
    """The whole config."""

    exp: str = key("eva02l_448", RUNTIME, "outputs go to <output_dir>/<exp>/",
                   check=_plain_name)
    exps: str = key("", RUNTIME, "submit.py / python -m jaguar_reid.tune: ensemble of "
                    "experiments, e.g. exps=a,b,c")
    output_dir: str = key("output", RUNTIME, "the work folder: cache, tuning, submissions, "
                          "reports, leaderboard")
    models: str = key("", RUNTIME, "where trained folds are read (submit.py, tune, report): an "
                      "experiment folder, or a folder of <exp>/ folders (read-only is fine); "
                      "empty: <output_dir>/<exp>/")
    models_verify: bool = key(True, RUNTIME, "with models=PATH the experiment must carry its "
                              "export's manifest.json, every file's size and sha256 checked "
                              "(damaged or mixed copies; not a deliberate edit: it is unsigned); "
                              "false: read a folder without one")
    seed: int = key(42, RECIPE, "seed of training (batches, augmentations, initialisation)",
                    ge=0, le=2**32 - 1)
    fold: str = key("all", RUNTIME, "train.sh: 0 | 0..4 | 0,2 | full (all images, no "
                    "validation) | all")
    device: str = key(AUTO, RUNTIME, "auto (CUDA when present) | cpu | cuda | cuda:1")
    gpus: int = key(1, RECIPE, ">1: several processes (torchrun; gloo on CPU, NCCL on CUDA); "
                    "one optimiser step takes batch_size x gpus x grad_accum images", ge=1)
    parallel: str = key("data", RUNTIME, "with gpus>1: data (one fold data-parallel) | folds "
                        "(one fold per GPU)", choices=("data", "folds"))
    data: Data = section(Data)
    cache: Cache = section(Cache)
    folds: Folds = section(Folds)
    model: Model = section(Model)
    train: Train = section(Train)
    loss: Loss = section(Loss)
    aug: Aug = section(Aug)
    embed: Embed = section(Embed)
    post: Post = section(Post)
    tune: Tune = section(Tune)
    submit: Submit = section(Submit)
    export: Export = section(Export)
    pseudo: Pseudo = section(Pseudo)
    local: Local = section(Local)
    floor: Floor = section(Floor)
    report: Report = section(Report)
    sweep: Sweep = section(Sweep)
    identify: Identify = section(Identify)


# Field names that are Python keywords, declared with a trailing underscore.
_RENAMED = {"lambda_": "lambda"}


def _public(name: str) -> str:
    parts = name.split(".")
    return ".".join(_RENAMED.get(p, p) for p in parts)


def specs_of(root: type) -> dict[str, Key]:
    """Every key declared under `root` by its public dotted name (`post.lambda`)."""
    out = {}
    for name, spec in collect(root).items():
        public = _public(name)
        out[public] = Key(**{**spec.__dict__, "name": public})
    return out


SPECS: dict[str, Key] = specs_of(Settings)  # every key by its dotted name, in declaration order
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(n.split(".")[0] for n in SPECS if "." in n))


def choices(dotted: str) -> tuple:
    """The values key `dotted` may take (for the module that implements them)."""
    return SPECS[dotted].choices


def default(dotted: str) -> Any:
    """A key's default (a fresh copy of a list)."""
    value = SPECS[dotted].default
    return list(value) if isinstance(value, list) else value


def defaults() -> dict:
    """The nested plain dict of every default."""
    out: dict = {}
    for name in SPECS:
        node = out
        *parents, last = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = default(name)
    return out
