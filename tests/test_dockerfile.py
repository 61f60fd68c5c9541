"""The Dockerfile cannot be built here (no Docker engine), so it is linted: parsed by Docker's
own parser (the `dockerfile` package wraps buildkit's) and checked against the rules a reviewer
would apply (hadolint's most important ones, and this project's own)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import dockerfile
from typer.testing import CliRunner

from gateway.cli import app

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = dockerfile.parse_file(str(ROOT / "Dockerfile"))
IGNORED = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()]


def instructions(name: str) -> list[dockerfile.Command]:
    return [c for c in COMMANDS if c.cmd.upper() == name]


def test_multi_stage_from_pinned_slim_images() -> None:
    froms = instructions("FROM")
    assert len(froms) == 2
    for c in froms:
        image = c.value[0]
        assert ":" in image and not image.endswith(":latest"), image


def test_runs_as_a_non_root_user_with_a_healthcheck_and_exec_form_commands() -> None:
    users = instructions("USER")
    assert users and users[-1].value[0] not in ("root", "0")
    assert instructions("HEALTHCHECK")
    for name in ("ENTRYPOINT", "CMD"):
        [command] = instructions(name)
        assert command.json, f"{name} must use the exec (JSON) form so SIGTERM reaches the gateway"


def test_no_pip_cache_and_no_apt_leftovers() -> None:
    for c in instructions("RUN"):
        text = c.value[0]
        if "pip install" in text or "pip wheel" in text:
            assert "--no-cache-dir" in text, text
        assert "apt-get install" not in text or "--no-install-recommends" in text, text


def test_copied_sources_exist_and_are_not_ignored() -> None:
    for c in instructions("COPY"):
        if any(flag.startswith("--from=") for flag in c.flags):
            continue
        for source in c.value[:-1]:
            assert (ROOT / source).exists(), source
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in IGNORED), source
    assert "certs" in IGNORED and ".venv" in IGNORED  # keys and local installs never enter the image


def test_the_command_the_image_runs_exists() -> None:
    [entry] = instructions("ENTRYPOINT")
    [cmd] = instructions("CMD")
    assert entry.value == ("gateway",)
    sub, *options = cmd.value
    help_text = CliRunner().invoke(app, [sub, "--help"]).output
    for option in (o for o in options if o.startswith("--")):
        assert option in help_text, option


def test_the_build_stage_copies_every_package_the_wheel_includes() -> None:
    """The wheel is built from what was copied: a package pyproject.toml includes but the
    Dockerfile leaves out builds an image whose first import fails (`domain` and `emulators`
    were missing once, and `gateway serve` died on `import domain`)."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    first_from = next(i for i, c in enumerate(COMMANDS) if c.cmd.upper() == "FROM")
    second_from = next(i for i, c in enumerate(COMMANDS) if c.cmd.upper() == "FROM" and i > first_from)
    copied = {source.rstrip("/") for c in COMMANDS[first_from:second_from] if c.cmd.upper() == "COPY"
              for source in c.value[:-1]}
    assert packages <= copied, sorted(packages - copied)
    for package in packages:
        assert (ROOT / package / "__init__.py").exists(), package
