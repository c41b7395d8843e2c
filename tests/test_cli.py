"""The `prune-search` command line: prune a saved model once."""

from __future__ import annotations

from prune_core import attention_sparsity, load_pruned
from search.cli import main
from tests.conftest import tiny_ast


def test_prune_command(tmp_path, capsys):
    tiny_ast().save_pretrained(tmp_path / "dense")
    code = main(
        ["prune", "--model", str(tmp_path / "dense"), "--granularity", "entire_head", "--amount", "0.5", "--out", str(tmp_path / "p")]
    )
    assert code == 0
    assert abs(attention_sparsity(load_pruned(tmp_path / "p")) - 0.5) < 0.13
    assert "attention sparsity" in capsys.readouterr().out


def test_prune_command_bad_amount(tmp_path, capsys):
    tiny_ast().save_pretrained(tmp_path / "dense")
    code = main(["prune", "--model", str(tmp_path / "dense"), "--amount", "1.5", "--out", str(tmp_path / "p")])
    assert code == 2
    assert "amount must be a fraction" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_servers_bind_to_localhost_by_default():
    from search.cli import build_parser

    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"
