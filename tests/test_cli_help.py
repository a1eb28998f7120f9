"""Help that leads on: every option says what it does; `store info` is a table; an unknown feature set names
the command that lists them and the closest names, one a line."""

import argparse

import numpy as np
import pytest

from classifiers import cli as classifiers_cli
from extractor import api
from extractor import cli as extractor_cli


def every_action(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from every_action(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            yield " ".join(path), action


@pytest.mark.parametrize("cli", [extractor_cli, classifiers_cli], ids=["extractor", "classifiers"])
def test_every_option_and_command_has_a_description(cli):
    parser = cli.build_parser()
    undescribed = [f"{command} {action.option_strings or action.dest}" for command, action in every_action(parser)
                   if not (action.help or "").strip() and not isinstance(action, argparse._SubParsersAction)]
    assert undescribed == []
    commands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert all(choice.help for choice in commands[0]._choices_actions)


def test_store_info_is_a_table_with_a_header(tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    api.import_vectors(np.eye(3), "short", labels=[0, 1, 2], store=store)
    api.import_vectors(np.ones((12, 5)), "a-much-longer-feature-set-name", store=store)
    assert extractor_cli.main(["store", "info", "--store", str(store)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("store ") and "15 vectors" not in lines[1] and "3 of width 3" in lines[1]
    header = next(i for i, line in enumerate(lines) if line.startswith("feature set "))
    table = lines[header:header + 3]
    assert table[0].split() == ["feature", "set", "items", "state", "backbone", "fingerprint", "skipped", "data"]
    # Left-aligned columns start where their header does, numbers end where theirs ends.
    starts = [[line.index(word) for word in ("complete", "external", "arrays")] for line in table[1:]]
    assert starts[0] == starts[1] == [table[0].index(name) for name in ("state", "backbone", "data")]
    assert table[1].index("12") + 2 == table[0].index("items") + len("items") == table[2].index("3") + 1


@pytest.mark.parametrize("command", [["compare", "--test-set", "digits-test"], ["train", "--head", "logreg",
                                                                                 "--out", "h"]])
def test_an_unknown_feature_set_names_store_info_and_the_closest(tmp_path, caplog, command):
    store = tmp_path / "s.sqlite"
    for name in ("digits-train", "digits-test", "cifar-train"):
        api.import_vectors(np.eye(2), name, labels=[0, 1], store=store)
    assert classifiers_cli.main(["--store", str(store), *command, "--train-set", "digits-trian"]) == 2
    message = caplog.records[-1].getMessage().splitlines()
    assert message[0].startswith("unknown feature set 'digits-trian'") and "`extractor store info" in message[0]
    assert message[1:3] == ["closest:", "  digits-train"]
