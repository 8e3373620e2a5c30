"""E7 evaluations (thesis §5.5.1, appendix §5.7.2, §5.10): density ratios, class-conditional sampling,
GAN-test, denoising, gradient fooling (Eq. 5.7), their config wiring (smoke_e7 end to end through the CLI) and
option errors."""
import copy
import csv
import math
import os

import pytest
import torch
from torch import nn

from _trained_models import digits_data, trained_digits_model
from fastjac.cli import CONFIG_DIR
from fastjac.cli import main as cli_main
from fastjac.evaluation import fooling, sampling
from fastjac.evaluation.density_ratio import density_ratios
from fastjac.evaluation.gan_test import classifier_config, gan_test_accuracy
from fastjac.evaluation.gradient_fooling import measure
from fastjac.evaluation.images import valid_range
from fastjac.evaluation.registry import Cell, EvalContext, parse_options
from fastjac.evaluation.runs import selected_cells
from fastjac.training import config, synthetic
from fastjac.training.config import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


# --- density ratios (§5.5.1) --------------------------------------------------------------------------------
def _tiny_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Softplus(beta=2.0), nn.Flatten(),
                         nn.Linear(3 * 16, 4)).double()


def test_density_ratios_match_a_brute_force_computation():
    model = _tiny_model()
    with torch.no_grad():  # non-trivial running statistics, to see that eval mode is used
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.train()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    stds, draws, seed = [0.1, 1.0, 0.0], 3, 7
    got = density_ratios(model, x, y, stds, draws=draws, seed=seed, batch_size=2)
    assert model.training, "the model's mode is restored"
    model.eval()
    g = torch.Generator().manual_seed(seed)
    want = torch.empty(len(stds), 5, draws, dtype=torch.float64)
    with torch.no_grad():
        for d in range(draws):
            z = torch.randn(x.shape, generator=g, dtype=torch.float64)
            for n in range(5):
                clean = model(x[n:n + 1])[0, y[n]]
                for s, std in enumerate(stds):
                    want[s, n, d] = model(x[n:n + 1] + std * z[n:n + 1])[0, y[n]] - clean
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[2], torch.zeros(5, draws, dtype=torch.float64))  # sigma = 0: ratio 1
    torch.testing.assert_close(density_ratios(model, x, y, stds, draws, seed, batch_size=None), got)


class _Quadratic(nn.Module):
    """f_k(x) = -||x - c_k||^2 / 2: the log-density of N(c_k, I) up to its normaliser."""

    def __init__(self, centres):
        super().__init__()
        self.register_buffer("centres", centres)

    def forward(self, x):
        return -0.5 * (x.flatten(1)[:, None] - self.centres.flatten(1)[None]).pow(2).sum(-1)


def test_density_ratio_of_a_quadratic_logit_matches_its_expectation():
    # f(x) = -||x||^2/2: f(x+eta) - f(x) = -x.eta - ||eta||^2/2, so E = -d sigma^2/2 and, for fixed x,
    # Var = sigma^2 ||x||^2 + d sigma^4 / 2. The mean over N images x draws is tested within 4 standard errors.
    torch.manual_seed(0)
    d, n, draws = 12, 300, 8
    model = _Quadratic(torch.zeros(2, 1, 3, 4, dtype=torch.float64))
    x = torch.randn(n, 1, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (n,))
    stds = [0.05, 0.3, 1.0]
    ratios = density_ratios(model, x, y, stds, draws=draws, seed=1, batch_size=64)
    for std, r in zip(stds, ratios):
        expected = -d * std ** 2 / 2
        var = (std ** 2 * x.flatten(1).pow(2).sum(1) + d * std ** 4 / 2).mean()
        se = math.sqrt(float(var) / (n * draws))
        assert abs(float(r.mean()) - expected) < 4 * se, (std, float(r.mean()), expected, se)


