"""Accuracy vs honest FLOPs on full Fashion-MNIST: manidp against static L1 pruning and ablations.

Every arm starts from one dense network (``--model``, resnet18 by default; in_chans=1, 10
classes) and gets the same optimiser budget: 3 epochs of ``budget / 3`` images (a fresh random
subset each epoch), batch 128 (``--batch``), SGD Nesterov, cosine learning rate from ``--lr``. Arms:

- ``manidp``: the default recipe (recipes/default.yaml); ``paper``: recipes/paper.yaml (method.md's
  procedure); ``no_similarity`` / ``no_complexity``: the default without the similarity term /
  with uniform sparsity weights (plain L1 gating);
- ``static``: torch-pruning's L1-norm structured pruning to the same FLOPs
  (``manidp_cli.runtime.static_l1``: one ratio for every group, bisected; classifier kept), then
  the same fine-tune with cross-entropy; ``static_kd``: the same fine-tune
  with the default's distillation (weight 1, T = 4), so that the comparison stays fair;
  ``static_fkd``: ``static_kd`` plus distillation of the stage outputs (weight 5, the
  ``feature_distill5`` arm's) on the teacher channels each slimmed stage keeps; ``static_inner``:
  static L1 with cross-entropy, pruning only the residual blocks' inner widths (residual streams,
  stem and shortcuts whole: the shape of the cut manidp's output gates make);
- ``dense``: the start fine-tuned without pruning, the ceiling; ``dense_kd``: the same with the
  default's distillation (from the start itself), the ceiling of the distilled arms;
- ``static_kd_tuned`` / ``hybrid_kd_tuned`` / ``narrow_kd_tuned`` / ``narrow_fd5_kd_tuned``:
  ``static_kd``, recipes/hybrid.yaml with the default's distillation, the default and ``narrow_fd5``,
  each taught by the ``dense`` arm's network of the same budget (seed 0, ``--lr``) instead of the
  start, which has to be measured first: a teacher ahead of its students, as a converged checkpoint is.

FLOPs are honest for every arm: fvcore on the slimmed model (static), manidp's count with the gates'
own cost included (dynamic; docs/gating.md). Each finished arm is written to
``<work>/arms/<key>.json`` (key = every setting of the arm), so an interrupted run resumes; an arm
stopped part-way (Ctrl-C) continues from ``<work>/runs/<key>/checkpoint.pt``; arms run in order of
importance (``plan``). The summary JSON, plot and table are rebuilt from whatever has
finished; in a fresh checkout the arms of the committed summary are put back in the cache first
(``restore_cache``), once the dense start, retrained, is shown to be the same. Needs Debian's
dataset-fashion-mnist and ``pip install torch-pruning``::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_vs_flops.py            # everything (many hours)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_vs_flops.py --budgets 18000 --targets 0.3
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_vs_flops.py --quick    # smoke check
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_vs_flops.py --report-only  # summary of finished arms
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from manidp_cli.analysis.evaluation import evaluate
from manidp_cli.api.jobs import CHECKPOINT_FILE, prepare, run
from manidp_cli.config import GatePolicy, OptimizerConfig, load_recipe
from manidp_cli.core.features import stage_names
from manidp_cli.core.gating import insert_gates
from manidp_cli.data import load_data
from manidp_cli.errors import TargetError, TrainingError
from manidp_cli.files import atomic_write_bytes, atomic_write_text
from manidp_cli.models.factory import create_model
from manidp_cli.runtime.static_l1 import StaticCriterion, stage_channels, static_l1
from manidp_cli.training.checkpoint import load_checkpoint
from manidp_cli.training.engine import fit
from manidp_cli.training.objectives import CrossEntropyObjective, Distilled
from manidp_cli.training.precision import teacher_dtype

DEFAULT_MODEL = "resnet18"
ROOT = Path(__file__).resolve().parent
RECIPES = ROOT.parent / "recipes"
CODEBOOK4 = {"entries": 4, "channel_multiple": 16, "epochs": 1, "fit_widths": True}
# mobilenetv2_050 at 32 px: the gates costing more than a quarter of the FLOPs they decide
MBV2_COSTLY_GATES = ["conv_head", "blocks.5.1.conv_pw", "blocks.5.2.conv_pw", "blocks.6.0.conv_pw"]
# the default's first cut held: the gates' rate scaled by 1e-9 (the recipe needs a positive one), cross-entropy only
FROZEN_GATES = {
    "optimizer": {"gate_lr_scale": 1e-9},
    "loss": {"distill_weight": 0.0, "lambda_sparse": 0.0, "lambda_sim": 0.0},
}

# the gates on an Adam of their own at the rate that measured best on mobilenetv2_050 (docs/results.md)
ADAM_GATES = {"gate_optimizer": "adam", "gate_lr_scale": 0.005}
FEATURE_DISTILL = 5.0  # static_fkd: the stage-output weight of the feature_distill5 arm
# static_fkd's distillation (logits and stage outputs) as a recipe's loss section
FKD_LOSS = {"distill_weight": 1.0, "feature_distill_weight": FEATURE_DISTILL}


HYBRID_FKD_SHARES = {"0125": 0.125, "025": 0.25, "0375": 0.375, "075": 0.75}


def _hybrid_fkd(static_share: float, extra: dict | None = None) -> tuple[str, dict]:
    """recipes/hybrid.yaml with ``static_share``, static_fkd's distillation (``FKD_LOSS``) and the
    recipe sections in ``extra``."""
    return "hybrid.yaml", {"narrow_training": True, "static_share": static_share, "loss": FKD_LOSS, **(extra or {})}


def _gate_arms(suffix: str, gates: dict) -> dict[str, tuple[str, dict]]:
    """Today's default with the gate settings ``gates``: as it is, with the gates learning at a tenth of
    the network's rate, and with its first cut held (``FROZEN_GATES``)."""
    return {
        f"narrow_{suffix}": ("default.yaml", {"narrow_training": True, "gates": gates}),
        f"narrow_gate_lr01_{suffix}": (
            "default.yaml",
            {"narrow_training": True, "optimizer": {"gate_lr_scale": 0.1}, "gates": gates},
        ),
        f"narrow_ce_frozen_gates_{suffix}": ("default.yaml", {"narrow_training": True, "gates": gates, **FROZEN_GATES}),
    }


