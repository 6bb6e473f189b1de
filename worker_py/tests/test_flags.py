"""The flags made from a config's fields (minisgl.flags): switches on by default are turned off with --no-X,
switches off by default are turned on with --X, and to_argv gives flags that parse back to the config."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from minisgl.flags import add_flags, from_flags, opt, to_argv
from minisgl.worker.config import WorkerConfig


@dataclasses.dataclass
class Knobs:
    """One switch each way round and a value: the shapes a config's fields take."""

    graphs: bool = opt(True, "on unless --no-graphs")
    trace: bool = opt(False, "off unless --trace")
    page_size: int = opt(16, "a value")


def parse(argv: list[str], cls: type = WorkerConfig):
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    return from_flags(cls, vars(parser.parse_args(argv)))


@pytest.mark.parametrize("cls", [WorkerConfig, Knobs])
def test_defaults_need_no_flags(cls):
    config = parse([], cls)
    assert config == cls()
    assert [a for a in to_argv(config) if a.startswith("--no-") or a == "--trace"] == []
    assert parse(to_argv(config), cls) == config


def test_switches_each_way_round_trip():
    config = parse(["--no-graphs", "--trace", "--page-size", "32"], Knobs)
    assert (config.graphs, config.trace, config.page_size) == (False, True, 32)
    argv = to_argv(config)
    assert "--no-graphs" in argv and "--trace" in argv
    assert argv[argv.index("--page-size") + 1] == "32"
    assert parse(argv, Knobs) == config


def test_the_worker_switches_turn_off():
    config = parse(["--no-cuda-graphs", "--no-graph-sampling"])
    assert (config.cuda_graphs, config.graph_sampling) == (False, False)
    assert parse(to_argv(config)) == config


def test_a_switch_has_only_the_flag_that_changes_it():
    with pytest.raises(SystemExit):
        parse(["--no-trace"], Knobs)
    with pytest.raises(SystemExit):
        parse(["--graphs"], Knobs)
    with pytest.raises(SystemExit):
        parse(["--graph-sampling"])


@pytest.mark.parametrize("name", ["token_graph_tokens", "extend_graph_tokens", "short_graph_context"])
def test_graph_token_limits_take_zero_and_refuse_negatives(name):
    flag = "--" + name.replace("_", "-")
    assert getattr(parse([flag, "0"]), name) == 0
    parse([flag, "0"]).validate()
    with pytest.raises(ValueError, match=f"{name} must be 0"):
        parse([flag, "-1"]).validate()


def test_the_decode_graphs_context_takes_a_positive_count():
    assert parse(["--decode-graph-context", "128"]).decode_graph_context == 128
    with pytest.raises(ValueError, match="decode_graph_context must be positive"):
        parse(["--decode-graph-context", "0"])
