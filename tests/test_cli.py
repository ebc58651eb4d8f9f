import pytest

from synthdistill.cli import main


def test_datasets_list_shows_seven_datasets(capsys):
    main(["datasets", "list"])
    lines = capsys.readouterr().out.strip().splitlines()
    counts = {line.split()[0]: int(line.split()[1]) for line in lines[1:]}
    assert counts == {
        "pets": 37,
        "flowers102": 102,
        "cars": 196,
        "food101": 101,
        "dtd": 47,
        "aircraft": 100,
        "imagenet100": 100,
    }


def test_datasets_show_aircraft(capsys):
    main(["datasets", "show", "aircraft"])
    out = capsys.readouterr().out
    assert "a photo of a {c}, a type of aircraft." in out
    assert "contextual dimensions:" in out and "707-320" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["config", "show", "--set", "distill.lrr=1"], "Unknown key 'distill.lrr'"),
        (["config", "show", "--set", "distill.lr=abc"], "must be of type float"),
        (["config", "show", "-c", "missing.yaml"], "does not exist"),
        (["datasets", "show", "nope"], "Unknown dataset 'nope'"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_every_command_has_help(capsys):
    from synthdistill.cli import COMMANDS

    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: synthdistill" in capsys.readouterr().out


def test_version_flag_prints_the_package_version(capsys):
    import synthdistill

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"synthdistill {synthdistill.__version__}"