# arm -> (recipe, recipe overrides). Every arm trains masked (narrow_training false: each gated
# convolution computes all its channels, the dropped ones multiplied by zero) unless it sets
# narrow_training itself: the cells of "manidp" and the other arms were measured that way before the
# default recipe switched to narrow training, so "narrow" is today's default recipe.
MANIDP_ARMS = {
    "manidp": ("default.yaml", {}),
    "paper": ("paper.yaml", {}),
    "no_similarity": ("default.yaml", {"loss": {"lambda_sim": 0.0}}),
    "no_complexity": ("default.yaml", {"loss": {"complexity_weighting": False}}),
    # candidate changes to the default, each measured against it before it becomes the default
    "input_gates": ("default.yaml", {"gates": {"inputs": True}}),
    "input_gates_r8": ("default.yaml", {"gates": {"inputs": True, "reduction": 8}}),
    "gate_reduction8": ("default.yaml", {"gates": {"reduction": 8}}),
    "gate_reduction16": ("default.yaml", {"gates": {"reduction": 16}}),
    "feedback_every1": ("default.yaml", {"schedule": {"feedback_every": 1}}),
    "no_sparsity": ("default.yaml", {"loss": {"lambda_sparse": 0.0}}),
    "distill_only": ("default.yaml", {"loss": {"lambda_sparse": 0.0, "lambda_sim": 0.0}}),
    "gate_lr10": ("default.yaml", {"optimizer": {"gate_lr_scale": 10.0}}),
    "ramp30": ("default.yaml", {"schedule": {"ramp": 0.3}}),
    "allocation05": ("default.yaml", {"schedule": {"allocation": 0.5}}),
    "allocation1": ("default.yaml", {"schedule": {"allocation": 1.0}}),
    "no_distill": ("default.yaml", {"loss": {"distill_weight": 0.0}}),
    # cross-entropy alone (no distillation, no sparsity or similarity term; the thresholds still meet the
    # target): what the gates cost a long fine-tune when nothing but the task trains them, trained narrow
    "narrow_ce_only": (
        "default.yaml",
        {"narrow_training": True, "loss": {"distill_weight": 0.0, "lambda_sparse": 0.0, "lambda_sim": 0.0}},
    ),
    # the same with the gates held at their static start (gate learning rate scaled by 1e-9; the recipe
    # needs a positive one): every image keeps the channels of the filter-L1 cut, so the arm is static
    # pruning inside manidp's loop, and its difference from narrow_ce_only is what learned routing adds
    "narrow_ce_frozen_gates": (
        "default.yaml",
        {
            "narrow_training": True,
            "optimizer": {"gate_lr_scale": 1e-9},
            "loss": {"distill_weight": 0.0, "lambda_sparse": 0.0, "lambda_sim": 0.0},
        },
    ),
    # recipes/hybrid.yaml as shipped: its static stage (recipe static_share) runs inside `manidp prune`
    "hybrid_recipe": ("hybrid.yaml", {"narrow_training": True}),
    # the same with a quarter and three quarters of the cut (in log FLOPs) made statically
    "hybrid_recipe_s025": ("hybrid.yaml", {"narrow_training": True, "static_share": 0.25}),
    "hybrid_recipe_s075": ("hybrid.yaml", {"narrow_training": True, "static_share": 0.75}),
    # recipes/hybrid.yaml with the gates started from |gamma| / sigma (the lift on resnet34 at 18,000 images)
    "hybrid_recipe_bn_scale": ("hybrid.yaml", {"narrow_training": True, "gates": {"init": "bn_scale"}}),
    # and with its static stage ranked by the first-order Taylor score (the lift of static_taylor)
    "hybrid_recipe_taylor_static": ("hybrid.yaml", {"narrow_training": True, "static_criterion": "taylor"}),
    "hybrid_recipe_bn_scale_taylor_static": (
        "hybrid.yaml",
        {"narrow_training": True, "static_criterion": "taylor", "gates": {"init": "bn_scale"}},
    ),
    # recipes/hybrid.yaml with the default's distillation (from the full-width start, or a tuned teacher)
    "hybrid_recipe_kd": ("hybrid.yaml", {"narrow_training": True, "loss": {"distill_weight": 1.0}}),
    # the same with static_fkd's stage-output distillation (on the teacher channels the static stage keeps)
    "hybrid_recipe_fkd": ("hybrid.yaml", {"narrow_training": True, "loss": FKD_LOSS}),
    # hybrid_recipe_fkd with other shares of the cut (in log FLOPs) made statically; s025 is hybrid-distill.yaml
    **{f"hybrid_recipe_s{tag}_fkd": _hybrid_fkd(share) for tag, share in HYBRID_FKD_SHARES.items()},
    # hybrid-distill with the gates' cut reached along a cosine over 30% of the steps instead of at once
    "hybrid_recipe_s025_fkd_ramp30": _hybrid_fkd(0.25, {"schedule": {"ramp": 0.3}}),
    # hybrid-distill with a linear learning-rate warm-up over the first tenth of the steps (0.3 of 3 epochs)
    "hybrid_recipe_s025_fkd_warmup03": _hybrid_fkd(0.25, {"optimizer": {"warmup_epochs": 0.3}}),
    # hybrid-distill with the thresholds moved every second step: at batch 64 each move then sees the
    # 128 images one move sees at batch 128, and the moving averages remember as many images
    "hybrid_recipe_s025_fkd_every2": _hybrid_fkd(0.25, {"schedule": {"feedback_every": 2}}),
    # hybrid-distill with its gates held at their first cut (the thresholds still follow the FLOPs): what
    # learning the gates adds over the importance start
    "hybrid_recipe_s025_fkd_frozen_gates": _hybrid_fkd(0.25, {"optimizer": FROZEN_GATES["optimizer"]}),
    # hybrid-distill with the stage outputs distilled at twice the weight
    "hybrid_recipe_s025_fkd10": _hybrid_fkd(0.25, {"loss": {**FKD_LOSS, "feature_distill_weight": 10.0}}),
    # hybrid-distill with cost-weighted per-layer rates (schedule.allocation; 0.5 held on 3 seeds of the
    # default at 0.30 on resnet18's first start) and with the gates' first cut by |gamma| / sigma
    "hybrid_recipe_s025_fkd_alloc05": _hybrid_fkd(0.25, {"schedule": {"allocation": 0.5}}),
    "hybrid_recipe_s025_fkd_alloc1": _hybrid_fkd(0.25, {"schedule": {"allocation": 1.0}}),
    "hybrid_recipe_s025_fkd_bn_scale": _hybrid_fkd(0.25, {"gates": {"init": "bn_scale"}}),
    # hybrid-distill ranking channels by the first-order Taylor estimate on the calibration images
    # (core/taylor.py, runtime/static_l1.py) instead of filter L1: the gates' first cut, the static
    # stage's, and both
    "hybrid_recipe_s025_fkd_taylor_gates": _hybrid_fkd(0.25, {"gates": {"init": "taylor"}}),
    "hybrid_recipe_s025_fkd_taylor_static": _hybrid_fkd(0.25, {"static_criterion": "taylor"}),
    "hybrid_recipe_s025_fkd_taylor": _hybrid_fkd(0.25, {"static_criterion": "taylor", "gates": {"init": "taylor"}}),
    # the gates' first cut by |gamma| / sigma with the static stage by Taylor (also with more of the cut
    # static: Taylor was the better static ranking at 0.15 on resnet34), or by |gamma| too
    **{
        f"hybrid_recipe_s{tag}_fkd_bn_scale_taylor_static": _hybrid_fkd(
            HYBRID_FKD_SHARES[tag], {"static_criterion": "taylor", "gates": {"init": "bn_scale"}}
        )
        for tag in ("025", "0375", "075")
    },
    "hybrid_recipe_s025_fkd_bn_scale_both": _hybrid_fkd(
        0.25, {"static_criterion": "bn_scale", "gates": {"init": "bn_scale"}}
    ),
    # the default (manifold regulariser and distillation kept) with hybrid_recipe_s025_fkd's static quarter of
    # the cut and its stage-output distillation: that arm's gain without dropping method.md's loss
    "narrow_s025_fd5": (
        "default.yaml",
        {"narrow_training": True, "static_share": 0.25, "loss": {"feature_distill_weight": FEATURE_DISTILL}},
    ),
    # the same (no distillation) with the gates learning at a tenth of the rate (depthwise networks)
    "hybrid_recipe_gate_lr01": ("hybrid.yaml", {"narrow_training": True, "optimizer": {"gate_lr_scale": 0.1}}),
    # today's default without distillation (the hybrid arms' second half: their start is no teacher)
    "narrow_no_distill": ("default.yaml", {"narrow_training": True, "loss": {"distill_weight": 0.0}}),
    # input gates on the residual stream (each block's first convolution skips stream channels per image):
    # the stream channels static pruning removes, which output gates cannot (static_inner measured the
    # cost of keeping them at 180,000 images)
    "narrow_input_gates": ("default.yaml", {"narrow_training": True, "gates": {"inputs": True}}),
    # distillation weighted 3 and 10 times the cross-entropy (the default: 1): how much the short fine-tune
    # owes to the teacher
    "narrow_kd3": ("default.yaml", {"narrow_training": True, "loss": {"distill_weight": 3.0}}),
    "narrow_kd10": ("default.yaml", {"narrow_training": True, "loss": {"distill_weight": 10.0}}),
    # the ablations of today's default (trained narrow): without the similarity term, and with
    # every image's sparsity weighted alike (no complexity weighting)
    "narrow_no_similarity": ("default.yaml", {"narrow_training": True, "loss": {"lambda_sim": 0.0}}),
    "narrow_no_complexity": ("default.yaml", {"narrow_training": True, "loss": {"complexity_weighting": False}}),
    # a weaker static start: more room for per-image routing (docs/results.md, "How dynamic the default is")
    "init_strength03": ("default.yaml", {"gates": {"init_strength": 0.3}}),
    # gates fitted before training to each channel's per-image response (manidp_cli/core/routing_init.py)
    "routing_init03": ("default.yaml", {"gates": {"routing_init": 0.3}}),
    "routing_init015": ("default.yaml", {"gates": {"routing_init": 0.15}}),
    "init03_alloc05": ("default.yaml", {"gates": {"init_strength": 0.3}, "schedule": {"allocation": 0.5}}),
    # the two changes that each held on 3 seeds at 0.30 (+0.15 and +0.13 over the default), together
    "alloc05_plain": ("default.yaml", {"schedule": {"allocation": 0.5}, "loss": {"complexity_weighting": False}}),
    # the first cut by |gamma| / sigma of each channel's normalisation instead of its filter's L1 norm
    "init_bn_scale": ("default.yaml", {"gates": {"init": "bn_scale"}}),
    # distillation only where the teacher fits the image better: fades once the student outgrows it
    "distill_teacher_better": ("default.yaml", {"loss": {"distill_where": "teacher_better"}}),
    # distillation only while the teacher's running training accuracy is above the student's
    "distill_teacher_ahead": ("default.yaml", {"loss": {"distill_where": "teacher_ahead"}}),
    # the stage outputs distilled too: full-width residual streams match the dense teacher's
    "feature_distill": ("default.yaml", {"loss": {"feature_distill_weight": 1.0}}),
    "feature_distill5": ("default.yaml", {"loss": {"feature_distill_weight": 5.0}}),
    "feature_distill20": ("default.yaml", {"loss": {"feature_distill_weight": 20.0}}),
    # distillation fading linearly to nothing over the run
    "distill_linear": ("default.yaml", {"loss": {"distill_decay": "linear"}}),
    # gather-free execution (docs/speed.md): 4 keep-sets per layer, learned for the last epoch
    # (fit_widths named, although the recipe's default: the arms run before it existed rounded only)
    "codebook4": ("default.yaml", {"codebook": CODEBOOK4}),
    # the same with the stage outputs distilled (feature_distill5's loss): for the speed benchmark
    "codebook4_fd5": ("default.yaml", {"codebook": CODEBOOK4, "loss": {"feature_distill_weight": 5.0}}),
    # gated convolutions computing only the batch's kept channels (core.narrow): the step's cost
    "narrow": ("default.yaml", {"narrow_training": True}),
    # depthwise networks: every depthwise convolution deciding with a gate of its own, the default
    # before depthwise: follow (a depthwise convolution keeps its gated producer's channels)
    "narrow_depthwise_gate": ("default.yaml", {"narrow_training": True, "gates": {"depthwise": "gate"}}),
    # the gates learning at a tenth of the network's rate: measured to keep depthwise networks from
    # diverging at the default rate on the embedded data
    "narrow_gate_lr01": ("default.yaml", {"narrow_training": True, "optimizer": {"gate_lr_scale": 0.1}}),
    "narrow_gate_lr001": ("default.yaml", {"narrow_training": True, "optimizer": {"gate_lr_scale": 0.01}}),
    "narrow_gate_lr01_no_similarity": (
        "default.yaml",
        {"narrow_training": True, "optimizer": {"gate_lr_scale": 0.1}, "loss": {"lambda_sim": 0.0}},
    ),
    # MobileNetV2's head convolution (1x1 to 1280 channels, then pooling and the classifier): its gate
    # took most of the gradient at the first step on a mobilenetv2_050 start (fc2 weights 10.9 of 11.5)
    "narrow_gate_lr01_no_head": (
        "default.yaml",
        {"narrow_training": True, "optimizer": {"gate_lr_scale": 0.1}, "gates": {"exclude": ["conv_head"]}},
    ),
    # gate cost on depthwise networks at 32 px (a gate runs per image, its convolution per position):
    # narrower gates everywhere, the cost cap (gates.max_cost), and the gates that cost more than a
    # quarter of the FLOPs they decide left out (mobilenetv2_050: the head and the last three expansions)
    **_gate_arms("r16", {"reduction": 16}),
    **_gate_arms("r32", {"reduction": 32}),
    **_gate_arms("r64", {"reduction": 64}),
    **_gate_arms("r2048", {"reduction": 2048}),  # one hidden unit in every gate
    **_gate_arms("cost003", {"max_cost": 0.03}),
    **_gate_arms("cheap_gates", {"exclude": MBV2_COSTLY_GATES}),
    # inverted-residual projections ungated: their outputs join the residual stream, which Torch-Pruning
    # cuts as one group and manidp's output gates cut per block
    **_gate_arms("no_projection_gates", {"exclude": ["*.conv_pwl"]}),
    # input gates on the residual stream: each expansion skips stream channels per image, the cut
    # Torch-Pruning makes statically
    **_gate_arms("input_gates", {"inputs": True}),
    # saliencies capped near their start (mobilenetv2_050's largest initial saliency: 3.05): whether
    # the gates' collapse at the full rate comes from saliencies growing
    **_gate_arms("max_saliency4", {"max_saliency": 4.0}),
    # saliencies through softplus, never exactly 0: whether the collapse at the full rate is channels
    # whose saliency a few large steps push below 0, where relu leaves them no gradient to come back
    **_gate_arms("softplus", {"activation": "softplus"}),
    # the gates stepped by an Adam of their own (optimizer.gate_optimizer): steps of about its learning
    # rate (here 0.05 x the scale) whatever the size of the gates' gradient
    **{
        f"narrow_gate_adam{tag}": (
            "default.yaml",
            {"narrow_training": True, "optimizer": {"gate_optimizer": "adam", "gate_lr_scale": scale}},
        )
        for tag, scale in (("002", 0.02), ("0005", 0.005), ("01", 0.1))
    },
    # the default's loss (distillation included) with the gates held at their first cut: what learning
    # them adds under the same loss
    "narrow_frozen_gates": ("default.yaml", {"narrow_training": True, "optimizer": {"gate_lr_scale": 1e-9}}),
    # recipes/hybrid.yaml (half the cut by static L1, which cuts the residual stream as one group) with
    # the gates on Adam, without and with the default's distillation
    "hybrid_recipe_gate_adam0005": ("hybrid.yaml", {"narrow_training": True, "optimizer": ADAM_GATES}),
    "hybrid_recipe_kd_gate_adam0005": (
        "hybrid.yaml",
        {"narrow_training": True, "optimizer": ADAM_GATES, "loss": {"distill_weight": 1.0}},
    ),
    # the same cap with the gates' gradient norm clipped (optimizer.gate_grad_clip) at the full gate rate
    "narrow_cost003_gclip01": (
        "default.yaml",
        {"narrow_training": True, "gates": {"max_cost": 0.03}, "optimizer": {"gate_grad_clip": 0.1}},
    ),
    "narrow_cost003_gclip1": (
        "default.yaml",
        {"narrow_training": True, "gates": {"max_cost": 0.03}, "optimizer": {"gate_grad_clip": 1.0}},
    ),
    "narrow_gate_lr01_cost001": (
        "default.yaml",
        {"narrow_training": True, "optimizer": {"gate_lr_scale": 0.1}, "gates": {"max_cost": 0.01}},
    ),
    "narrow_gate_lr01_cost003_alloc05": (
        "default.yaml",
        {
            "narrow_training": True,
            "gates": {"max_cost": 0.03},
            "optimizer": {"gate_lr_scale": 0.1},
            "schedule": {"allocation": 0.5},
        },
    ),
    "hybrid_recipe_gate_lr01_cost003": (
        "hybrid.yaml",
        {"narrow_training": True, "gates": {"max_cost": 0.03}, "optimizer": {"gate_lr_scale": 0.1}},
    ),
    "narrow_fd5": ("default.yaml", {"narrow_training": True, "loss": {"feature_distill_weight": 5.0}}),
    # the same with gates started from |gamma| / sigma, which lifted hybrid-distill on resnet34
    "narrow_fd5_bn_scale": (
        "default.yaml",
        {"narrow_training": True, "loss": {"feature_distill_weight": 5.0}, "gates": {"init": "bn_scale"}},
    ),
    # cost-weighted per-layer rates (allocation05, which led the default at 0.30 on the first start when
    # training was masked) as the default trains today
    "narrow_alloc05": ("default.yaml", {"narrow_training": True, "schedule": {"allocation": 0.5}}),
    "narrow_codebook4_fd5": (
        "default.yaml",
        {"narrow_training": True, "codebook": CODEBOOK4, "loss": {"feature_distill_weight": 5.0}},
    ),
    # the same with cost-weighted per-layer rates (allocation05 held on 3 seeds of the first start)
    "narrow_codebook4_fd5_alloc05": (
        "default.yaml",
        {
            "narrow_training": True,
            "codebook": CODEBOOK4,
            "loss": {"feature_distill_weight": 5.0},
            "schedule": {"allocation": 0.5},
        },
    ),
}
# static L1 first, to sqrt(target) of the FLOPs (its cut of the residual streams, which manidp's output
# gates cannot make: docs/results.md, "What bounds the default at 180,000 images"), then manidp's
# gates on that slimmed network for the rest: half the cut each, in log FLOPs. hybrid arm -> (the
# manidp arm trained on the slimmed start, whether it distils from the dense start through
# loss.teacher_weights: the slimmed start itself is no teacher)
HYBRID_ARMS = {
    "hybrid": ("narrow", True),
    "hybrid_ce": ("narrow_ce_only", False),
    "hybrid_no_distill": ("narrow_no_distill", False),
}
ABLATION_ARMS = (*(arm for arm in MANIDP_ARMS if arm != "manidp"), *HYBRID_ARMS)
# distilled from the unpruned network fine-tuned on the same budget instead of the dense start, which
# falls behind its students at 180,000 images (docs/results.md): arm -> the arm it is, teacher apart
TUNED_TEACHER_ARMS = {
    "static_kd_tuned": "static_kd",
    "hybrid_kd_tuned": "hybrid_recipe_kd",
    "narrow_kd_tuned": "narrow",  # the default recipe
    "narrow_fd5_kd_tuned": "narrow_fd5",
}
TEACHER_SEED = 0  # the dense arm that teaches them
# static_fkd (and static, on the cross-entropy alone: the better loss at 180,000 images) with
# Torch-Pruning ranking the channel groups by another criterion than filter L1
# (runtime/static_l1.py, StaticCriterion; taylor on the first CALIBRATION_IMAGES training images)
STATIC_FKD_CRITERIA = {"static_fkd_taylor": "taylor", "static_fkd_bn_scale": "bn_scale"}
STATIC_CRITERIA = {**STATIC_FKD_CRITERIA, "static_taylor": "taylor"}
CALIBRATION_IMAGES = 1024  # the recipes' schedule.calibration_images
STATIC_FKD_ARMS = ("static_fkd", *STATIC_FKD_CRITERIA)
STATIC_ARMS = ("static", "static_kd", "static_fkd", "static_inner", "static_kd_tuned", *STATIC_CRITERIA)
DENSE_ARMS = ("dense", "dense_kd")
DISTILL = {"weight": 1.0, "temperature": 4.0}  # the default recipe's, given to static_kd too
MAIN_ARMS = ("manidp", "static", "static_kd")
# the default recipe as measured: trained masked (the cells run before it trained narrow) and narrow
DEFAULT_ARMS = ("manidp", "narrow")
NETWORK_FILE = "model.safetensors"  # in an arm's run folder: manidp's export, or a static or dense arm's network
FLOPS_RATIO = "flops_ratio"  # metadata of a static or dense arm's network: its FLOPs share
MARGIN = 0.005  # the issue's: the default >= 0.5 point above the best static arm at 0.30 and 0.15
DEFAULT_LR = 0.05  # 3 seeds in every cell
# every arm's fine-tune: this many epochs of budget / FINE_TUNE_EPOCHS images each
FINE_TUNE_EPOCHS = 3
# every arm's fine-tuning batch, and that of the rows cached before --batch existed
DEFAULT_BATCH = 128


