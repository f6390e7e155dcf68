"""Distillation on changed inputs (``--distill-mixup``, ``--distill-shift``, ``--distill-flip``: function
matching and consistent teaching): the draws, the batch, the loss, and what the fine-tune of ``fit`` feeds
the teacher."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.tasks.classification import Distillation
from hwprune.tasks.views import MixedLabels, beta_sample as _beta_sample
from hwprune.training.loop import train_epoch


@pytest.mark.parametrize("a", [0.4, 1.0, 2.5])
def test_mixing_weights_follow_beta_a_a(a):
    """Our generator-driven sampler against scipy's Beta(a, a) (Kolmogorov-Smirnov, 3,000 draws)."""
    g = torch.Generator().manual_seed(11)
    draws = np.array([_beta_sample(a, g) for _ in range(3000)])
    assert draws.min() >= 0 and draws.max() <= 1
    assert stats.kstest(draws, stats.beta(a, a).cdf).pvalue > 1e-3
    # and something it must not pass: the same draws against a different concentration
    assert stats.kstest(draws, stats.beta(a * 3, a * 3).cdf).pvalue < 1e-3


def test_mix_is_one_convex_pair_per_row_with_its_labels():
    """Inputs e_0..e_7 (identity rows) make the mix readable: row i is lam·e_i + (1 - lam)·e_perm(i), and
    the labels of its hard term are y and y[perm] with the same lam."""
    kd = Distillation(teacher=nn.Linear(8, 3), mixup=1.0)
    kd.reseed(seed=5, epoch=0)
    x, y = torch.eye(8), torch.arange(8) % 3
    xm, target = kd.view(x, y)
    assert isinstance(target, MixedLabels)
    lam = target.lam
    for i in range(8):
        nonzero = [int(k) for k in xm[i].nonzero()]
        if nonzero == [i]:  # mixed with itself
            j = i
            assert float(xm[i, i]) == pytest.approx(1.0)
        else:
            (j,) = [k for k in nonzero if k != i]
            assert float(xm[i, i]) == pytest.approx(lam) and float(xm[i, j]) == pytest.approx(1 - lam)
        assert int(target.a[i]) == int(y[i]) and int(target.b[i]) == int(y[j])
    kd.reseed(seed=5, epoch=0)
    xm2, target2 = kd.view(x, y)
    assert torch.equal(xm, xm2) and target2.lam == lam  # reseeding replays the draws (a resumed fine-tune)
    one = kd.view(x[:1], y[:1])
    assert torch.equal(one[0], x[:1]) and torch.equal(one[1], y[:1])  # a batch of one: nothing to mix with


def test_mixed_hard_term_by_hand():
    """alpha 0: the loss is lam·CE(y_a) + (1 - lam)·CE(y_b), with cross-entropy computed in plain Python."""
    out = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    labels = MixedLabels(torch.tensor([0, 2]), torch.tensor([1, 1]), 0.3)

    def ce(logits, k):
        return -(logits[k] - math.log(sum(math.exp(v) for v in logits)))

    rows = out.tolist()
    expected = sum(0.3 * ce(r, a) + 0.7 * ce(r, b) for r, a, b in zip(rows, [0, 2], [1, 1])) / 2
    kd = Distillation(teacher=nn.Linear(3, 3), alpha=0.0, mixup=1.0)
    assert float(kd.loss(out, labels, torch.zeros(2, 3))) == pytest.approx(expected, rel=1e-6)


def test_train_epoch_trains_on_the_mixed_batch_and_counts_accuracy_on_the_labels():
    """``batch_fn``: the model (and the loss) see the changed batch; accuracy is counted against ``y``."""
    model = nn.Linear(4, 2)
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    loader = [(x, y)]
    got = []
    stats_ = train_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.0), lr_at=lambda s: 0.0, step0=0,
                         batch_fn=lambda xb, yb: (xb * 2, 1 - yb),
                         loss_fn=lambda out, target, xb: got.append((target.clone(), xb.clone())) or out.sum() * 0)
    assert torch.equal(seen[0], x * 2) and torch.equal(got[0][0], 1 - y) and torch.equal(got[0][1], x * 2)
    with torch.no_grad():
        expected = float(((model(x * 2).argmax(1)) == y).float().mean())
    assert stats_.accuracy == pytest.approx(expected)


def test_fit_distills_on_changed_images(tmp_path, monkeypatch):
    """With ``distill_mixup`` or ``distill_shift`` the teacher is asked about images that are not training
    images (mixes of two, moved ones); without them, only about training images."""
    import hwprune
    from hwprune.budget import Budget
    from hwprune.data import load_dataset
    from hwprune.models import build_model
    from hwprune.training.pipeline import FitConfig

    data = load_dataset("digits")
    train_images = torch.stack([data.train[i][0] for i in range(len(data.train))]).flatten(1)

    def teacher_inputs(**views):
        asked = []
        real = Distillation.loss
        monkeypatch.setattr(Distillation, "loss",
                            lambda self, out, y, x: asked.append(x.detach().flatten(1)) or real(self, out, y, x))
        torch.manual_seed(0)
        net = build_model("small-resnet", in_channels=1, num_classes=10, input_size=8, width=0.25)
        cfg = FitConfig(budget=Budget("flops", 0.5), method="magnitude", epochs_dense=1, epochs_regularize=0,
                        epochs_finetune=1, distill=0.5, **views)
        hwprune.fit(net, data.train, test_data=data.test, target="host-cpu", config=cfg,
                    out_dir=tmp_path / f"run{len(list(tmp_path.iterdir()))}", progress=None, measure=False)
        monkeypatch.undo()
        batch = asked[0]
        return torch.cdist(batch, train_images).min(1).values  # each input's distance to the nearest training image

    assert float(teacher_inputs().max()) < 0.05  # 0 up to cdist's rounding
    assert float(teacher_inputs(distill_mixup=0.0).max()) < 0.05
    assert float(teacher_inputs(distill_mixup=1.0).median()) > 1.0
    assert float(teacher_inputs(distill_shift=2).median()) > 1.0  # moved digits are not training images


