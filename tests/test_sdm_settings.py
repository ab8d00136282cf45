"""SamplerSettings: the start fraction parsed once and exactly, validation, the manifest form,
and one source for every default (CLI options, experiment and training configs agree with it)."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest

from diffmix.errors import ConfigError
from diffmix.sdm.settings import DEFAULTS, SamplerSettings, fraction_text, parse_fraction, start_index


def test_parse_fraction_is_exact():
    assert parse_fraction("0.55") == Fraction(11, 20)
    assert parse_fraction(0.55) == Fraction(11, 20)  # via repr, not the binary float 0.55000000000000004...
    assert parse_fraction(" 11/20 ") == Fraction(11, 20)
    assert parse_fraction(Fraction(1, 3)) == Fraction(1, 3)
    assert parse_fraction(1) == 1
    for bad in ("abc", "", "1/0", True, None):
        with pytest.raises(ConfigError, match="not a number"):
            parse_fraction(bad)


@pytest.mark.parametrize("value, text", [
    (Fraction(11, 20), "0.55"), (Fraction(1, 2), "0.5"), (Fraction(1), "1"), (Fraction(29, 100), "0.29"),
    (Fraction(1, 3), "1/3"), (Fraction(1, 1000), "0.001"), (Fraction(3, 2), "1.5"), (Fraction(1, 16), "0.0625"),
])
def test_fraction_text_is_canonical_and_round_trips(value, text):
    assert fraction_text(value) == text
    assert parse_fraction(text) == value


def test_start_index_integer_arithmetic():
    assert start_index(100, "0.55") == 54
    assert start_index(100, 0.29) == 28  # 100 * 0.29 = 28.999999999999996 as floats
    assert start_index(10, "0.55") == 4
    with pytest.raises(ConfigError, match="leaves no step"):
        start_index(10, "0.05")
    with pytest.raises(ConfigError, match=r"in \(0, 1\], got 1.5"):
        start_index(10, "1.5")


def test_defaults_are_the_official_run():
    s = SamplerSettings()
    assert s == DEFAULTS
    assert (s.steps, s.start_fraction, s.guidance_scale, s.eta, s.solver, s.passes) == (
        100, Fraction(11, 20), 1.5, 0.0, "ddim", None)
    assert s.start_index == 54 and s.num_passes == 55
    # the manifest form: exactly the keys and value types the manifests have always had
    assert s.to_json() == {"steps": 100, "start_fraction": "0.55", "guidance_scale": 1.5, "eta": 0.0}
    assert [type(v) for v in s.to_json().values()] == [int, str, float, float]


def test_parsed_once_frozen_and_equal_by_value():
    a = SamplerSettings(steps=10, start_fraction="0.55", guidance_scale=3)
    b = SamplerSettings(steps=10, start_fraction=0.55, guidance_scale=3.0)
    assert a == b and isinstance(a.start_fraction, Fraction) and isinstance(a.guidance_scale, float)
    assert hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.steps = 20  # type: ignore[misc]
    assert dataclasses.replace(a, guidance_scale=1.0).guidance_scale == 1.0


def test_json_round_trip_ignores_other_keys():
    s = SamplerSettings(steps=20, start_fraction="0.3", guidance_scale=2.0, eta=0.5)
    assert SamplerSettings.from_json({**s.to_json(), "weights": "ema"}) == s
    few = SamplerSettings(solver="unipc", passes=8)
    assert few.spacing == "logsnr" and few.num_passes == 8  # the solver's own grid
    assert few.to_json() == {"steps": 100, "start_fraction": "0.55", "guidance_scale": 1.5, "eta": 0.0,
                             "solver": "unipc", "passes": 8, "spacing": "logsnr"}
    assert SamplerSettings.from_json(few.to_json()) == few
    assert SamplerSettings(passes=8).spacing == "time"  # DDIM keeps its official grid


@pytest.mark.parametrize("kwargs, needle", [
    ({"steps": 0}, "at least one step"),
    ({"steps": 2.5}, "integer"),
    ({"steps": True}, "integer"),
    ({"start_fraction": "0"}, "start_fraction"),
    ({"start_fraction": "x"}, "not a number"),
    ({"guidance_scale": float("nan")}, "finite"),
    ({"guidance_scale": "big"}, "numbers"),
    ({"eta": -0.1}, "eta must be >= 0"),
    ({"solver": "euler"}, "solver must be one of"),
    ({"passes": 0}, "passes"),
    ({"solver": "dpmpp-2m", "eta": 0.5}, "deterministic"),
    ({"spacing": "logsnr"}, "set passes too"),
    ({"passes": 5, "spacing": "cosine"}, "spacing must be one of"),
])
def test_invalid_settings_are_config_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        SamplerSettings(**kwargs)


def test_every_default_comes_from_the_settings():
    """CLI options, the experiment's synthesis stage and the SDM training previews all start
    from SamplerSettings' defaults (written once, in diffmix.sdm.settings)."""
    import inspect

    from diffmix.synth.cli import synthesize_cmd
    from diffmix.pipeline.experiment import SynthStage
    from diffmix.sdm.cli import sample_cmd
    from diffmix.sdm.train import SDMTrainConfig

    for cmd in (synthesize_cmd, sample_cmd):
        opts = {name: p.default.default for name, p in inspect.signature(cmd).parameters.items()}
        got = SamplerSettings(steps=opts["steps"], start_fraction=opts["start_fraction"],
                              guidance_scale=opts["guidance_scale"], eta=opts["eta"], solver=opts["solver"],
                              passes=opts["passes"])
        assert got == DEFAULTS, cmd.__name__
    assert SynthStage().sampler() == DEFAULTS
    assert SDMTrainConfig().sampler == dataclasses.replace(DEFAULTS)


def test_experiment_config_names_the_solver_only_when_set():
    """config.yaml is a run's identity: experiments made before solvers existed keep theirs."""
    from diffmix.pipeline.experiment import SynthStage

    assert not {"solver", "passes", "spacing"} & set(SynthStage().model_dump(mode="json"))
    few = SynthStage(solver="unipc", passes=8)
    dumped = few.model_dump(mode="json")
    assert (dumped["solver"], dumped["passes"]) == ("unipc", 8) and "spacing" not in dumped
    assert few.sampler() == SamplerSettings(solver="unipc", passes=8, spacing="logsnr")
    with pytest.raises(ConfigError, match="deterministic"):
        SynthStage(solver="unipc", eta=0.3).sampler()