def run_folders(work: Path, patterns: list[str]) -> list[Path]:
    """The arm run folders of a ``--work`` folder whose names match any of ``patterns``, sorted."""
    return sorted({path for pattern in patterns for path in (work / "runs").glob(pattern)})


def model_suffix(model: str) -> str:
    """What another model than resnet18 appends to the names of its result files."""
    return "" if model == DEFAULT_MODEL else f"_{model}"


def default_work(model: str) -> Path:
    """The cache of ``--model``'s arms: resnet18's is the one the committed results came from."""
    return Path("runs/bench-accuracy-vs-flops" + model_suffix(model).replace("_", "-"))


def default_summary(model: str) -> Path:
    return ROOT / "results" / f"accuracy_vs_flops{model_suffix(model)}.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="the timm network every arm starts from; another than resnet18 gets its own --work, --out and "
        "--plot by default (suffixed with its name)",
    )
    parser.add_argument("--work", type=Path, default=None, help="default: runs/bench-accuracy-vs-flops[-MODEL]")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/accuracy_vs_flops[_MODEL].json"
    )
    parser.add_argument("--plot", type=Path, default=None, help="default: --out with .png")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.45, 0.3, 0.15])
    parser.add_argument("--budgets", type=int, nargs="+", default=[18000, 180000], help="fine-tuning images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the main arms")
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0], help="seeds of the other arms")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["dense", *MAIN_ARMS, "paper", "no_similarity", "no_complexity"],
        choices=sorted({*DENSE_ARMS, *MANIDP_ARMS, *STATIC_ARMS, *HYBRID_ARMS, *TUNED_TEACHER_ARMS}),
        metavar="ARM",
    )
    parser.add_argument("--dense-epochs", type=int, default=3)
    parser.add_argument("--dense-images", type=int, default=None, help="images per dense epoch (default: all)")
    parser.add_argument(
        "--teacher-dtype",
        choices=["float32", "bfloat16", "auto"],
        default="float32",
        help="the distilling arms' teacher precision (loss.teacher_dtype); float32 keeps the figures of "
        "every machine comparable",
    )
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        help="every arm's fine-tuning batch (the dense start keeps 128): the same images in more, smaller steps",
    )
    parser.add_argument("--max-arms", type=int, default=None, help="stop after this many new arms")
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="run the selected arms again even when a result is cached (code changed since); the earlier "
        "result is kept under <work>/replaced/",
    )
    parser.add_argument("--quick", action="store_true", help="one target, one seed, small budgets")
    parser.add_argument("--report-only", action="store_true", help="rebuild JSON, plot and table from finished arms")
    args = parser.parse_args()
    args.work = args.work or default_work(args.model)
    args.out = args.out or default_summary(args.model)
    args.plot = args.plot or args.out.with_suffix(".png")
    if args.quick:
        args.targets, args.seeds, args.budgets = [0.45], [0], [3000]
        args.dense_epochs, args.dense_images = 1, 3000
        args.work = args.work.with_name(args.work.name + "-quick")
        args.out = args.out.with_name("accuracy_vs_flops_quick.json")
        args.plot = args.plot.with_name("accuracy_vs_flops_quick.png")
    return args


