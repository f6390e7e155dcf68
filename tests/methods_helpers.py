"""Shared pieces of the method tests: small models with their units, and the end-to-end check."""

import json

import torch
from torch import nn

import hwprune
from hwprune.budget import Budget
from hwprune.graph import discover_groups
from hwprune.graph.groups import UnitIndex
from hwprune.training.pipeline import FitConfig
from hwprune.regularizers import RegContext, SparsitySchedule, build_regularizer

from helpers_models import tiny_resnet


def conv_bn_net(channels=8, in_channels=1, classes=3, k=3):
    """conv -> BN -> ReLU -> pool -> linear: one prunable group of ``channels`` units."""
    return nn.Sequential(nn.Conv2d(in_channels, channels, k, padding=k // 2, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def randomize_bn(model, seed=0):
    """BN parameters and statistics away from their defaults, so that tests see real values."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def regularizer(model, example, method, options=None, keep_fraction=0.5, total_steps=100, schedule=True):
    """The method on ``model``'s units, with a sparsity schedule towards removing 1 - keep_fraction."""
    groups = discover_groups(model, example)
    index = UnitIndex(model, groups)
    keep = int(round(index.n_units * keep_fraction))
    sched = SparsitySchedule(1 - keep / index.n_units, total_steps) if schedule else None
    ctx = RegContext(model, index, keep_units=keep, total_steps=total_steps, schedule=sched)
    return build_regularizer(method, ctx, options or {}), groups, index


def fit_tiny(method, options, out_dir, data):
    """``hwprune.fit`` on the tiny residual net, epochs 1 1 1, half of the units removed."""
    torch.manual_seed(0)
    cfg = FitConfig(budget=Budget("sparsity", 0.5), method=method, method_options=dict(options),
                    epochs_dense=1, epochs_regularize=1, epochs_finetune=1)
    result = hwprune.fit(tiny_resnet(1, 10, 8), data.train, test_data=data.test, target="host-cpu", config=cfg,
                         out_dir=out_dir, progress=None, measure=False)
    report = json.loads((out_dir / "report.json").read_text())
    return result, report


def assert_exact_budget_and_onnx(report):
    # tiny_resnet: two groups of 16 units on host-cpu (multiples of 8): 0.5 removes exactly 16 of 32
    assert report["achieved"]["sparsity"] == 0.5
    assert report["projection"]["removed_units"] == 16
    assert report["onnx"]["max_abs_diff"] < 1e-4
