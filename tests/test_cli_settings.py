"""Flags declared on the settings they set (``pacore.flags.Flag``).

``pacore serve``'s Server options come from :class:`ServerSettings`' fields and the
adaptive-compute options from :class:`ComputePolicy`'s: these tests check that each
flag's default is the one its class declares (written once), that a bound or a bad
value is refused as a usage error, and that the mechanism works on any dataclass or
pydantic model.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import typer
import typer.main
from pydantic import BaseModel, Field
from typer.core import TyperOption
from typer.testing import CliRunner

from pacore import ComputePolicy
from pacore.cli.main import _register_commands
from pacore.cli.main import app as pacore_app
from pacore.cli.options import flagged_fields, with_settings_options
from pacore.errors import UsageError
from pacore.flags import Flag
from pacore.schedule import Schedule
from pacore.server import ServerConfig
from pacore.server.settings import ServerSettings

SRC = Path(__file__).resolve().parents[1] / "src"


def command_options(name: str) -> dict[str, TyperOption]:
    _register_commands(name)
    command = typer.main.get_command(pacore_app).commands[name]  # type: ignore[attr-defined]
    return {option.opts[0]: option for option in command.params if isinstance(option, TyperOption)}


def test_every_server_flag_defaults_to_what_the_server_config_does():
    serve = command_options("serve")
    config = ServerConfig()
    declared = flagged_fields(ServerSettings)
    assert [field.name for field in declared] == [field.name for field in dataclasses.fields(ServerSettings)]
    assert flagged_fields(ServerConfig) == declared  # a subclass has its base's flags
    for field in declared:
        assert serve[field.flag.name].default == getattr(config, field.name), field.flag.name
    # A few by hand, so a default changed on both sides at once is still seen here.
    assert (serve["--max-rounds"].default, serve["--header-timeout"].default) == (4, 10.0)
    assert serve["--max-body-bytes"].default == 8 * 1024 * 1024


def test_compute_flags_pass_none_and_show_the_policy_default_in_their_help():
    serve = command_options("serve")
    policy = ComputePolicy()
    for field in flagged_fields(ComputePolicy):
        option = serve[field.flag.name]
        assert option.default in (None, False), field.flag.name  # not given: the policy's own default applies
        default = getattr(policy, field.name)
        if isinstance(default, int | float) and not isinstance(default, bool):
            assert option.help.endswith(f" \\[default: {default:g}]."), option.help
        else:
            assert "[default:" not in option.help


@dataclasses.dataclass(frozen=True)
class Job:
    workers: Annotated[int, Flag("--workers", "Jobs at once.", metavar="N", min=1)] = 2
    label: Annotated[str | None, Flag("--label", "A name for the log.")] = None
    unflagged: int = 7
    size: Annotated[int, Flag("--size", "Bytes per chunk.", metavar="BYTES", default_text="1 MiB")] = 2**20


class Policy(BaseModel):
    plain: bool = False
    rate: Annotated[float | None, Flag("--rate", "How fast.", metavar="R")] = Field(default=None, gt=0)
    steps: Annotated[int, Flag("--steps", "How many.", metavar="N")] = Field(default=3, ge=1)


def _settings_app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @with_settings_options("job", Job, "Job")
    def main(*, job: Job) -> None:
        typer.echo(repr(job))

    return app


def test_with_settings_options_hands_the_command_its_settings():
    app = _settings_app()
    runner = CliRunner()
    assert runner.invoke(app, []).output.endswith("Job(workers=2, label=None, unflagged=7, size=1048576)\n")
    given = runner.invoke(app, ["--workers", "5", "--label", "x", "--size", "9"]).output
    assert given.endswith("Job(workers=5, label='x', unflagged=7, size=9)\n")
    below = runner.invoke(app, ["--workers", "0"])
    assert below.exit_code == 2 and "--workers" in below.output
    assert runner.invoke(app, ["--unflagged", "3"]).exit_code == 2  # a field without a Flag is no option
    help_text = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "Jobs at once. [default: 2]" in help_text and "N [x>=1]" in help_text
    assert "Bytes per chunk [default: 1 MiB]." in help_text and "1048576" not in help_text


def test_flagged_fields_read_a_pydantic_model_in_declaration_order():
    rate, steps = flagged_fields(Policy)
    assert (rate.name, rate.default, rate.flag.name) == ("rate", None, "--rate")
    assert (steps.name, steps.type, steps.default) == ("steps", int, 3)
    assert steps.parameter("Panel", unset_means_default=True).default is None
    assert steps.parameter("Panel").default == 3


def test_the_server_settings_import_without_the_server_extra():
    # What pacore serve declares its flags from must not need FastAPI: pacore --help lists serve without it.
    code = (
        "import sys\nsys.modules['fastapi'] = None\nsys.modules['uvicorn'] = None\n"
        "from pacore.server.settings import ServerSettings\nprint(ServerSettings().max_rounds)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(SRC)}
    )
    assert (done.returncode, done.stdout) == (0, "4\n"), done.stderr


def test_a_server_config_built_in_python_holds_the_bounds_of_the_flags() -> None:
    """One source of truth: each flag's ``min`` is what the command line and ServerConfig both refuse below."""
    bounded = [field for field in flagged_fields(ServerSettings) if field.flag.min is not None]
    assert {field.name for field in bounded} >= {"max_rounds", "grace_period_s", "history", "header_timeout_s"}
    for field in bounded:
        low = field.flag.min
        below = low - 1 if field.type is int else (low / 2 if low else -1.0)
        with pytest.raises(UsageError, match=f"^{field.name} must be "):
            ServerConfig(**{field.name: below})
        at_bound = ServerConfig(schedule=Schedule(()), **{field.name: field.type(low)})  # one call: within any cap
        assert getattr(at_bound, field.name) == low
    with pytest.raises(UsageError, match="^header_timeout_s must be at least 0.001, got 0.0005$"):
        ServerConfig(header_timeout_s=0.0005)
    with pytest.raises(UsageError, match="^history must be 0 or more, got -1$"):
        ServerConfig(history=-1)
    with pytest.raises(UsageError, match="^body_timeout_s must be at least 0.001, got nan$"):
        ServerConfig(body_timeout_s=float("nan"))


@pytest.mark.parametrize(("flag", "value"), [("--grace-period", "-1"), ("--header-timeout", "0"), ("--history", "-1")])
def test_a_server_setting_below_its_bound_is_a_usage_error(flag: str, value: str):
    done = subprocess.run(
        [sys.executable, "-m", "pacore", "serve", "--port", "0", flag, value],
        capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(SRC)},
    )  # fmt: skip
    assert done.returncode == 2 and flag in done.stderr and "Traceback" not in done.stderr


def test_an_optional_bounded_setting_left_unset_passes_its_check() -> None:
    bound = Flag("--rate", "How fast.", metavar="R", min=0.5)
    bound.check("rate", None)  # unset: nothing to hold
    bound.check("rate", 0.5)
    with pytest.raises(UsageError, match=r"^rate must be at least 0.5, got 0.25$"):
        bound.check("rate", 0.25)