def dense_start(args) -> tuple[Path, list[dict]]:
    out = args.work / "dense-start"
    export = out / "model.safetensors"
    if not export.exists():
        shutil.rmtree(out, ignore_errors=True)
        overrides = {
            "data": args.data,
            "epochs": args.dense_epochs,
            "batch_size": 128,
            "train_images": args.dense_images,
            "optimizer": {"lr": 0.1},
        }
        run(prepare("train", args.model, out_dir=out, overrides=overrides))
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return export, history


def plan(args) -> list[dict]:
    """Every arm to run, most important first: the main arms' seeds at the smallest budget, then the
    other arms, then the larger budgets."""
    specs = []
    for budget in sorted(args.budgets):
        targets = sorted(args.targets, key=lambda t: abs(t - 0.3))  # 0.30 first: the key cell
        main = [a for a in ("manidp", *STATIC_ARMS) if a in args.arms and a not in TUNED_TEACHER_ARMS]
        specs += _specs(main, args.seeds, targets, budget)
        specs += _specs([a for a in DENSE_ARMS if a in args.arms], args.ablation_seeds, [1.0], budget)
        specs += _specs([a for a in ABLATION_ARMS if a in args.arms], args.ablation_seeds, targets, budget)
        # after the dense arm that teaches them
        specs += _specs([a for a in TUNED_TEACHER_ARMS if a in args.arms], args.ablation_seeds, targets, budget)
    return specs


