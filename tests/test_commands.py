"""Command-line behaviour a user meets first: the classical trainings, run folders as
models, and messages that name the file or the key and the fix."""

from __future__ import annotations

import shutil

import pytest

from harmonize.cli import main
from harmonize.synth import generate


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmd") / "synth"
    generate(out, sites=2, per_site=6, size=32, seed=0, progress=False)
    return out


def test_train_fourier_then_apply_from_the_run_folder(synth, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "fourier", "-q", "--data", str(synth / "manifest.csv"),
                 "--reference-site", "site_a", "--out", str(run / "model"),
                 "--beta", "0.05", "--strength", "0.5"]) == 0
    assert "saved fourier translator" in capsys.readouterr().out
    # a run folder (what `harmonize train ... --out RUN` writes) is accepted as the model
    out = tmp_path / "harmonized"
    assert main(["apply", "-q", "--model", str(run), str(synth / "site_b"), str(out)]) == 0
    assert len(list(out.rglob("*.png"))) == 6


def test_bad_classical_parameters_fail_before_reading_images(synth, tmp_path, capsys):
    assert main(["train", "fourier", "-q", "--data", str(synth / "manifest.csv"),
                 "--reference-site", "site_a", "--out", str(tmp_path / "m"),
                 "--strength", "2"]) != 0
    assert "strength=2" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_train_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "harmonize train histogram-matching --data" in text and "fourier" in text


def test_a_misspelt_override_names_the_flag_and_the_key_meant():
    from harmonize.configs import ConfigError
    from harmonize.translators.cyclegan.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config("configs/cyclegan/quick.yaml", {"train.step": 5})
    message = str(info.value)
    assert "--set train.step" in message and "did you mean train.steps?" in message
    assert "quick.yaml" not in message  # the file is not to blame


def test_a_damaged_checkpoint_config_names_the_file(synth, tmp_path, capsys):
    model = tmp_path / "hm"
    assert main(["train", "histogram-matching", "-q", "--data", str(synth / "manifest.csv"),
                 "--reference-site", "site_a", "--out", str(model)]) == 0
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "config.json").write_text("{not json")
    assert main(["apply", "-q", "--model", str(broken), str(synth / "site_b"),
                 str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert str(broken / "config.json") in err and "not valid JSON" in err


def test_an_invalid_input_creates_no_output_folder(tmp_path, capsys):
    assert main(["apply", "-q", "--model", "identity", str(tmp_path / "missing"),
                 str(tmp_path / "out")]) != 0
    assert "neither a folder nor a manifest" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_synth_and_demo_options_are_explained(capsys):
    for command in ("synth", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "patients per site" in text and "image side in pixels" in text


def test_reruns_say_what_they_replace(synth, tmp_path, capsys):
    model, out = tmp_path / "model", tmp_path / "harmonized"
    train = ["train", "histogram-matching", "-q", "--data", str(synth / "manifest.csv"),
             "--out", str(model)]
    assert main([*train, "--reference-site", "site_a"]) == 0
    assert "note:" not in capsys.readouterr().err  # a first run replaces nothing
    assert main([*train, "--reference-site", "site_b"]) == 0
    err = capsys.readouterr().err
    assert "replacing the histogram-matching checkpoint" in err and "'site_a'" in err
    assert main(["apply", "-q", "--model", str(model), str(synth / "site_a"), str(out)]) == 0
    assert "note:" not in capsys.readouterr().err
    assert main(["apply", "-q", "--model", str(model), str(synth / "site_a"), str(out)]) == 0
    assert "already holds 7 file(s)" in capsys.readouterr().err  # 6 images + the log
    assert main(["apply", "-q", "--resume", "--model", str(model), str(synth / "site_a"),
                 str(out)]) == 0
    assert "note:" not in capsys.readouterr().err  # --resume keeps them: nothing to say


def test_debug_shows_the_traceback_that_the_one_line_error_hides(tmp_path, capsys,
                                                                 monkeypatch):
    from harmonize.cli import main

    monkeypatch.delenv("HARMONIZE_DEBUG", raising=False)
    args = ["synth", str(tmp_path / "s"), "--sites", "0", "-q"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "harmonize: error: need sites >= 1" in err and "--debug" in err
    with pytest.raises(ValueError, match="need sites >= 1"):
        main(["--debug", *args])
    with pytest.raises(ValueError):  # after the subcommand, as users type it
        main([*args, "--debug"])
    monkeypatch.setenv("HARMONIZE_DEBUG", "1")
    with pytest.raises(ValueError):
        main(args)
