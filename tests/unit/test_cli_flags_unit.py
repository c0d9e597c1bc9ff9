"""The command lines of `diffserve generate`, `models`, `serve` and `python -m diffserve.worker`:
every long flag can come from a DIFFSERVE_* environment variable (the command line wins, a bad
value is one line naming the variable), and every flag has help text."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from diffserve.client.cli import build_parser
from diffserve.scheduler.app import build_parser as serve_parser
from diffserve.worker.__main__ import parse_args as worker_parse_args
from diffserve.worker.v1.launch import NO_ENV, env_name


def generate(env: dict, *argv: str) -> argparse.Namespace:
    return build_parser(env).parse_args(["generate", *argv])


def test_env_name():
    assert env_name("--max-queue") == "DIFFSERVE_MAX_QUEUE"
    assert env_name("--worker-log-level") == "DIFFSERVE_WORKER_LOG_LEVEL"


def test_generate_flags_from_the_environment_and_the_command_line_wins():
    env = {"DIFFSERVE_SERVER": "h:1", "DIFFSERVE_SEED": "7", "DIFFSERVE_SAVE_OUTPUT": "yes", "DIFFSERVE_PROMPT": "a fox",
           "DIFFSERVE_OUTPUT_FORMAT": "png", "DIFFSERVE_GUIDANCE_SCALE": "3.5", "DIFFSERVE_NUM_GPUS": "2"}
    args = generate(env)
    assert (args.server, args.seed, args.save_output, args.prompt, args.output_format, args.guidance_scale, args.num_gpus) == (
        "h:1", 7, True, "a fox", "png", 3.5, 2)
    args = generate(env, "--server", "other:2", "--seed", "8", "--prompt", "a cat")
    assert (args.server, args.seed, args.prompt) == ("other:2", 8, "a cat")
    assert generate({"DIFFSERVE_SAVE_OUTPUT": "0"}, "--prompt", "p").save_output is False
    assert generate({}, "--prompt", "p").server == ""  # unset: the usual default


def test_repeatable_flags_take_a_list_and_the_command_line_replaces_it():
    env = {"DIFFSERVE_IMAGE_PATH": "a.png, https://x/b.png", "DIFFSERVE_WARMUP_SHAPE": "32x32x1"}
    args = generate(env, "--prompt", "p")
    assert args.image_path == ["a.png", "https://x/b.png"] and args.warmup_shape == ["32x32x1"]
    args = generate(env, "--prompt", "p", "--image-path", "c.png", "--image-path", "d.png")
    assert args.image_path == ["c.png", "d.png"] and args.warmup_shape == ["32x32x1"]
    # the default list itself is never appended to (a second parse starts from it again)
    parser = build_parser(env)
    parser.parse_args(["generate", "--prompt", "p", "--image-path", "c.png"])
    assert parser.parse_args(["generate", "--prompt", "p"]).image_path == ["a.png", "https://x/b.png"]


@pytest.mark.parametrize("name, value, says", [
    ("DIFFSERVE_SEED", "abc", "not a valid seed"),
    ("DIFFSERVE_SEED", "-1", "must be between 0 and 2**64-1"),
    ("DIFFSERVE_HEIGHT", "1.5", "not a valid int"),
    ("DIFFSERVE_OUTPUT_FORMAT", "gif", "choose from png, mp4, npy"),
    ("DIFFSERVE_SAVE_OUTPUT", "maybe", "expected 1/0, true/false, yes/no or on/off"),
])
def test_a_bad_value_is_one_line_naming_the_variable(capsys, name, value, says):
    with pytest.raises(SystemExit) as done:
        build_parser({name: value})
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"diffserve generate: error: {name}={value!r} (for {'--' + name[10:].lower().replace('_', '-')}): {says}"]


def test_models_serve_and_worker_read_the_environment_too():
    assert build_parser({"DIFFSERVE_SERVER": "h:9"}).parse_args(["models"]).server == "h:9"
    env = {"DIFFSERVE_MAX_QUEUE": "3", "DIFFSERVE_LOG_FORMAT": "json", "DIFFSERVE_PRINCIPAL_PRIORITY": "alice=5,bob=-1",
           "DIFFSERVE_INSECURE_WORKER_PLAINTEXT": "1", "DIFFSERVE_WORKER_LOG_LEVEL": "DEBUG"}
    args = serve_parser(environ=env).parse_args([])
    assert (args.max_queue, args.log_format, args.principal_priority, args.insecure_worker_plaintext, args.worker_log_level) == (
        3, "json", ["alice=5", "bob=-1"], True, "DEBUG")
    assert serve_parser(environ=env).parse_args(["--max-queue", "4"]).max_queue == 4
    # the worker's required flags may come from the environment
    worker = worker_parse_args([], environ={"DIFFSERVE_SCHEDULER": "tcp://h:5555", "DIFFSERVE_MODEL_PATH": "/m", "DIFFSERVE_RANK": "1"})
    assert (worker.scheduler, worker.model_path, worker.rank) == ("tcp://h:5555", "/m", 1)


def test_hidden_flags_and_processes_started_by_diffserve_ignore_the_environment():
    assert serve_parser(environ={"DIFFSERVE_PARENT_PID": "1", "DIFFSERVE_CLEANUP_DIR": "/"}).parse_args([]).parent_pid == 0
    env = {"DIFFSERVE_MAX_QUEUE": "3", "DIFFSERVE_LOG_LEVEL": "DEBUG", NO_ENV: "1"}
    args = serve_parser(environ=env).parse_args([])
    assert (args.max_queue, args.log_level) == (256, "INFO")
    with pytest.raises(SystemExit):  # --scheduler stays required
        worker_parse_args([], environ={"DIFFSERVE_SCHEDULER": "tcp://h:1", "DIFFSERVE_MODEL_PATH": "/m", NO_ENV: "1"})


# ---- help text ----

def _parsers():
    """Every parser of every command line: diffserve (generate, models, and the delegated
    placeholders), serve, the worker, keys (with their subcommands)."""
    from diffserve.scheduler.keys import build_parser as keys_parser
    from diffserve.worker.__main__ import build_parser as worker_parser

    todo = [build_parser({}), serve_parser(environ={}), worker_parser({}), keys_parser("diffserve keys")]
    while todo:
        parser = todo.pop()
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += dict.fromkeys(action.choices.values())
                for choice in action._choices_actions:
                    assert choice.help, f"{parser.prog} {choice.dest}: no help"


def test_every_flag_has_help_text():
    seen = 0
    for parser in _parsers():
        for action in parser._actions:
            seen += 1
            assert action.help and action.help.strip(), f"{parser.prog} {action.option_strings or action.dest}: no help"
    assert seen > 100


def test_generate_help_lists_its_own_flags_before_the_worker_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["generate", "--help"])
    text = capsys.readouterr().out
    order = [re.search(rf"^  (-\w, )?{flag}\b", text, re.M).start() for flag in
             ("--prompt", "--seed", "--save-output", "--server", "--verbose", "--model-path", "--num-gpus")]
    assert order == sorted(order)
    assert text.index("the job:") < text.index("output:") < text.index("a running server:") < text.index("the private server")
    assert "DIFFSERVE_FLAG_NAME" in text


# ---- logs ----

def test_the_private_server_and_its_workers_are_quiet_unless_asked():
    from diffserve.client.cli import private_log_levels
    from diffserve.worker.v1.launch import worker_argv

    for argv, levels in ((["--prompt", "p"], ("WARNING", "WARNING")), (["--prompt", "p", "-v"], ("INFO", "INFO")),
                         (["--prompt", "p", "--log-level", "DEBUG"], ("DEBUG", "WARNING")),
                         (["--prompt", "p", "-v", "--worker-log-level", "ERROR"], ("INFO", "ERROR"))):
        args = generate({}, *argv)
        private_log_levels(args)
        assert (args.log_level, args.worker_log_level) == levels
        # the worker level reaches the private server's command line (INFO is the worker's default)
        assert ("--worker-log-level" in worker_argv(args, outer=True)) == (levels[1] != "INFO")


def test_serve_passes_its_log_format_to_local_workers():
    from diffserve.scheduler.app import replica_specs

    (text,) = replica_specs(serve_parser(environ={}).parse_args(["--model-path", "/m"]), environ={})
    assert "--log-format" not in text.args and text.env == {}
    for spec in replica_specs(serve_parser(environ={}).parse_args(["--model-path", "/m", "--log-format", "json", "--replicas", "2"]), environ={}):
        assert spec.args[-2:] == ["--log-format", "json"] and spec.env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert worker_parse_args(["--scheduler", "tcp://h:1", "--model-path", "/m", "--log-format", "json"], environ={}).log_format == "json"


def test_worker_json_lines_carry_its_id_and_rank():
    import json
    import logging

    from diffserve.worker.v1.logformat import JsonFormatter

    record = logging.LogRecord("diffserve.worker", logging.WARNING, __file__, 1, "step %d slow", (3,), None)
    line = json.loads(JsonFormatter(static={"worker": "local-0", "rank": 1}).format(record))
    assert {k: line[k] for k in ("level", "logger", "message", "worker", "rank")} == {
        "level": "WARNING", "logger": "diffserve.worker", "message": "step 3 slow", "worker": "local-0", "rank": 1}


def test_generate_without_a_model_or_server_uses_the_built_in_model_or_says_there_is_none(tmp_path, monkeypatch, capsys):
    import diffserve.demo
    from diffserve.client import cli

    monkeypatch.setattr(diffserve.demo, "MODEL_DIR", tmp_path)  # an install without the weights
    assert cli.cmd_generate(generate({}, "--prompt", "a red circle")) == 2
    assert "no built-in model" in capsys.readouterr().err

    (tmp_path / "model_index.json").write_text("{}")  # with them: the private server gets that folder
    seen = []

    def refuse(args, workdir, level):
        seen.append(args.model_path)
        raise cli.ServerStartError("stopped by the test")

    monkeypatch.setattr(cli, "local_server", refuse)
    with pytest.raises(SystemExit, match="stopped by the test"):
        cli.cmd_generate(generate({}, "--prompt", "a red circle"))
    assert seen == [str(tmp_path)]


def test_serve_without_a_model_path_serves_the_built_in_model_unless_told_not_to(tmp_path, monkeypatch):
    import diffserve.demo
    from diffserve.scheduler.app import local_model_path

    monkeypatch.setattr(diffserve.demo, "MODEL_DIR", tmp_path)
    assert local_model_path(serve_parser(environ={}).parse_args([])) == ""  # no built-in model: a bare scheduler
    (tmp_path / "model_index.json").write_text("{}")
    assert local_model_path(serve_parser(environ={}).parse_args([])) == str(tmp_path)
    assert local_model_path(serve_parser(environ={}).parse_args(["--no-local-worker"])) == ""
    assert local_model_path(serve_parser(environ={}).parse_args(["--model-path", "/m"])) == "/m"


def test_generate_cache_flag():
    assert generate({}, "--prompt", "p").cache is None  # exact by default
    cache = generate({}, "--prompt", "p", "--cache", "first-block:0.1").cache
    assert (cache.policy, round(cache.threshold, 6)) == ("first-block", 0.1)
    with pytest.raises(SystemExit):
        generate({}, "--prompt", "p", "--cache", "first-block:lots")


def test_generate_lora_flag():
    assert generate({}, "--prompt", "p").lora == []  # the base model by default
    loras = generate({}, "--prompt", "p", "--lora", "watercolor", "--lora", "ink:0.5", "--lora", "neg:-1").lora
    assert [(x.name, x.HasField("scale"), round(x.scale, 6)) for x in loras] == [("watercolor", False, 0.0), ("ink", True, 0.5), ("neg", True, -1.0)]
    for bad in ("ink:lots", ":0.5", ""):
        with pytest.raises(SystemExit):
            generate({}, "--prompt", "p", "--lora", bad)
    env = generate({"DIFFSERVE_LORA": "a:0.5, b"}, "--prompt", "p").lora  # a comma-separated list from the environment
    assert [x.name for x in env] == ["a", "b"]


def test_worker_lora_dir_is_refused_where_the_model_or_layout_cannot_serve_it(tmp_path):
    from types import SimpleNamespace

    from diffserve.worker.__main__ import enable_lora

    args = worker_parse_args(["--scheduler", "tcp://127.0.0.1:1", "--model-path", "/m", "--lora-dir", str(tmp_path),
                              "--lora-cache-bytes", "512MiB"])
    calls = []
    pipeline = SimpleNamespace(enable_lora=lambda folder, size: calls.append((folder, size)), lora_adapters=("a",),
                               card=SimpleNamespace(family="wan2.1"))
    enable_lora(pipeline, args)
    assert calls == [(tmp_path, 512 << 20)]
    calls.clear()
    enable_lora(pipeline, worker_parse_args(["--scheduler", "tcp://127.0.0.1:1", "--model-path", "/m", "--lora-dir", "x", "--num-gpus", "4",
                                             "--enable-cfg-parallel", "--ulysses-degree", "2"]))
    calls.clear()
    enable_lora(pipeline, worker_parse_args(["--scheduler", "tcp://127.0.0.1:1", "--model-path", "/m", "--lora-dir", "x", "--num-gpus", "2",
                                             "--tp-size", "2"]))
    assert calls == [(Path("x"), 4 << 30)]  # cfg, sequence and tensor parallel take adapters
    with pytest.raises(ValueError, match="some-family pipeline takes no LoRA adapters"):
        enable_lora(SimpleNamespace(card=SimpleNamespace(family="some-family")), args)
    with pytest.raises(SystemExit):
        worker_parse_args(["--scheduler", "tcp://127.0.0.1:1", "--model-path", "/m", "--lora-cache-bytes", "lots"])


def test_generate_cache_flag_takes_each_policys_knobs():
    cache = generate({}, "--prompt", "p", "--cache", "taylorseer").cache
    assert cache.policy == "taylorseer" and not cache.ListFields()[1:]  # knobs unset: the server's defaults
    cache = generate({}, "--prompt", "p", "--cache", "taylorseer:interval=4:max_order=2:warmup_steps=0:cooldown_step=20").cache
    assert (cache.interval, cache.max_order, cache.warmup_steps, cache.cooldown_step) == (4, 2, 0, 20)
    assert cache.HasField("warmup_steps")  # 0 given is 0, not the default
    cache = generate({}, "--prompt", "p", "--cache", "mag:0.06:max_skip_steps=2:mag_ratios=1.0,1.02,0.99").cache
    assert (cache.policy, round(cache.threshold, 6), cache.max_skip_steps) == ("mag", 0.06, 2)
    assert [round(r, 6) for r in cache.mag_ratios] == [1.0, 1.02, 0.99]
    cache = generate({}, "--prompt", "p", "--cache", "mag:threshold=0.1:mag_ratios=1").cache
    assert round(cache.threshold, 6) == 0.1 and list(cache.mag_ratios) == [1.0]
    for bad in ("taylorseer:every=3", "taylorseer:interval=1.5", "taylorseer:interval=", "mag:0.1:0.2", "mag:policy=x"):
        with pytest.raises(SystemExit):
            generate({}, "--prompt", "p", "--cache", bad)