def _specs(arms: list[str], seeds: list[int], targets: list[float], budget: int) -> list[dict]:
    """Seed by seed, target by target, every arm."""
    return [
        {"arm": arm, "target": target, "seed": seed, "budget": budget}
        for seed in seeds
        for target in targets
        for arm in arms
    ]


# how a gated arm's final thresholds are calibrated, in its key: arms calibrated before 2026-12-05 (the
# last epoch's mean saliencies, one layer moved as far as the FLOPs gap asked) are reported as superseded
CALIBRATION = "moving-average saliencies, single-layer moves of one channel (core.calibration.MAX_LAYER_SHIFT)"
# recipe lines added after arms were cached, whose shown value reproduces the earlier behaviour
# exactly: left out of the key so that those arms stay current
NO_OP_RECIPE_LINES = re.compile(
    r"^\s*(warmup_epochs: 0\.0|lr_batch: null|allocation: 0\.0|img_size: null|workers: 2"
    r"|routing_init: 0\.0|distill_where: all|feature_distill_weight: 0\.0|distill_decay: none|fit_widths: true"
    r"|narrow_training: \w+|static_share: 0\.0|static_criterion: l1|max_cost: \S+|gate_optimizer: sgd)\b.*\n",
    re.MULTILINE,
)
# recipe lines whose comment changed after arms were cached: hashed as they were
REWORDED_RECIPE_LINES = {
    "  init: l1_norm         # ones (the paper) | l1_norm | bn_scale | taylor (measured on the calibration images): "
    "start from each channel's importance\n": "  init: l1_norm         # ones (the paper) | l1_norm | bn_scale: start "
    "from each channel's static importance\n",
}


def _recipe_identity(path: Path) -> str:
    text = path.read_text()
    for line, cached in REWORDED_RECIPE_LINES.items():
        text = text.replace(line, cached)
    return NO_OP_RECIPE_LINES.sub("", text)


@functools.cache
def _data_shape(data: str) -> tuple[int, tuple[int, int, int]]:
    images = load_data(data)
    return images.num_classes, images.input_shape


@functools.cache
def _binding_cost_cap(model: str, data: str, recipe: str, changes: str) -> float | None:
    """The arm's gates.max_cost where it narrows a gate of ``model`` at the data's image size, else None.
    The cap came after many arms were cached and narrows no ResNet gate at 32 px: it enters the key of
    the networks it changes (their arms cached before it are superseded), and leaves the others'."""
    policy = load_recipe(RECIPES / recipe, json.loads(changes)).gates
    if policy.max_cost is None:
        return None
    classes, shape = _data_shape(data)

    def widths(gates: GatePolicy) -> list[int]:
        network = create_model(model, num_classes=classes, in_chans=shape[0])
        with torch.random.fork_rng():  # widths do not depend on the start
            return [
                gate.fc1.out_features for gate in insert_gates(network, gates.with_constant_start(), shape).values()
            ]

    return policy.max_cost if widths(policy) != widths(policy.model_copy(update={"max_cost": None})) else None


def summary_start_digest(summary: dict) -> str | None:
    """The weights digest of the dense start a summary's arms were fine-tuned from (None in
    summaries written before it was recorded)."""
    return (summary.get("dense_start") or {}).get("weights_sha256")


def arm_key(spec: dict, args) -> str:
    settings = {
        **spec,
        "lr": args.lr,
        "data": args.data,
        "dense_epochs": args.dense_epochs,
        "dense_images": args.dense_images,
        "epochs": FINE_TUNE_EPOCHS,
        "batch": args.batch,
    }
    arm = spec["arm"]
    if arm in TUNED_TEACHER_ARMS:
        settings["teacher"] = arm_key(teacher_spec(spec), args)
        arm = TUNED_TEACHER_ARMS[arm]
    if arm in HYBRID_ARMS:
        settings["static_share"] = "sqrt(target)"
        arm, distils = HYBRID_ARMS[arm]
        if distils:
            settings["teacher"] = "dense start"
    if arm in MANIDP_ARMS:
        recipe, changes = MANIDP_ARMS[arm]
        # the loss-only overrides of the first arms were hashed bare; keep their keys (cached arms)
        hashed = changes.get("loss", {}) if set(changes) <= {"loss"} else changes
        settings["recipe"] = _recipe_identity(RECIPES / recipe) + json.dumps(hashed, sort_keys=True)
        settings["calibration"] = CALIBRATION
        if "max_cost" not in changes.get("gates", {}):  # named in the changes: hashed with them
            cap = _binding_cost_cap(args.model, args.data, recipe, json.dumps(changes, sort_keys=True))
            if cap is not None:
                settings["gate_max_cost"] = cap
    if arm in ("static_kd", "dense_kd"):
        settings["distill"] = DISTILL
    if arm in STATIC_FKD_ARMS:
        settings["distill"] = {**DISTILL, "features": FEATURE_DISTILL}
    if args.teacher_dtype != "float32":  # float32: the keys of the arms run before the option existed
        settings["teacher_dtype"] = args.teacher_dtype
    if args.model != DEFAULT_MODEL:  # likewise
        settings["model"] = args.model
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{spec['arm']}-t{spec['target']}-b{spec['budget']}-s{spec['seed']}-{digest}"


def run_folder(work: Path, key: str) -> Path:
    """Where an arm trains: its checkpoint, and then its network (``NETWORK_FILE``)."""
    return work / "runs" / key


def teacher_spec(spec: dict) -> dict:
    """The dense arm whose network teaches a ``TUNED_TEACHER_ARMS`` arm of this budget."""
    return {"arm": "dense", "target": 1.0, "seed": TEACHER_SEED, "budget": spec["budget"]}


def tuned_teacher(args, spec: dict) -> Path:
    """The teaching dense arm's network; a clear stop when that arm has not finished yet."""
    dense = teacher_spec(spec)
    key = arm_key(dense, args)
    network = run_folder(args.work, key) / NETWORK_FILE
    if not (args.work / "arms" / f"{key}.json").is_file() or not network.is_file():
        raise SystemExit(
            f"error: {spec['arm']} is taught by the dense arm of budget {spec['budget']} (seed {TEACHER_SEED}, "
            f"lr {args.lr}), not measured yet in {args.work}: run --arms dense --ablation-seeds {TEACHER_SEED} "
            f"--budgets {spec['budget']} first"
        )
    return network


class ArmInterrupted(Exception):
    """An arm stopped part-way (Ctrl-C, the end of a session): its checkpoint resumes on the next run."""


def _fine_tune(model, data, objective, args, spec, out: Path) -> None:
    """The shared fine-tune, checkpointed in ``out`` at every epoch end (and on Ctrl-C), and continued
    from that checkpoint when an earlier run of this arm stopped part-way."""
    checkpoint = out / CHECKPOINT_FILE
    resumed = load_checkpoint(checkpoint) if checkpoint.is_file() else None
    fitted = fit(
        model,
        data,
        objective,
        epochs=FINE_TUNE_EPOCHS,
        batch_size=args.batch,
        optimizer_config=OptimizerConfig(lr=args.lr),
        seed=spec["seed"],
        train_limit=spec["budget"] // FINE_TUNE_EPOCHS,
        checkpoint_path=checkpoint,
        resume_state=resumed,
        extra_state={"kind": spec["arm"], "recipe": json.dumps(spec), "model": args.model, "weights": "dense start"},
    )
    if fitted.interrupted:
        raise ArmInterrupted(f"{spec['arm']} stopped part-way; {checkpoint} continues it on the next run")


def save_network(model: torch.nn.Module, out: Path, flops_ratio: float) -> None:
    """A static or dense arm's trained network as ``<out>/model.safetensors`` (a start manidp loads,
    narrowed where the cut narrowed it), with its FLOPs share: benchmarks/cascade.py's members."""
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    atomic_write_bytes(out / NETWORK_FILE, save_safetensors(state, {FLOPS_RATIO: str(flops_ratio)}))


