"""The ``flatfused`` command's dispatch (each command's own tests live with it)."""
from flatfused import cli


def test_usage_lists_every_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_info(capsys):
    assert cli.main(["info"]) == 0
    assert "cpu: backends" in capsys.readouterr().out
    assert cli.main(["info", "extra"]) == 2
