"""The CLI as a user runs it: real processes, real exit codes, no tracebacks on user errors."""

import os
import subprocess
import sys

import pytest

from chatexaonepath.vision_tower.features import read_features


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "chatexaonepath.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def all_commands(group=None, prefix=()):
    """Every command path of the CLI, found from the typer app itself (so new commands are covered)."""
    import typer.main

    from chatexaonepath.cli import app

    group = group or typer.main.get_command(app)
    paths = [list(prefix)]
    for name, command in getattr(group, "commands", {}).items():
        paths += all_commands(command, (*prefix, name))
    return paths


def test_every_command_has_help():
    from typer.testing import CliRunner

    from chatexaonepath.cli import app

    commands = all_commands()
    assert ["raider", "generate"] in commands and ["slide", "extract"] in commands
    for command in commands:
        result = CliRunner().invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


def test_synth_info_extract_end_to_end(tmp_path):
    slide = tmp_path / "s1.tiff"
    assert run_cli("synth", "slide", slide, "--tissue", "stroma", "--size", "2048", "--seed", "3").returncode == 0
    info = run_cli("slide", "info", slide)
    assert info.returncode == 0 and "0.25" in info.stdout + info.stderr
    result = run_cli("slide", "extract", slide, "--out", tmp_path / "feats", "--encoder", "random-vit-b16", "--quiet")
    assert result.returncode == 0, result.stderr
    bag = read_features(tmp_path / "feats" / "s1.h5")
    assert bag.features.shape[1] == 768 and bag.attrs["encoder"] == "random-vit-b16"


def test_user_errors_exit_2_with_one_sentence(slides, tmp_path):
    cases = [
        (["slide", "extract", slides["no_mpp"], "--out", tmp_path, "--encoder", "random-vit-b16", "--fail-fast"], "--mpp"),
        (["slide", "extract", slides["tumor"], "--out", tmp_path, "--encoder", "no-such-encoder"], "available"),
        (["slide", "extract", tmp_path / "missing.svs", "--out", tmp_path, "--encoder", "random-vit-b16"], "not found"),
        (["slide", "info", slides["text_as_svs"]], "not a slide"),
        (["slide", "extract", slides["tumor"], "--out", tmp_path, "--stain-norm", "reinhard"], "--stain-norm"),
        (["synth", "slide", tmp_path / "x.tiff", "--tissue", "bone"], "Unknown tissue"),
    ]
    for args, expected in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_batch_with_bad_slide_finishes_the_rest_and_exits_1(slides, tmp_path):
    result = run_cli("slide", "extract", slides["tumor"], slides["text_as_svs"], "--out", tmp_path,
                     "--encoder", "random-vit-b16")
    assert result.returncode == 1, result.stderr
    assert (tmp_path / "tumor.h5").exists() and (tmp_path / "errors.jsonl").exists()
    assert "Traceback" not in result.stderr and "1 slide(s) failed" in result.stderr


def test_killed_extraction_resumes_without_leftovers(slides, tmp_path):
    """SIGKILL mid-batch (no cleanup runs), then the same command finishes the job."""
    import signal
    import time

    inputs = [slides["tumor"], slides["stroma"], slides["normal_20x"]]
    out = tmp_path / "feats"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = [sys.executable, "-m", "chatexaonepath.cli", "slide", "extract", *map(str, inputs), "--out", str(out),
            "--encoder", "random-vit-b16", "--batch-size", "2", "--quiet"]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "tumor.h5").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # now inside the second slide
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / "tumor.h5").exists()
    assert not (out / "normal_20x.h5").exists(), "the kill came too late to test resuming"
    result = run_cli(*args[3:])
    assert result.returncode == 0, result.stderr
    assert all((out / f"{p.stem}.h5").exists() for p in inputs)
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.lock"))
    assert read_features(out / "stroma.h5").features.shape[1] == 768


def test_chat_answers_one_question_and_writes_a_heatmap(slides, tmp_path):
    from tests.chat.conftest import make_tiny_llm

    llm = make_tiny_llm(tmp_path / "llm")
    heatmap = tmp_path / "attention.png"
    result = run_cli("chat", slides["tumor"], "--llm", llm, "--encoder", "random-vit-b16", "--question",
                     "What is the diagnosis?", "--max-new-tokens", "5", "--heatmap", heatmap)
    assert result.returncode == 0, result.stderr
    assert "UNTRAINED" in result.stderr and heatmap.stat().st_size > 0
    assert result.stdout.strip()  # the streamed answer


def test_chat_with_a_missing_checkpoint_exits_2(slides, tmp_path):
    result = run_cli("chat", slides["tumor"], "--model", tmp_path / "nothing", "--question", "Hi?")
    assert result.returncode == 2 and "not a complete ChatEXAONEPath checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_interactive_chat_reads_questions_until_end_of_input(slides, tmp_path):
    from tests.chat.conftest import make_tiny_llm

    llm = make_tiny_llm(tmp_path / "llm")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "chatexaonepath.cli", "chat", str(slides["tumor"]), "--llm", str(llm),
                             "--encoder", "random-vit-b16", "--max-new-tokens", "3"],
                            input="What is the diagnosis?\n\nAnd the grade?\n", capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model> ") == 2  # two questions, the blank line skipped


def test_slide_extract_refuses_a_slide_over_the_patch_budget_and_goes_on(slides, tmp_path):
    """The budget is checked from the grid before any patch is read; the refusal names the flag that changes it."""
    import json

    out = tmp_path / "feats"
    result = run_cli("slide", "extract", slides["tumor"], "--out", out, "--encoder", "random-vit-b16",
                     "--max-patches-per-slide", "3", "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = json.loads((out / "errors.jsonl").read_text().splitlines()[0])
    assert "--max-patches-per-slide" in error["error"] and not (out / "tumor.h5").exists()
    result = run_cli("slide", "extract", slides["tumor"], "--out", out, "--max-pixels", "5", "--quiet")
    assert result.returncode == 2 and "--max-pixels" in result.stderr and "Traceback" not in result.stderr


def test_slide_extract_refuses_a_flat_png_bomb_by_default_without_decoding_it(tmp_path):
    """A 20,000² PNG at 0.25 µm/px: its default --max-pixels stays under Pillow's own bomb limit."""
    import time

    import psutil

    from tests.vision_tower.test_slide import png_declaring

    bomb = png_declaring(tmp_path / "export.png", 20_000, 20_000)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "chatexaonepath.cli", "slide", "extract", str(bomb), "--out",
                                str(tmp_path / "feats"), "--encoder", "random-vit-b16", "--mpp", "0.25", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200"))
    peak = 0
    while process.poll() is None and time.perf_counter() - started < 120:
        try:
            peak = max(peak, psutil.Process(process.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=60)
    errors = (tmp_path / "feats" / "errors.jsonl").read_text()
    assert "400 megapixels" in errors and "100 allowed (--max-pixels)" in errors and "Traceback" not in stderr
    assert peak < 2.2e9  # ~1.2 GB is the command itself (torch, a ViT-B/16); 400 MP decoded would be 1.2 GB more