# --- sampling (§5.4.1, §5.5.1, appendix §5.10) --------------------------------------------------------------
def test_gradient_ascent_raises_every_sample_logit_at_every_step():
    model = trained_digits_model("relu")
    low, high = valid_range("digits", 1)
    classes = torch.arange(10).repeat_interleave(2)
    x0 = sampling.initial_inputs(20, (1, 16, 16), "uniform", 0, low, high)
    assert (x0 >= low).all() and (x0 <= high).all()
    result = sampling.gradient_ascent(model, x0, classes, steps=10, step_size=0.3, low=low, high=high)
    assert result.logits.shape == (11, 20)
    assert (result.logits[-1] > result.logits[0]).all()
    # measured: every step raises every logit at this step size; allow a few non-increasing (clamped) steps
    assert (result.logits.diff(dim=0) > 0).float().mean() > 0.9
    assert (result.samples >= low).all() and (result.samples <= high).all()
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_langevin_samples_a_gaussian_energy():
    # f_i(x) = -||x - mu_i||^2/2: p(x | i) = N(mu_i, I). The unadjusted Langevin chain x <- x + (eps/2) grad + sqrt(eps) z
    # has the stationary law N(mu_i, v I) with v = 1 / (1 - eps/4) (solve v = (1 - eps/2)^2 v + eps), 1.026 at
    # eps = 0.1; 300 steps contract the start by 0.95^300 ~ 2e-7. Independent chains: the per-class mean of the
    # 4 x 1000 coordinates has standard error sqrt(v / 4000) ~ 0.016, the pooled variance of 12000 coordinates
    # ~ v sqrt(2 / 12000) ~ 0.013; both are tested within 4 standard errors.
    mus = torch.tensor([2.0, -1.0, 0.5]).view(3, 1, 1, 1).expand(3, 1, 2, 2).clone()
    model = _Quadratic(mus)
    per_class, eps = 1000, 0.1
    classes = torch.arange(3).repeat_interleave(per_class)
    x0 = torch.zeros(3 * per_class, 1, 2, 2)
    out = sampling.langevin(model, x0, classes, steps=300, step_size=eps, seed=5, batch_size=1024).samples
    v = 1 / (1 - eps / 4)
    dev = out - mus[classes]
    for c in range(3):
        assert abs(float(dev[classes == c].mean())) < 4 * math.sqrt(v / (4 * per_class)), c
    pooled = float(dev.pow(2).mean())
    assert abs(pooled - v) < 4 * v * math.sqrt(2 / dev.numel()), pooled
    assert abs(pooled - 1) < 0.1  # close to the target law N(mu_i, I)


def test_samplers_are_deterministic_under_a_seed_and_independent_of_batching():
    model = _Quadratic(torch.randn(4, 1, 3, 3))
    classes = torch.tensor([0, 1, 2, 3, 3, 2, 1])
    x0 = sampling.initial_inputs(7, (1, 3, 3), "normal", seed=2)
    torch.testing.assert_close(x0, sampling.initial_inputs(7, (1, 3, 3), "normal", seed=2), rtol=0, atol=0)
    a = sampling.langevin(model, x0, classes, steps=5, step_size=0.01, seed=3).samples
    b = sampling.langevin(model, x0, classes, steps=5, step_size=0.01, seed=3, batch_size=3).samples
    c = sampling.langevin(model, x0, classes, steps=5, step_size=0.01, seed=4).samples
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a, c)
    start, den = sampling.denoise(model, x0, classes, noise_std=0.1, steps=3, seed=1)
    start2, den2 = sampling.denoise(model, x0, classes, noise_std=0.1, steps=3, seed=1, batch_size=2)
    torch.testing.assert_close(start, start2, rtol=0, atol=0)
    torch.testing.assert_close(den.samples, den2.samples, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="init"):
        sampling.initial_inputs(3, (1, 2, 2), "gaussian")
    with pytest.raises(ValueError, match="classes"):
        sampling.gradient_ascent(model, x0, classes[:3])
    with pytest.raises(ValueError, match="step_size"):
        sampling.langevin(model, x0, classes, step_size=0)


def test_denoising_moves_noisy_images_back_to_the_mode():
    # f_i(x) = -||x - c_i||^2/2 has its mode at the "clean image" c_i: gradient ascent x <- x + a (c_i - x) shrinks the
    # distance by (1 - a) per step, so 20 steps of a = 0.2 leave 0.8^20 ~ 1.2 % of it (exactly, without clamping).
    clean = torch.randn(6, 1, 3, 3)
    model = _Quadratic(clean)
    classes = torch.arange(6)
    start, result = sampling.denoise(model, clean, classes, noise_std=0.1, sampler="ascent", steps=20, step_size=0.2)
    torch.testing.assert_close(result.samples - clean, (start - clean) * 0.8 ** 20, rtol=1e-4, atol=1e-6)
    assert 0.05 < float((start - clean).std()) < 0.15  # the noise has the asked std (54 draws)


