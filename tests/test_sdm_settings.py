"""SamplerSettings: the start fraction parsed once and exactly, validation, the manifest form,
and one source for every default (CLI options, experiment and training configs agree with it)."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest

from diffmix.errors import ConfigError
from diffmix.sdm.settings import (DEFAULTS, OFFICIAL, SamplerSettings, default_passes, fraction_text, parse_fraction,
                                  sampler_settings, start_index)


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


def test_field_defaults_are_the_official_run():
    """What a manifest or config without a solver key recorded: spec 4's DDIM run."""
    s = SamplerSettings()
    assert s == OFFICIAL
    assert (s.steps, s.start_fraction, s.guidance_scale, s.eta, s.solver, s.passes) == (
        100, Fraction(11, 20), 1.5, 0.0, "ddim", None)
    assert s.start_index == 54 and s.num_passes == 55
    # the manifest form: exactly the keys and value types the manifests have always had
    assert s.to_json() == {"steps": 100, "start_fraction": "0.55", "guidance_scale": 1.5, "eta": 0.0}
    assert [type(v) for v in s.to_json().values()] == [int, str, float, float]


def test_the_default_is_unipc_with_five_passes_from_the_official_start():
    """docs/solvers.md: the 192-patch curve's choice; the start time and guidance stay spec 4's."""
    assert DEFAULTS == SamplerSettings(solver="unipc", passes=5, spacing="logsnr") == sampler_settings()
    assert (DEFAULTS.start_index, DEFAULTS.num_passes, DEFAULTS.guidance_scale) == (54, 5, 1.5)
    assert DEFAULTS.to_json() == {"steps": 100, "start_fraction": "0.55", "guidance_scale": 1.5, "eta": 0.0,
                                  "solver": "unipc", "passes": 5, "spacing": "logsnr"}
    # naming a solver alone gives its own default budget: `ddim` alone is the official run
    assert sampler_settings("ddim") == OFFICIAL and OFFICIAL.num_passes == 55
    assert sampler_settings("dpmpp-2m").passes == 10
    assert sampler_settings("unipc", 8).passes == 8 and sampler_settings("ddim", 5).passes == 5
    assert default_passes("ddim", 100, "0.55") is None and default_passes("unipc", 100, "0.55") == 5
    # never more than the respaced steps from the start: 10 steps from 55% have 5, 4 steps 2
    assert default_passes("unipc", 10, "0.55") == 5 and default_passes("dpmpp-2m", 10, "0.55") == 5
    assert default_passes("unipc", 4, "0.55") == 2
    assert sampler_settings(steps=2, start_fraction="0.5").passes == 1
    with pytest.raises(ConfigError, match="solver must be one of"):
        sampler_settings("euler")


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
    from diffmix.sdm.cli import sampler_from_options
    from diffmix.sdm.train import SDMTrainConfig

    for cmd in (synthesize_cmd, sample_cmd):
        opts = {name: p.default.default for name, p in inspect.signature(cmd).parameters.items()}
        got = sampler_from_options(opts["steps"], opts["start_fraction"], opts["guidance_scale"], opts["eta"],
                           opts["solver"], opts["passes"], opts["spacing"])
        assert got == DEFAULTS, cmd.__name__
    assert SynthStage().sampler() == DEFAULTS
    assert SDMTrainConfig().sampler == OFFICIAL  # previews: the official sampler, the reference


def test_experiment_config_names_the_solver_unless_it_is_ddim():
    """config.yaml is a run's identity: experiments made before solvers existed (DDIM, every
    step) keep theirs with `solver: ddim`; another solver's budget is written resolved, so a
    folder made when `solver: unipc` meant every step does not resume as a 5-pass run."""
    from diffmix.pipeline.experiment import SynthStage

    assert not {"solver", "passes", "spacing"} & set(SynthStage(solver="ddim").model_dump(mode="json"))
    assert SynthStage(solver="ddim").sampler() == OFFICIAL
    default = SynthStage().model_dump(mode="json")
    assert (default["solver"], default["passes"]) == ("unipc", 5) and "spacing" not in default
    assert SynthStage().sampler() == SynthStage(solver="unipc", passes=5).sampler() == DEFAULTS
    assert SynthStage(solver="unipc", passes=5).model_dump(mode="json") == default
    few = SynthStage(solver="unipc", passes=8)
    dumped = few.model_dump(mode="json")
    assert (dumped["solver"], dumped["passes"]) == ("unipc", 8) and "spacing" not in dumped
    assert few.sampler() == SamplerSettings(solver="unipc", passes=8, spacing="logsnr")
    # a bad combination is refused when the config loads, with its place
    from diffmix.pipeline.experiment import load_experiment_config
    with pytest.raises(ConfigError, match="synthesis: eta > 0 is DDIM's; the unipc solver is deterministic"):
        load_experiment_config("demo", {"synthesis": {"solver": "unipc", "eta": 0.3}})
    # the default budget never exceeds the respaced steps from the start (4 steps from 55%: 2)
    assert SynthStage(steps=4).sampler().passes == 2 and SynthStage(steps=4).model_dump()["passes"] == 2
