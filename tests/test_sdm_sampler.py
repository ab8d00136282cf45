"""The DiffMix sampler (spec 4): start index, oracle exactness, batched CFG, reference agreement, to_uint8."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from diffmix.errors import ConfigError
from diffmix.sdm.diffusion import GaussianDiffusion
from diffmix.sdm.sampler import diffmix_sample, start_index, to_uint8
from diffmix.sdm.settings import OFFICIAL, SamplerSettings

DIFF = GaussianDiffusion.linear()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_start_index_integer_arithmetic():
    assert start_index(100, "0.55") == 54
    assert start_index(100, 0.55) == 54
    assert start_index(100, Fraction(11, 20)) == 54
    assert DIFF.respace("ddim100").timesteps[start_index(100, 0.55)] == 540
    # 100 * 0.29 == 28.999999999999996 in floats: a float product would give index 27
    assert math.floor(100 * 0.29) == 28
    assert start_index(100, 0.29) == 28
    assert start_index(100, "1") == 99
    assert start_index(1000, "0.001") == 0
    for bad in ["0", "1.5", "abc", "0.001"]:
        with pytest.raises(ConfigError):
            start_index(100, bad)


def _oracle(y0: torch.Tensor):
    """A 'network' that returns the exact noise relative to y0 (plus junk variance channels)."""
    abar = torch.from_numpy(DIFF.alphas_cumprod)

    def model(x, t, cond):
        a = abar[t].to(x.dtype).view(-1, 1, 1, 1)
        ref = torch.cat([y0] * (x.shape[0] // y0.shape[0]))
        eps = (x - a.sqrt() * ref) / (1 - a).sqrt()
        return torch.cat([eps, torch.full_like(eps, 7.0)], 1)

    return model


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_oracle_returns_y0(scale):
    gen = torch.Generator().manual_seed(0)
    y0 = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64) * 1.8 - 0.9
    cond = torch.rand(2, 6, 16, 16, generator=gen, dtype=torch.float64)
    out = diffmix_sample(_oracle(y0), y0, cond, SamplerSettings(guidance_scale=scale), generator=gen)
    assert out.dtype == torch.float64 and out.shape == y0.shape
    assert torch.allclose(out, y0, atol=1e-12)
    out32 = diffmix_sample(_oracle(y0.float()), y0.float(), cond.float(), SamplerSettings(start_fraction="1"), generator=gen)
    assert torch.allclose(out32, y0.float(), atol=1e-5)


def test_batched_cfg_calls_and_start_noise():
    b = 3
    gen = torch.Generator().manual_seed(1)
    y0 = torch.rand(b, 3, 8, 8, generator=gen) * 2 - 1
    cond = torch.ones(b, 5, 8, 8)
    noise = torch.randn(y0.shape, generator=gen)
    calls = []

    def model(x, t, y):
        calls.append((x.clone(), t.clone(), y.clone()))
        return torch.zeros(x.shape[0], 6, 8, 8)

    diffmix_sample(model, y0, cond, OFFICIAL, noise=noise)
    assert len(calls) == 55  # spec 4: 55 steps, each ONE forward of the cond and null batches
    assert [c[1][0].item() for c in calls] == list(range(540, -1, -10))
    x, t, y = calls[0]
    assert x.shape[0] == 2 * b and torch.equal(t, torch.full((2 * b,), 540))
    assert torch.equal(y[:b], cond) and torch.equal(y[b:], torch.zeros_like(cond))
    a = DIFF.alphas_cumprod[540]
    assert torch.allclose(x[:b], math.sqrt(a) * y0 + math.sqrt(1 - a) * noise, atol=1e-6)
    assert torch.equal(x[:b], x[b:])
    calls.clear()
    diffmix_sample(model, y0, cond, noise=noise)  # the default: UniPC, 5 passes from the same start
    assert len(calls) == 5 and calls[0][1][0].item() == 540 and calls[-1][1][0].item() == 0

    calls.clear()
    diffmix_sample(model, y0, cond, SamplerSettings(guidance_scale=1.0), noise=noise)
    assert len(calls) == 55 and calls[0][0].shape[0] == b and torch.equal(calls[0][2], cond)


def _toy_net(seed: int):
    """A small nonlinear label-dependent network for comparing samplers."""
    torch.manual_seed(seed)
    conv_x = torch.nn.Conv2d(3, 6, 3, padding=1)
    conv_y = torch.nn.Conv2d(5, 6, 3, padding=1)

    def model(x, t, y):
        return torch.tanh(conv_x(x) + conv_y(y) + t.view(-1, 1, 1, 1) / 1000.0)

    return model


def _reference(model, y0, cond, noise, s, eta, gen):
    """spec 4 written out plainly: two forward passes per step, float64 scalars."""
    spaced = DIFF.respace("ddim100")
    i0 = 54
    acp = spaced.alphas_cumprod
    x = math.sqrt(acp[i0]) * y0 + math.sqrt(1 - acp[i0]) * noise
    for i in range(i0, -1, -1):
        t = torch.full((y0.shape[0],), int(spaced.timesteps[i]))
        eps_c = model(x, t, cond)[:, :3]
        eps_u = model(x, t, torch.zeros_like(cond))[:, :3]
        eps = eps_u + s * (eps_c - eps_u)
        a, ap = acp[i], (acp[i - 1] if i > 0 else 1.0)
        x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
        eps = (x / math.sqrt(a) - x0) / math.sqrt(1 / a - 1)
        sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
        x = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * eps
        if sigma > 0 and i > 0:
            x = x + sigma * torch.randn(y0.shape, generator=gen)
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_matches_two_pass_reference(eta):
    model = _toy_net(0)
    gen = torch.Generator().manual_seed(2)
    y0 = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    cond = (torch.rand(2, 5, 8, 8, generator=gen) > 0.5).float()
    noise = torch.randn(y0.shape, generator=gen)
    with torch.no_grad():
        ours = diffmix_sample(model, y0, cond, SamplerSettings(eta=eta), noise=noise, generator=torch.Generator().manual_seed(3))
        ref = _reference(model, y0, cond, noise, 1.5, eta, torch.Generator().manual_seed(3))
        plain = diffmix_sample(model, y0, cond, SamplerSettings(eta=eta, guidance_scale=1.0), noise=noise,
                               generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ours, ref, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # guidance changes the result
    assert ours.abs().max() <= 1.0


def test_same_seed_same_bytes():
    model = _toy_net(1)
    y0 = torch.zeros(1, 3, 8, 8)
    cond = torch.ones(1, 5, 8, 8)
    with torch.no_grad():
        noisy = SamplerSettings(eta=1.0)
        a = diffmix_sample(model, y0, cond, noisy, generator=torch.Generator().manual_seed(5))
        b = diffmix_sample(model, y0, cond, noisy, generator=torch.Generator().manual_seed(5))
        c = diffmix_sample(model, y0, cond, noisy, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_shape_mismatch_is_user_error():
    with pytest.raises(ConfigError):
        diffmix_sample(_toy_net(0), torch.zeros(2, 3, 8, 8), torch.zeros(1, 5, 8, 8))


def test_to_uint8_round_half_up():
    x = torch.tensor([-1.0, 1.0, 0.0, 2.0, -3.0]).view(1, 1, 5, 1).expand(1, 3, 5, 1)
    assert to_uint8(x)[0, :, 0, 0].tolist() == [0, 255, 128, 255, 0]
    assert to_uint8(x).shape == (1, 5, 1, 3) and to_uint8(x).dtype == np.uint8
    # values whose scaled form is exactly k + 0.5 go up (torch.round would send even k+0.5 down)
    k = torch.arange(0, 255, dtype=torch.float32)
    cand = (2 * (k + 0.5) / 255 - 1).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    v = (cand[0, 0, 0] + 1) / 2 * 255
    exact = v == k + 0.5
    assert exact.sum() > 10
    got = torch.from_numpy(to_uint8(cand)[0, 0, :, 0].astype(np.int64))
    assert torch.equal(got[exact], (k[exact] + 1).long())


# ------------------------------------------------------------------ the UNetModel fast path


def _unet(seed: int = 0):
    """A tiny SDM U-Net with every weight non-zero (three levels: 16, 8, 4 px maps)."""
    from diffmix.sdm.unet import UNetConfig, UNetModel

    torch.manual_seed(seed)
    config = UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_resolutions=(4,), num_head_channels=32, label_nc=5)
    model = UNetModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("scale, label_cache", [(1.5, None), (1.5, False), (1.0, None), (3.0, True)])
def test_unet_fast_path_equals_plain_two_pass(scale, label_cache):
    model = _unet(0)
    gen = torch.Generator().manual_seed(4)
    y0 = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    cls = torch.randint(0, 4, (2, 16, 16), generator=gen)
    cond = torch.cat([torch.nn.functional.one_hot(cls, 4).permute(0, 3, 1, 2).float(),
                      (torch.rand(2, 1, 16, 16, generator=gen) > 0.8).float()], 1)
    noise = torch.randn(y0.shape, generator=gen)
    kw = dict(settings=SamplerSettings(steps=100, start_fraction="0.04", guidance_scale=scale), noise=noise)
    calls = []

    def plain(x, t, y):  # the generic path: no `conditioned` of its own, so one plain forward per step
        calls.append(x.shape[0])
        return model(x, t, y)

    with torch.no_grad():
        fast = diffmix_sample(model, y0, cond, label_cache=label_cache, **kw)
        slow = diffmix_sample(plain, y0, cond, **kw)
    assert calls == [4 if scale > 1 else 2] * 4
    assert (fast - y0).abs().mean() > 1e-2  # the model really acted
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_label_cache_follows_budget(monkeypatch):
    import diffmix.sdm.unet as unet_mod
    from diffmix.sdm.unet import SPADELabels

    made = []

    class Spy(SPADELabels):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    assert unet_mod.label_cache_budget(torch.device("cpu")) == 2 * 2**30
    monkeypatch.setattr(unet_mod, "SPADELabels", Spy)
    model = _unet(1)
    y0, cond = torch.zeros(1, 3, 16, 16), torch.ones(1, 5, 16, 16)
    need = model.label_cache_bytes(1, 16, 16)
    kw = dict(settings=SamplerSettings(steps=100, start_fraction="0.02"), noise=torch.zeros_like(y0))
    with torch.no_grad():
        monkeypatch.setattr(unet_mod, "label_cache_budget", lambda device: need)
        a = diffmix_sample(model, y0, cond, **kw)
        monkeypatch.setattr(unet_mod, "label_cache_budget", lambda device: need - 1)
        b = diffmix_sample(model, y0, cond, **kw)
        c = diffmix_sample(model, y0, cond, label_cache=True, **kw)
    assert [(m.store, m.null) for m in made] == [(True, True), (False, True), (True, True)]
    assert len(made[0]._cond) > 0 and len(made[1]._cond) == 0  # only a storing one keeps them
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)