def run_manidp_arm(args, spec: dict, start: Path, out: Path, teacher: Path | None = None) -> dict:
    recipe, changes = MANIDP_ARMS[spec["arm"]]
    overrides = {
        "data": args.data,
        "epochs": FINE_TUNE_EPOCHS,
        "batch_size": args.batch,
        "train_images": spec["budget"] // FINE_TUNE_EPOCHS,
        "seed": spec["seed"],
        "target_flops": spec["target"],
        **{section: values for section, values in changes.items() if section not in ("schedule", "optimizer")},
        "narrow_training": changes.get("narrow_training", False),
        "optimizer": {"lr": args.lr, **changes.get("optimizer", {})},
        "schedule": {"calibration_images": 1024, "search_steps": 16, **changes.get("schedule", {})},
    }
    overrides["loss"] = {**overrides.get("loss", {}), "teacher_dtype": args.teacher_dtype}
    if teacher is not None:
        overrides["loss"]["teacher_weights"] = str(teacher)
    if (out / CHECKPOINT_FILE).is_file():  # stopped part-way before: continue where it stopped
        job = prepare("prune", args.model, out_dir=out, resume=True)
    else:
        recipe_path = RECIPES / recipe
        job = prepare("prune", args.model, recipe_path=recipe_path, weights=start, out_dir=out, overrides=overrides)
    result = run(job)
    if result.interrupted:
        raise ArmInterrupted(f"{spec['arm']} stopped part-way; {job.checkpoint} continues it on the next run")
    row = {
        "top1": result.after.top1,
        # of timm's full-width resnet18 also for a network a static stage narrowed
        "flops_ratio": result.flops_ratio_of_architecture or result.after.flops.mean_ratio,
        "spearman_loss_flops": result.after.signature.spearman_loss_flops,
        "gram_correlation": result.after.signature.gram_correlation,
        # how dynamic it is: the share of gated channels whose decision depends on the image
        "routed_channel_share": result.after.flops.routed_channel_share(),
    }
    if job.static_flops_ratio is not None:  # a row's static_share: the FLOPs ratio the static cut reached
        row["static_share"] = job.static_flops_ratio
    return row


def run_hybrid_arm(args, spec: dict, start: Path, data, out: Path) -> dict:
    """Static L1 to sqrt(target), saved as a slimmed start, then the hybrid's manidp arm on it to
    target / (static L1's share): manidp's export measures its FLOPs against timm's full-width
    architecture too (``mean_ratio_of_architecture``), the figure reported."""
    slimmed = args.work / "slimmed-starts" / f"{arm_key(spec, args)}.safetensors"
    if not slimmed.is_file():  # written once: a resumed arm must continue from the same start
        torch.manual_seed(spec["seed"])
        model = create_model(args.model, num_classes=data.num_classes, in_chans=data.in_chans, weights=start)
        baseline = static_l1(model, math.sqrt(spec["target"]), data.input_shape)
        state = {key: value.detach().contiguous() for key, value in baseline.model.state_dict().items()}
        slimmed.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(slimmed, save_safetensors(state, {"static_flops_ratio": str(baseline.flops_ratio)}))
    share = float(safe_open(str(slimmed), "pt").metadata()["static_flops_ratio"])
    arm, distils = HYBRID_ARMS[spec["arm"]]
    inner = {**spec, "arm": arm, "target": spec["target"] / share}
    metrics = run_manidp_arm(args, inner, slimmed, out, teacher=start if distils else None)
    return {**metrics, "static_share": share}  # its flops_ratio: of the full-width architecture


def run_static_arm(args, spec: dict, start: Path, data, out: Path, teacher: Path | None = None) -> dict:
    torch.manual_seed(spec["seed"])
    model = create_model(args.model, num_classes=data.num_classes, in_chans=data.in_chans, weights=start)
    kind = STATIC_CRITERIA.get(spec["arm"], "l1")
    criterion = StaticCriterion.measure(kind, model, data.train.batches(256, limit=CALIBRATION_IMAGES))
    baseline = static_l1(
        model, spec["target"], data.input_shape, inner_only=spec["arm"] == "static_inner", criterion=criterion
    )
    model, flops = baseline.model, baseline.flops_ratio
    objective = CrossEntropyObjective()
    if spec["arm"] in ("static_kd", *STATIC_FKD_ARMS):
        teacher_model = create_model(
            args.model, num_classes=data.num_classes, in_chans=data.in_chans, weights=teacher or start
        )
        features = {}
        if spec["arm"] in STATIC_FKD_ARMS:  # the stage outputs too, on the channels the slimmed stages keep
            names = stage_names(teacher_model)
            channels = stage_channels(teacher_model, baseline.pruning_ratio, data.input_shape, names, criterion)
            features = {"feature_weight": FEATURE_DISTILL, "teacher_stage_channels": channels}
        precision = teacher_dtype(args.teacher_dtype, torch.device("cpu"))
        objective = Distilled(
            objective, teacher_model, DISTILL["weight"], DISTILL["temperature"], teacher_dtype=precision, **features
        )
    _fine_tune(model, data, objective, args, spec, out)
    save_network(model, out, flops)
    result = evaluate(model, data.eval, 256)
    return {"top1": result.top1, "flops_ratio": flops, "spearman_loss_flops": None, "gram_correlation": None}


def run_dense_arm(args, spec: dict, start: Path, data, out: Path) -> dict:
    torch.manual_seed(spec["seed"])
    model = create_model(args.model, num_classes=data.num_classes, in_chans=data.in_chans, weights=start)
    objective = CrossEntropyObjective()
    if spec["arm"] == "dense_kd":
        teacher = create_model(args.model, num_classes=data.num_classes, in_chans=data.in_chans, weights=start)
        precision = teacher_dtype(args.teacher_dtype, torch.device("cpu"))
        objective = Distilled(objective, teacher, DISTILL["weight"], DISTILL["temperature"], teacher_dtype=precision)
    _fine_tune(model, data, objective, args, spec, out)
    save_network(model, out, 1.0)
    result = evaluate(model, data.eval, 256)
    return {"top1": result.top1, "flops_ratio": 1.0, "spearman_loss_flops": None, "gram_correlation": None}


def iso_accuracy_flops(points: list[tuple[float, float]], accuracy: float) -> float | None:
    """Smallest FLOPs ratio at which the (flops, top1) curve, linearly interpolated, reaches ``accuracy``."""
    points = sorted(points)
    for (f0, a0), (f1, a1) in zip(points, points[1:]):
        if a0 >= accuracy:
            return f0
        if a1 >= accuracy:
            return f0 + (accuracy - a0) * (f1 - f0) / (a1 - a0)
    if points and points[-1][1] >= accuracy:
        return points[-1][0]
    return None


def iso_accuracy(cells: dict[str, dict]) -> list[dict]:
    """Per budget and default arm: the best static arm's mean top-1 at 0.45 of the FLOPs, the FLOPs at
    which the default's curve of means reaches it (None: not at any measured budget), and whether the
    default at 0.30 is at least as accurate (the issue's iso-accuracy target)."""
    out = []
    for budget in sorted({int(key.split("|")[1]) for key in cells}):
        statics = [cells[f"{arm}|{budget}|0.45"] for arm in STATIC_ARMS if f"{arm}|{budget}|0.45" in cells]
        for default in DEFAULT_ARMS:
            mine = [cell for key, cell in cells.items() if key.startswith(f"{default}|{budget}|")]
            curve = [(cell["flops_ratio_mean"], cell["mean"]) for cell in mine]
            if not statics or not curve:
                continue
            reference = max(cell["mean"] for cell in statics)
            at_030 = cells.get(f"{default}|{budget}|0.3")
            out.append(
                {
                    "budget": budget,
                    "arm": default,
                    "best_static_top1_at_0.45": reference,
                    "manidp_flops_at_that_top1": iso_accuracy_flops(curve, reference),
                    "manidp_top1_at_0.30": at_030["mean"] if at_030 else None,
                    "manidp_at_0.30_matches_static_at_0.45": bool(at_030 and at_030["mean"] >= reference),
                }
            )
    return out


def unpruned_cells(cells: dict[str, dict], budget: int) -> dict[str, dict]:
    """The unpruned fine-tunes (``DENSE_ARMS``) measured at this budget, by arm."""
    return {arm: cells[key] for arm in DENSE_ARMS if (key := f"{arm}|{budget}|1.0") in cells}


def ceiling(cells: dict[str, dict], budget: int) -> dict | None:
    """The best unpruned fine-tune of this budget (``DENSE_ARMS``): what no pruned arm is expected to pass."""
    measured = unpruned_cells(cells, budget)
    if not measured:
        return None
    arm, cell = max(measured.items(), key=lambda pair: pair[1]["mean"])
    return {"arm": arm, "top1": cell["mean"], "seeds": len(cell["seeds"])}