# --- GAN-test (§5.5.1, Table 5.1) ---------------------------------------------------------------------------
def _logistic_regression_classifier():
    """An independently trained classifier of the 16x16 digits: scikit-learn's logistic regression as a module."""
    from sklearn.linear_model import LogisticRegression

    train_x, train_y, _, _ = digits_data()
    lr = LogisticRegression(max_iter=2000, C=0.1).fit(train_x.flatten(1).numpy(), train_y.numpy())
    linear = nn.Linear(train_x[0].numel(), 10)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(lr.coef_))
        linear.bias.copy_(torch.from_numpy(lr.intercept_))
    return nn.Sequential(nn.Flatten(), linear).eval()


def test_gan_test_of_gradient_ascent_samples_is_far_above_chance():
    # Measured: random starting images score 10 % (chance) under the independent logistic regression, 20 ascent
    # steps of 0.3 from a ReLU VGG-4 give 46 %, and 78 % under the generating model itself.
    generator = trained_digits_model("relu")
    classifier = _logistic_regression_classifier()
    _, _, test_x, test_y = digits_data()
    assert gan_test_accuracy(classifier, test_x, test_y) > 90
    low, high = valid_range("digits", 1)
    classes = torch.arange(10).repeat_interleave(5)
    x0 = sampling.initial_inputs(50, (1, 16, 16), "uniform", 0, low, high)
    samples = sampling.gradient_ascent(generator, x0, classes, 20, 0.3, low=low, high=high).samples
    assert gan_test_accuracy(classifier, x0, classes) <= 20
    assert gan_test_accuracy(classifier, samples, classes) >= 30
    assert gan_test_accuracy(generator, samples, classes) >= 60


# --- gradient fooling (appendix §5.7.2, Eq. 5.7) ------------------------------------------------------------
def test_fooling_loss_and_mask_fraction_match_their_formulas():
    mask = fooling.square_mask(32, 32, 0.0, 0.0, 15 / 32)
    assert int(mask.sum()) == 225 and mask[:15, :15].all()
    assert int(fooling.square_mask(8, 8, 0.5, 0.75, 0.5).sum()) == 8  # cropped at the border: 4 x 2
    g = torch.randn(3, 2, 32, 32, dtype=torch.float64)
    a = g.abs().sum(1)
    s = a / a.sum((1, 2), keepdim=True)
    m = mask.double() / 225
    torch.testing.assert_close(fooling.fooling_loss(g, mask), ((s - m) ** 2).sum((1, 2)).mean())
    e = g.pow(2).sum(1)
    torch.testing.assert_close(fooling.mask_fraction(g, mask), e[:, mask].sum(1) / e.sum((1, 2)))
    inside = torch.zeros_like(g)
    inside[..., :15, :15] = 1.0
    assert torch.allclose(fooling.mask_fraction(inside, mask), torch.ones(3, dtype=torch.float64))
    assert float(fooling.fooling_loss(inside, mask)) < 1e-20  # s = m exactly
    with pytest.raises(ValueError, match="mask"):
        fooling.fooling_loss(g, mask[:16])


def test_fine_tuning_with_the_fooling_loss_moves_logit_gradients_into_the_mask():
    # Measured (1 epoch, 512 training images, batch 32, Adam 1e-3, weight 1000, BatchNorm in eval mode): the share
    # of logit-gradient energy in the top-left quarter goes 0.24 -> 0.84 (mask area 0.25), L_fool 0.016 -> 0.006,
    # test accuracy 99.5 -> 67 %.
    model = trained_digits_model("relu")
    train_x, train_y, test_x, test_y = digits_data()
    mask = fooling.square_mask(16, 16, 0.0, 0.0, 0.5)
    x, y = test_x[:200], test_y[:200]
    before = measure(model, x, y, mask, 1000.0, 200)
    fooled = copy.deepcopy(model)
    history = fooling.fine_tune(fooled, train_x[:512], train_y[:512], mask, 1000.0, 1, 1e-3, 32, 0,
                                batch_norm="eval")
    after = measure(fooled, x, y, mask, 1000.0, 200)
    assert len(history) == 1 and math.isfinite(history[0]["loss"])
    assert before["logit_energy_in_mask"] < 0.35
    assert after["logit_energy_in_mask"] > 0.5
    assert after["fool_loss"] < before["fool_loss"]
    assert after["test_acc"] > 30