def test_bad_mixup_is_a_one_line_error():
    from hwprune.budget import Budget
    from hwprune.training.pipeline import FitConfig

    with pytest.raises(HwpruneError, match="--distill-mixup -1.*>= 0"):
        FitConfig(budget=Budget("flops", 0.5), distill_mixup=-1)
    with pytest.raises(HwpruneError, match="--distill-shift 1.5: expected a whole number of pixels"):
        FitConfig(budget=Budget("flops", 0.5), distill_shift=1.5)


def test_other_tasks_refuse_mixing_by_name():
    """Tasks that distill in their own way (sentence encoders) refuse the flag up front, naming it."""
    from types import SimpleNamespace

    from hwprune.budget import Budget
    from hwprune.training.pipeline import FitConfig, _check_task_support

    for setting, flag in (("distill_mixup", "--distill-mixup"), ("distill_shift", "--distill-shift"),
                          ("distill_flip", "--distill-flip")):
        cfg = FitConfig(budget=Budget("sparsity", 0.5), **{setting: 1 if setting != "distill_flip" else True})
        with pytest.raises(HwpruneError, match=f"sentence-distill task does not support {flag}"):
            _check_task_support(SimpleNamespace(name="sentence-distill"), cfg, None, False)
    _check_task_support(SimpleNamespace(name="sentence-distill"), FitConfig(budget=Budget("sparsity", 0.5)), None, False)


def _translated(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``img`` (C, H, W) moved down by dy and right by dx, zeros where nothing moved in: pixel by pixel."""
    out = np.zeros_like(img)
    _, h, w = img.shape
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[:, i, j] = img[:, i - dy, j - dx]
    return out


def test_moved_images_are_zero_filled_translations_covering_every_offset():
    """Each image (distinct nonzero pixels, so one offset explains it) is exactly one of the 25 translations by
    (dy, dx) in [-2, 2]² built pixel by pixel; over 300 images every offset occurs; labels are untouched."""
    x = torch.arange(1, 301 * 30 + 1, dtype=torch.float32)[: 300 * 30].view(300, 1, 5, 6)
    y = torch.arange(300) % 10
    kd = Distillation(teacher=nn.Identity(), shift=2)
    kd.reseed(seed=3, epoch=0)
    moved, labels = kd.view(x, y)
    assert torch.equal(labels, y) and moved.shape == x.shape
    offsets = set()
    for img, out in zip(x.numpy(), moved.numpy()):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if np.array_equal(_translated(img, dy, dx), out)]
        assert len(matches) == 1
        offsets |= set(matches)
    assert len(offsets) == 25
    kd.reseed(seed=3, epoch=0)
    assert torch.equal(kd.view(x, y)[0], moved)  # reseeding replays the draws


def test_mirrored_images_are_the_original_or_its_left_right_mirror_about_half_the_time():
    x = torch.randn(400, 2, 4, 5)
    kd = Distillation(teacher=nn.Identity(), flip=True)
    kd.reseed(seed=0, epoch=0)
    out, _ = kd.view(x, torch.zeros(400, dtype=torch.long))
    mirrored = 0
    for img, o in zip(x.numpy(), out.numpy()):
        if np.array_equal(o, img[:, :, ::-1]):
            mirrored += 1
        else:
            assert np.array_equal(o, img)
    assert 160 < mirrored < 240  # Binomial(400, 1/2): 200 ± 10 (4 sigma either side)


def test_moving_needs_image_batches_and_says_so():
    kd = Distillation(teacher=nn.Identity(), shift=1)
    with pytest.raises(HwpruneError, match=r"expected batches of shape \(N, C, H, W\), got \(3, 4\)"):
        kd.view(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    assert not Distillation(teacher=nn.Identity()).changes_inputs


def test_cli_flags_reach_the_run(tmp_path, monkeypatch):
    """``--distill-shift 2 --distill-flip`` on the command line are the settings the run reports."""
    import json

    from hwprune.cli.main import main

    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--target", "host-cpu", "--flops", "0.5", "--epochs", "1", "0", "1", "--distill-shift", "2",
                 "--distill-flip", "--no-latency", "--out", "x", "--quiet"])
    assert code == 0
    config = json.loads((tmp_path / "x" / "report.json").read_text())["run"]["config"]
    assert config["distill_shift"] == 2 and config["distill_flip"] is True


def test_moving_non_images_is_refused_before_training(tmp_path):
    """A model on vectors asked to distill on moved images is refused up front, naming the flag and shape."""
    import hwprune
    from torch.utils.data import TensorDataset

    from hwprune.budget import Budget
    from hwprune.training.pipeline import FitConfig

    data = TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    cfg = FitConfig(budget=Budget("sparsity", 0.5), epochs_dense=1, epochs_regularize=0, epochs_finetune=1,
                    distill_flip=True)
    with pytest.raises(HwpruneError, match=r"--distill-shift/--distill-flip .* shape \(1, 6\), not \(N, C, H, W\)"):
        hwprune.fit(net, data, target="host-cpu", config=cfg, out_dir=tmp_path / "run", progress=None, measure=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