def verdicts(cells: dict[str, dict], arms: list[dict]) -> list[dict]:
    """Per budget, target and default arm: the default against the best static arm at that target, and
    what the issue's margin asks of it beside the unpruned ceiling of the budget."""
    out = []
    for budget in sorted({r["budget"] for r in arms}):
        bound = ceiling(cells, budget)
        for default in DEFAULT_ARMS:
            for target in sorted({r["target"] for r in arms if r["arm"] == default}, reverse=True):
                mine = cells.get(f"{default}|{budget}|{target}")
                statics = [cells[k] for k in (f"{arm}|{budget}|{target}" for arm in STATIC_ARMS) if k in cells]
                if mine and statics:
                    out.append(_verdict(budget, target, default, mine, max(statics, key=lambda s: s["mean"]), bound))
    return out


def _verdict(budget: int, target: float, default: str, mine: dict, best: dict, bound: dict | None) -> dict:
    theirs = dict(zip(best["seeds"], best["top1"]))
    return {
        "budget": budget,
        "target": target,
        "arm": default,
        "manidp": mine["mean"],
        "best_static": best["mean"],
        "difference": mine["mean"] - best["mean"],
        "larger_seed_sd": max(s["stdev"] or 0.0 for s in (mine, best)),
        # seed -> the default minus the best static arm, same seed
        "paired_differences": {s: a - theirs[s] for s, a in zip(mine["seeds"], mine["top1"]) if s in theirs},
        "seeds": [len(mine["seeds"]), len(best["seeds"])],
        "needed_for_margin": best["mean"] + MARGIN,
        "unpruned_ceiling": bound,
        # > 0: the margin asks the pruned network to beat the unpruned one fine-tuned the same way
        "margin_above_ceiling": best["mean"] + MARGIN - bound["top1"] if bound else None,
    }


def _cells(arms: list[dict]) -> dict[tuple[str, int, float], list[dict]]:
    cells: dict[tuple[str, int, float], list[dict]] = {}
    for row in arms:
        cells.setdefault((row["arm"], row["budget"], row["target"]), []).append(row)
    return cells


def _stats(rows: list[dict]) -> dict:
    accs = [r["top1"] for r in rows]
    return {
        "seeds": [r["seed"] for r in rows],
        "top1": accs,
        "mean": statistics.mean(accs),
        "stdev": statistics.stdev(accs) if len(accs) > 1 else None,
        "flops_ratio_mean": statistics.mean(r["flops_ratio"] for r in rows),
        "spearman_mean": statistics.mean(r["spearman_loss_flops"] for r in rows)
        if all(r["spearman_loss_flops"] is not None for r in rows)
        else None,
        "routed_channel_share_mean": statistics.mean(r["routed_channel_share"] for r in rows)
        if all(r.get("routed_channel_share") is not None for r in rows)
        else None,
    }


def split_rows(args, rows: list[dict]) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Finished arms -> (current at ``--lr``, current at another learning rate, current at another
    batch, superseded). An arm is superseded when its key no longer matches its settings (e.g. the
    default recipe changed since it ran): it is reported apart, never pooled with the current arms of
    the same name."""
    current, other_lr, other_batch, superseded = [], [], [], []
    for row in rows:
        lr, batch = row.get("lr", DEFAULT_LR), row.get("batch", DEFAULT_BATCH)
        spec = {name: row[name] for name in ("arm", "target", "seed", "budget")}
        if row["arm"] not in (*MANIDP_ARMS, *HYBRID_ARMS, *STATIC_ARMS, *DENSE_ARMS, *TUNED_TEACHER_ARMS):
            superseded.append(row)
        elif row["key"] != arm_key(spec, argparse.Namespace(**{**vars(args), "lr": lr, "batch": batch})):
            superseded.append(row)
        elif batch != args.batch:
            other_batch.append(row)
        else:
            (current if lr == args.lr else other_lr).append(row)
    return current, other_lr, other_batch, superseded


def summarise(args, rows: list[dict], start: StartIdentity, wall: float) -> dict:
    arms, other_lr, other_batch, superseded = split_rows(args, rows)
    cells = {f"{arm}|{budget}|{target}": _stats(rows) for (arm, budget, target), rows in _cells(arms).items()}
    return {
        "iso_accuracy": iso_accuracy(cells),
        "benchmark": "accuracy_vs_flops",
        "model": args.model,
        "data": args.data,
        "settings": {
            "dense_epochs": args.dense_epochs,
            "fine_tune_epochs": FINE_TUNE_EPOCHS,
            "budgets": args.budgets,
            "lr": args.lr,
            "batch_size": args.batch,
            "targets": args.targets,
            "seeds": args.seeds,
            "teacher_dtype": args.teacher_dtype,
        },
        "dense_start": {
            "epochs": len(start.eval_top1_per_epoch),
            "eval_top1_per_epoch": start.eval_top1_per_epoch,
            # float kernels differ between CPUs and thread counts: a dense start retrained elsewhere is
            # another start, and its arms are not comparable with these (restore_cache checks)
            "sha256": start.file_sha256,
            "weights_sha256": start.weights_sha256,
        },
        "arms": arms,
        "cells": cells,
        "other_learning_rates": other_lr,
        "other_batches": other_batch,
        "superseded_arms": superseded,
        "manidp_vs_best_static": verdicts(cells, arms),
        "wall_seconds": wall,
        "torch_threads": torch.get_num_threads(),
    }


def _curve_arms(rows: list[dict], budget: int, points_if_no_curve: bool = False) -> list[str]:
    """The pruned arms measured at two targets or more: curves. An arm measured at one target is a
    candidate, reported in the tables only; with ``points_if_no_curve`` and no arm at two targets,
    every arm is drawn (as a point)."""
    targets: dict[str, set[float]] = {}
    for r in rows:
        if r["budget"] == budget and r["arm"] not in DENSE_ARMS:
            targets.setdefault(r["arm"], set()).add(r["target"])
    curves = sorted(arm for arm, measured in targets.items() if len(measured) >= 2)
    return curves or (sorted(targets) if points_if_no_curve else [])


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = sorted({r["budget"] for r in summary["arms"]})
    with_ceiling = {b for b in measured if unpruned_cells(summary["cells"], b)}
    # a budget with the unpruned ceiling is a comparison: its single-target arms are drawn as points
    curves = {
        budget: _curve_arms(summary["arms"], budget, points_if_no_curve=budget in with_ceiling) for budget in measured
    }
    budgets = [b for b in curves if curves[b]]  # the unpruned line alone is no comparison
    if not budgets:
        print(f"no plot: no pruned arm to draw yet ({path} not written)", flush=True)
        return
    # one colour per arm on every panel, so that panels can be compared at a glance
    drawn = sorted({arm for budget in budgets for arm in curves[budget]})
    colour = {arm: f"C{i % 10}" for i, arm in enumerate(drawn)}
    fig, axes = plt.subplots(1, len(budgets), figsize=(7 * len(budgets), 5), layout="constrained", squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for arm in curves[budget]:
            points = sorted(
                (cell["flops_ratio_mean"], 100 * cell["mean"], 100 * (cell["stdev"] or 0.0))
                for key, cell in summary["cells"].items()
                if key.startswith(f"{arm}|{budget}|")
            )
            ax.errorbar(
                [p[0] for p in points],
                [p[1] for p in points],
                yerr=[p[2] for p in points],
                marker="o",
                capsize=3,
                color=colour[arm],
                label=arm,
            )
        unpruned = unpruned_cells(summary["cells"], budget)
        for arm, style in zip(DENSE_ARMS, ("--", ":")):
            if dense := unpruned.get(arm):
                ax.axhline(
                    100 * dense["mean"], color="gray", linestyle=style, label=f"{arm} (unpruned, same fine-tune)"
                )
        ax.set_xlabel("mean FLOPs / dense FLOPs (honest count, gates included)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{summary['model']} on {summary['data']}, fine-tune {budget:,} images")
        ax.margins(x=0.1, y=0.1)
        ax.legend(fontsize="small", loc="best")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(done: list[dict], title: str) -> None:
    if not done:
        return
    print(f"\n{title}")
    print(f"{'arm':18s} {'budget':>7s} {'batch':>5s} {'lr':>5s} {'target':>6s} {'seed':>4s}", end="")
    print(f" {'top1':>7s} {'FLOPs':>6s} {'spearman':>8s}")
    for d in sorted(done, key=lambda d: (d["budget"], -d["target"], d["arm"], d["seed"])):
        rho = d["spearman_loss_flops"]
        rho_text = "n/a" if rho is None else f"{rho:+.3f}"
        print(
            f"{d['arm']:18s} {d['budget']:7d} {d.get('batch', DEFAULT_BATCH):5d} {d.get('lr', DEFAULT_LR):5.3f}"
            f" {d['target']:6.2f} {d['seed']:4d}"
            f" {d['top1']:7.4f}"
            f" {d['flops_ratio']:6.3f} {rho_text:>8s}"
        )


def _set_aside(result: Path, replaced: Path) -> None:
    """--rerun: keep the earlier result of an arm under ``replaced/``, numbered, and forget it here."""
    replaced.mkdir(parents=True, exist_ok=True)
    number = sum(1 for _ in replaced.glob(f"{result.stem}.*.json"))
    result.rename(replaced / f"{result.stem}.{number}.json")


def main() -> None:
    try:
        run_plan(parse_args())
    except ArmInterrupted as exc:
        print(exc, flush=True)
        raise SystemExit(130) from None


@dataclass(frozen=True)
class StartIdentity:
    """What shows that a retrained dense start is the one a summary's arms started from."""

    file_sha256: str
    # the tensors alone: the file's metadata holds the whole recipe, so code that gained a recipe field
    # writes other bytes around the same weights
    weights_sha256: str
    eval_top1_per_epoch: list[float | None]

    @classmethod
    def of(cls, export: Path, history: list[dict]) -> StartIdentity:
        raw = export.read_bytes()  # one read for both digests
        weights = hashlib.sha256()
        for name, tensor in sorted(load_safetensors(raw).items()):
            weights.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            weights.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return cls(hashlib.sha256(raw).hexdigest(), weights.hexdigest(), [h.get("eval_top1") for h in history])

    def matches(self, recorded: dict) -> tuple[object, object]:
        """(theirs, ours), equal when ``recorded`` (a summary's ``dense_start``) names this start: by
        the weights' digest; for summaries written before it was kept, by the file's, or else by the
        evaluation after every epoch (4 decimals of top-1 on 10,000 images, 3 times)."""
        if "weights_sha256" in recorded:
            return recorded["weights_sha256"], self.weights_sha256
        if recorded.get("sha256") == self.file_sha256:
            return self.file_sha256, self.file_sha256
        return recorded["eval_top1_per_epoch"], self.eval_top1_per_epoch


