"""`jaguar-reid identify` and `jaguar-reid calibrate` as steps of the command: their help lists
the identify keys, and --print-config leaves the photos out of the config."""

from __future__ import annotations

import pytest

from jaguar_reid import cli

pytestmark = pytest.mark.skipif(not {"identify", "calibrate"} <= set(cli.STEPS),
                                reason="the identify and calibrate steps are not in cli.STEPS")


@pytest.mark.parametrize("step", ["identify", "calibrate"])
def test_help_lists_the_identify_keys(step, capsys):
    cli.main([step, "--help"])
    out = capsys.readouterr().out
    assert "identify.max_false_new" in out and "identify.grouped_exp" in out


def test_print_config_takes_the_keys_and_leaves_the_photos(tmp_path, capsys):
    photo = tmp_path / "a=1.jpg"
    photo.write_bytes(b"x")
    cli.main(["identify", str(photo), "identify.top_k=3", "--print-config"])
    out = capsys.readouterr().out
    assert "top_k: 3" in out and "a=1.jpg" not in out
