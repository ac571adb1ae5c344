"""The small things a new user types (issue 10): each gets the message that names what is wrong."""
import pytest


def refused(cli, *argv):
    code, out, err = cli(*argv)
    assert code == 2 and out == "" and err.startswith("costgraph: error: ") and err.count("\n") == 1, (code, out, err)
    return err


def test_a_negative_size_is_a_size_error_not_an_unknown_option(cli):
    err = refused(cli, "cost", "--size", "-1x5")
    assert "positive" in err and "expected one argument" not in err
    assert "positive" in refused(cli, "layout", "--size", "5x-1")


def test_max_num_zero_names_max_num(cli):
    err = refused(cli, "layout", "--size", "1000x1000", "--max-num", "0")
    assert "--max-num" in err and "min_num <=" not in err


def test_bare_costgraph_prints_what_it_can_do(cli):
    code, out, err = cli()
    assert code == 0 and "usage: costgraph" in out and "formula" in out and err == ""


def test_an_empty_mode_is_refused_not_taken_as_symbolic(cli):
    assert "mode" in refused(cli, "formula", "--mode", "")


@pytest.mark.parametrize("argv", [
    ("cost", "--size", "1654x2339", "--scope", "vision,"),
    ("formula", "--scope", "vision,"),
    ("verify", "--grid", "2x2", "--scope", "vision,"),
])
def test_a_trailing_comma_in_a_scope_is_refused_everywhere(cli, argv):
    assert "vision," in refused(cli, *argv)


def test_sweep_into_an_existing_file_is_refused_before_any_work(cli, tmp_path):
    target = tmp_path / "taken"
    target.write_text("mine")
    assert "not a folder" in refused(cli, "sweep", "--grids", "all", "--out", str(target))
    assert target.read_text() == "mine"


def test_a_grid_beyond_max_num_is_one_rule_everywhere(cli):
    for argv in (("cost", "--grid", "3x4"), ("roofline", "--grid", "3x4"), ("verify", "--grid", "3x4"),
                 ("table", "--rows", "gundam:3x4"), ("sweep", "--grids", "3x4", "--out", "/tmp/never-written")):
        assert "--max-num" in refused(cli, *argv)