def restore_cache(args, folder: Path, start: StartIdentity) -> int:
    """Rows of the committed summary (``--out``) whose arm file is missing are written back to the
    cache, so that a fresh checkout (``runs/`` is not committed) keeps every arm measured so far instead
    of rebuilding the summary from the new ones alone. Only when the dense start just trained
    is the one those arms started from (``StartIdentity.matches``)."""
    if not args.out.is_file():
        return 0
    summary = json.loads(args.out.read_text())
    theirs, ours = start.matches(summary["dense_start"])
    if theirs != ours:
        raise SystemExit(
            f"error: {args.out} was measured from another dense start ({theirs}; this one: {ours}): give "
            "this run its own --work and --out, or move that file aside (its arms cannot be pooled with new ones)"
        )
    restored = 0
    restorable = summary["arms"] + summary["other_learning_rates"] + summary.get("other_batches", [])
    for row in restorable + summary["superseded_arms"]:
        path = folder / f"{row['key']}.json"
        if not path.exists():
            atomic_write_text(path, json.dumps(row, indent=1))
            restored += 1
    return restored


def run_arm(args, spec: dict, start: Path, data, out: Path) -> dict:
    teacher = None
    if spec["arm"] in TUNED_TEACHER_ARMS:
        teacher = tuned_teacher(args, spec)
        spec = {**spec, "arm": TUNED_TEACHER_ARMS[spec["arm"]]}
    if spec["arm"] in DENSE_ARMS:
        return run_dense_arm(args, spec, start, data, out)
    if spec["arm"] in STATIC_ARMS:
        return run_static_arm(args, spec, start, data, out, teacher)
    if spec["arm"] in HYBRID_ARMS:
        return run_hybrid_arm(args, spec, start, data, out)
    return run_manidp_arm(args, spec, start, out, teacher)


def _undefined_as_null(row: dict) -> dict:
    """Arms cached before the evaluation reported undefined correlations as None hold NaN there
    (codebook models, whose images all get the same FLOPs); JSON has no NaN."""
    for key in ("spearman_loss_flops", "gram_correlation"):
        if isinstance(row.get(key), float) and math.isnan(row[key]):
            row[key] = None
    return row


def run_plan(args: argparse.Namespace) -> None:
    folder = args.work / "arms"
    folder.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start, dense_history = dense_start(args)
    identity = StartIdentity.of(start, dense_history)
    restored = restore_cache(args, folder, identity)
    if restored:
        print(f"restored {restored} finished arms from {args.out}", flush=True)
    data = load_data(args.data)
    new = 0
    for spec in [] if args.report_only else plan(args):
        key = arm_key(spec, args)
        if args.max_arms is not None and new >= args.max_arms:
            continue
        if (folder / f"{key}.json").exists():
            if not args.rerun:
                continue
            _set_aside(folder / f"{key}.json", args.work / "replaced")
            shutil.rmtree(run_folder(args.work, key), ignore_errors=True)  # its final checkpoint would "resume"
        out = run_folder(args.work, key)
        if not (out / CHECKPOINT_FILE).is_file():  # a checkpoint: the arm stopped part-way, resume it
            shutil.rmtree(out, ignore_errors=True)
        resumed = (out / CHECKPOINT_FILE).is_file()
        t0 = time.perf_counter()
        try:
            metrics = run_arm(args, spec, start, data, out)
        except TargetError as exc:  # a target this arm's gates cannot reach: the other arms still run
            print(f"{key:48s} refused: {exc}", flush=True)
            continue
        except TrainingError as exc:  # a diverged arm (NaN loss): reported, not cached, the others run
            print(f"{key:48s} diverged: {exc}", flush=True)
            continue
        # seconds: this run's share only, when the arm resumed a checkpoint
        row = {"key": key, **spec, "lr": args.lr, "batch": args.batch, **metrics}
        row |= {"seconds": time.perf_counter() - t0, "resumed": resumed}
        atomic_write_text(folder / f"{key}.json", json.dumps(row, indent=1))
        new += 1
        print(f"{key:48s} top1 {row['top1']:.4f}  FLOPs {row['flops_ratio']:.3f}  {row['seconds']:.0f} s", flush=True)
    done = [_undefined_as_null(json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))]
    summary = summarise(args, done, identity, sum(d["seconds"] for d in done))
    atomic_write_text(args.out, json.dumps(summary, indent=1))
    plot(summary, args.plot)
    _table(summary["arms"], "current arms")
    _table(summary["other_learning_rates"], "other learning rates")
    _table(summary["other_batches"], "other batches")
    _table(summary["superseded_arms"], "superseded (settings changed since they ran; not pooled)")
    for v in summary["manidp_vs_best_static"]:
        print(
            f"budget {v['budget']:>7,} target {v['target']:.2f}: {v['arm']} {v['manidp']:.4f} vs best static "
            f"{v['best_static']:.4f} ({v['difference']:+.4f}; larger seed sd {v['larger_seed_sd']:.4f}; "
            f"seeds {v['seeds']}; same-seed differences "
            f"{', '.join(f'{d:+.4f}' for d in v['paired_differences'].values())})"
        )
        if v["unpruned_ceiling"]:
            bound = v["unpruned_ceiling"]
            print(
                f"    +0.5 point needs {v['needed_for_margin']:.4f}, {v['margin_above_ceiling']:+.4f} from the "
                f"unpruned ceiling {bound['top1']:.4f} ({bound['arm']}, {bound['seeds']} seeds)"
            )


if __name__ == "__main__":
    main()