# --- options and config wiring ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, spec, option", [
    ("density_ratio", {"stds": []}, "stds"),
    ("density_ratio", {"draws": 0}, "draws"),
    ("density_ratio", {"images": "all"}, "images"),
    ("gan_test", {"sampler": "gibbs"}, "sampler"),
    ("gan_test", {"init": "zeros"}, "init"),
    ("gan_test", {"steps": 0}, "steps"),
    ("gan_test", {"classes": [1, -2]}, "classes"),
    ("gan_test", {"paper": {"baseline": "high"}}, "paper.baseline"),
    ("denoising", {"noise_std": 0.0}, "noise_std"),
    ("denoising", {"sampler": "ddpm"}, "sampler"),
    ("gradient_fooling", {"mask_size": 1.5}, "mask_size"),
    ("gradient_fooling", {"mask_top": 1.0}, "mask_top"),
    ("gradient_fooling", {"weight": -1.0}, "weight"),
    ("gradient_fooling", {"batch_norm": "live"}, "batch_norm"),
])
def test_bad_options_name_the_option(name, spec, option):
    with pytest.raises(ConfigError, match=rf"evaluations\.{name}\.{option}"):
        parse_options(name, spec)


def test_unknown_option_and_bad_config_values_are_config_errors():
    with pytest.raises(ConfigError, match=r"evaluations\.gan_test.*unknown field.*bogus"):
        parse_options("gan_test", {"bogus": 1})
    data = config.read(os.path.join(CONFIG_DIR, "smoke_e7.yaml"))
    data["evaluations"]["density_ratio"]["stds"] = [0.1, -1]
    with pytest.raises(ConfigError, match=r"evaluations\.density_ratio\.stds"):
        config.from_mapping(data)
    cfg = config.load(os.path.join(CONFIG_DIR, "smoke_e7.yaml"))
    ctx = EvalContext(cfg, "/nonexistent", [Cell("baseline", None, 0, "/nonexistent", cfg)], log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"evaluations\.gradient_fooling\.methods"):
        selected_cells(ctx, ["no-such-method"], "gradient_fooling")
    with pytest.raises(ConfigError, match=r"evaluations\.gan_test\.classifier: optim\.lr"):
        classifier_config(ctx, {"optim.lr": -1.0})
    derived = classifier_config(ctx, {"seed": 1000, "model.activation": "relu"})
    assert derived.sweep is None and derived.loss == {"ce": 1.0} and derived.model["activation"] == "relu"
    assert derived.seed == 1000 and not derived.evaluations


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_smoke_e7_runs_every_evaluation_through_the_cli(tmp_path, capsys):
    root = tmp_path / "data"
    synthetic.write_cifar(str(root), "cifar100", n_train=40, n_test=10, seed=0)
    out = tmp_path / "out"
    args = ["run", "smoke_e7", "--data-root", str(root), "--out", str(out), "--no-progress",
            "--set", "sweep.methods={baseline: {loss: {ce: 1.0}}, gradient-norm: {loss: {ce: 1.0, gradient_norm: 0.001}}}"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    for name in ("density_ratio", "gan_test", "denoising", "gradient_fooling"):
        folder = out / "evaluations" / name
        assert (folder / "table.csv").is_file() and (folder / "plot.png").stat().st_size > 0, name
        assert f"evaluation {name}" in printed
    density = _rows(out / "evaluations" / "density_ratio" / "table.csv")
    assert len(density) == 2 * 2 and all(math.isfinite(float(r["mean"])) for r in density)
    gan = _rows(out / "evaluations" / "gan_test" / "table.csv")
    assert [r["method"] for r in gan] == ["baseline", "gradient-norm"]
    assert [float(r["paper"]) for r in gan] == [59.47, 80.07]
    assert all(0 <= float(r["gan_test"]) <= 100 and r["samples"] == "2" for r in gan)
    assert (out / "evaluations" / "gan_test" / "classifier" / "result.json").is_file()
    assert (out / "evaluations" / "gan_test" / "samples_baseline_seed0.png").is_file()
    denoised = _rows(out / "evaluations" / "denoising" / "table.csv")
    assert [r["method"] for r in denoised] == ["baseline", "gradient-norm"]
    assert all(float(r["mse_noisy"]) > 0 for r in denoised)
    fool = _rows(out / "evaluations" / "gradient_fooling" / "table.csv")
    assert [r["model"] for r in fool] == ["original", "fooled"]
    assert abs(float(fool[0]["mask_area"]) - 225 / 1024) < 1e-9
    assert (out / "evaluations" / "gradient_fooling" / "maps_baseline_seed0.png").is_file()
    # --resume: nothing is trained or evaluated again (the classifier's result and the tables exist)
    stamp = os.path.getmtime(out / "evaluations" / "gan_test" / "classifier" / "model.pt")
    assert cli_main(args + ["--resume"]) == 0
    assert os.path.getmtime(out / "evaluations" / "gan_test" / "classifier" / "model.pt") == stamp
    assert "[done] evaluation gan_test" in capsys.readouterr().out
