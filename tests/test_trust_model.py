"""Trust by design (issue 18): an untrusted project file gives only variables that are safe
by construction; `portalloc trust` records a file's SHA-256 in the user's own state; one
set of lease rules for writing and loading; no traceback and no unbounded wait or width."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import portalloc.config
from portalloc.rules import forbidden_variable, lease_problem
from tests.helpers import HAVE_FISH, invoke, run_cli, trust

SKIP = {"PORTALLOC_SKIP_PORT_CHECK": "1"}
SAFE_VALUE = re.compile(r"[0-9]{1,5}|[a-zA-Z0-9][a-zA-Z0-9_.-]*")


def env_json(cwd: Path, session: str = "s") -> dict[str, str]:
    result = invoke("env", session, "--format", "json", cwd=cwd, env=SKIP)
    assert result.returncode == 0, result.stderr
    values: dict[str, str] = json.loads(result.stdout)
    return values


HOSTILE = """\
[ports]
web = 0
api = 1
[env]
WEB_PORT = "{web_port}"
COMPOSE_PROJECT_NAME = "{compose_project_name}"
WEB_CONTAINER_NAME = "{compose_project_name}-web"
PROMPT_EOL_MARK = "%B$(touch @MARKER@){api_port}"
TAR_OPTIONS = "--checkpoint=1 --checkpoint-action=exec='touch @MARKER@ {api_port}'"
VITE_API_URL = "http://localhost:{api_port}"
"""


def test_untrusted_file_gives_only_port_variables_and_says_so_once(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "portalloc.toml").write_text(HOSTILE.replace("@MARKER@", str(marker)))
    result = invoke("env", "s", "--format", "json", cwd=tmp_path, env=SKIP)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert list(values) == ["WEB_PORT", "COMPOSE_PROJECT_NAME", "WEB_CONTAINER_NAME"]
    assert values["WEB_CONTAINER_NAME"] == values["COMPOSE_PROJECT_NAME"] + "-web"
    # One line, naming how many wait and the commands that show and trust them.
    assert result.stderr.count("\n") == 1
    assert "3 env entries wait until you trust this file" in result.stderr
    assert "portalloc trust --show" in result.stderr and "apply: portalloc trust" in result.stderr
    assert not marker.exists()


def test_trust_shows_records_and_a_changed_file_is_untrusted_again(
    tmp_path: Path, state_dir: Path
) -> None:
    project = tmp_path / "portalloc.toml"
    project.write_text(
        '[ports]\nweb = 0\n[env]\nWEB_PORT = "{web_port}"\nURL = "http://x:{web_port}"\n'
    )
    shown = invoke("trust", "--show", cwd=tmp_path)
    assert shown.returncode == 0
    assert "  URL=http://x:{web_port}   (only once trusted)\n" in shown.stdout
    assert "  WEB_PORT={web_port}\n" in shown.stdout and "not trusted" in shown.stdout
    assert not (state_dir / "trusted").exists()  # --show records nothing

    assert invoke("trust", cwd=tmp_path).returncode == 0
    records = list((state_dir / "trusted").iterdir())
    assert len(records) == 1 and records[0].read_text() == f"{project}\n"
    assert records[0].stat().st_mode & 0o777 == 0o600
    assert (state_dir / "trusted").stat().st_mode & 0o777 == 0o700
    assert env_json(tmp_path) == {"WEB_PORT": "10000", "URL": "http://x:10000"}

    # Any change to the file makes it untrusted again, for leases made from then on.
    project.write_text(project.read_text() + "# edited\n")
    assert env_json(tmp_path, "t") == {"WEB_PORT": "10100"}
    assert invoke("trust", "--show", cwd=tmp_path).stdout.endswith(
        f"not trusted: only port variables apply; trust it: portalloc trust {project}\n"
    )
    # untrust forgets every record made for the path.
    project.write_text(project.read_text().removesuffix("# edited\n"))
    assert "untrusted" in invoke("untrust", str(project)).stdout
    assert env_json(tmp_path, "u") == {"WEB_PORT": "10200"}


def test_trust_applies_in_every_worktree_with_the_same_content(tmp_path: Path) -> None:
    content = '[ports]\nweb = 0\n[env]\nAPP_URL = "http://localhost:{web_port}"\n'
    first, second = tmp_path / "a", tmp_path / "b"
    for tree in (first, second):
        tree.mkdir()
        (tree / "portalloc.toml").write_text(content)
    trust(first / "portalloc.toml")
    assert env_json(second, "b") == {"APP_URL": "http://localhost:10000"}


def test_a_refused_name_in_a_trusted_file_exits_2(tmp_path: Path) -> None:
    project = tmp_path / "portalloc.toml"
    project.write_text('[ports]\nweb = 0\n[env]\nPROMPT_EOL_MARK = "%B{web_port}"\n')
    result = run_cli("trust", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"{project}: env.PROMPT_EOL_MARK:" in result.stderr


def test_trust_lives_in_the_users_own_state_never_in_a_shared_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2770)
    own = tmp_path / "own-state"
    monkeypatch.setattr(portalloc.config, "default_state_dir", lambda: own)
    (tmp_path / "portalloc.toml").write_text('[ports]\nweb = 0\n[env]\nW = "{web_port}"\n')
    env = {"PORTALLOC_STATE_DIR": str(shared), **SKIP}
    assert invoke("trust", cwd=tmp_path, env=env).returncode == 0
    assert not (shared / "trusted").exists()
    assert len(list((own / "trusted").iterdir())) == 1
    result = invoke("env", "s", "--format", "json", cwd=tmp_path, env=env)
    assert json.loads(result.stdout) == {"W": "10000"}


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's record needs root")
def test_a_record_the_user_does_not_own_is_not_believed(tmp_path: Path, state_dir: Path) -> None:
    project = tmp_path / "portalloc.toml"
    project.write_text('[ports]\nweb = 0\n[env]\nW = "{web_port}"\n')
    trust(project)
    [record] = list((state_dir / "trusted").iterdir())
    os.chown(record, 65534, 65534)  # as if another user had planted it
    assert env_json(tmp_path) == {}
    record.unlink()
    record.symlink_to(project)  # a symlink is no record either
    assert env_json(tmp_path, "t") == {}


def test_init_write_trusts_the_profile_it_writes(tmp_path: Path) -> None:
    tmp_path = tmp_path / "repo"  # the state dir (tmp_path/state) outside the repository
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "compose.yaml").write_text(
        "services:\n  web:\n    image: x\n    container_name: shop-web\n    ports:\n"
        '      - "8080:80"\n'
    )
    assert invoke("init", "--write", cwd=tmp_path).returncode == 0
    shown = invoke("trust", "--show", cwd=tmp_path)
    assert shown.stdout.endswith("trusted: it applies in full\n")
    values = env_json(tmp_path)
    assert values == {
        "WEB_PORT": "10000",
        "WEB_CONTAINER_NAME": values["COMPOSE_PROJECT_NAME"] + "-shop-web",
        "COMPOSE_PROJECT_NAME": values["COMPOSE_PROJECT_NAME"],
    }


# --- one set of lease rules --------------------------------------------------------------


@pytest.mark.parametrize("name", ["node", "ssh", "docker", "git", "java", "npm", "path", "ld"])
def test_a_port_named_like_a_tool_never_loses_its_lease(
    tmp_path: Path, state_dir: Path, name: str
) -> None:
    (tmp_path / "portalloc.toml").write_text(f"[ports]\n{name} = 0\n")
    first = env_json(tmp_path, "a")
    assert first[f"{name.upper()}_PORT"] == "10000"
    for _ in range(4):
        assert env_json(tmp_path, "a") == first
    assert env_json(tmp_path, "b")[f"{name.upper()}_PORT"] == "10100"
    assert not list(state_dir.glob("leases.json.corrupt-*"))
    listing = json.loads(invoke("status", "--json", cwd=tmp_path).stdout)
    assert [item["session_id"] for item in listing] == ["a", "b"]


def test_a_worktree_path_the_ledger_would_refuse_is_refused_before_writing(
    tmp_path: Path, state_dir: Path
) -> None:
    tree = tmp_path / "bad\x1bname"
    tree.mkdir()
    result = invoke("env", "s", "--worktree", str(tree), env=SKIP)
    assert result.returncode == 2 and "would not load" in result.stderr
    assert not (state_dir / "leases.json").exists()


_names = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
_variables = st.one_of(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True),
    st.sampled_from(["NODE_OPTIONS", "PROMPT_EOL_MARK", "TAR_OPTIONS", "PS1", "HOME", "PATH"]),
    _names.map(lambda name: name.upper() + "_PORT"),
)
_literal = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="{}"), max_size=20
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ports=st.lists(_names, min_size=1, max_size=4, unique_by=str.upper),
    entries=st.lists(
        st.tuples(_variables, _literal, _literal), max_size=5, unique_by=lambda e: e[0]
    ),
    trusted=st.booleans(),
)
def test_any_profile_env_accepts_is_a_lease_that_loads_back_byte_for_byte(
    tmp_path_factory: pytest.TempPathFactory,
    ports: list[str],
    entries: list[tuple[str, str, str]],
    trusted: bool,
) -> None:
    """Whatever profile `env` accepts, the lease it writes is one the next load keeps: no
    copy aside, the lease's bytes unchanged by later writes of other sessions. Untrusted,
    only variables of a shape that cannot carry a command come out."""
    root = tmp_path_factory.mktemp("prop")
    state = root / "state"
    lines = ["[ports]", *(f"{name} = {offset}" for offset, name in enumerate(ports))]
    if entries:
        lines.append("[env]")
        lines.extend(
            f"{variable} = {json.dumps(before + '{' + ports[0] + '_port}' + after)}"
            for variable, before, after in entries
        )
    project = root / "portalloc.toml"
    project.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {"PORTALLOC_STATE_DIR": str(state), **SKIP}
    if trusted:
        invoke("trust", str(project), env=env)
    result = invoke("env", "s", "--format", "json", cwd=root, env=env)
    if result.returncode != 0:
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert not (state / "leases.json").exists()
        return
    values = json.loads(result.stdout)
    if not trusted:
        for name, value in values.items():
            assert SAFE_VALUE.fullmatch(value), (name, value)
    for name in values:
        assert not forbidden_variable(name) or SAFE_VALUE.fullmatch(values[name])
    ledger = state / "leases.json"
    before = json.loads(ledger.read_bytes())["leases"]
    for other in ("t", "u"):
        assert invoke("allocate", other, cwd=root.parent, env=env).returncode == 0
    after = json.loads(ledger.read_bytes())["leases"]
    assert after[0] == before[0]
    assert not list(state.glob("leases.json.corrupt-*"))


def test_the_load_rules_and_the_write_rules_are_one_function() -> None:
    from portalloc.ledger import codec

    # The ledger's check on load is the rules module's, not a copy of it.
    source = Path(codec.__file__).read_text()
    assert "lease_problem(lease)" in source
    assert lease_problem.__module__ == "portalloc.rules"


# --- source x shell: an untrusted file's hostile values never run ---------------------------

SHELLS = [
    ("bash", ["bash", "-c"]),
    ("zsh", ["zsh", "-o", "prompt_subst", "-c"]),
    ("dash", ["dash", "-c"]),
    ("ksh", ["ksh", "-c"]),
]


@pytest.mark.parametrize(("shell", "argv"), SHELLS, ids=[s for s, _ in SHELLS])
def test_untrusted_hostile_file_runs_nothing_in_any_shell(
    tmp_path: Path, shell: str, argv: list[str]
) -> None:
    if shutil.which(argv[0]) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{shell} is missing where CI runs (.ci/run installs it)")
        pytest.skip(f"{shell} is not installed (CI installs it: apt-get install {shell})")
    marker = tmp_path / "pwned"
    (tmp_path / "portalloc.toml").write_text(HOSTILE.replace("@MARKER@", str(marker)))
    portalloc = [sys.executable, "-m", "portalloc"]
    script = (
        f'eval "$({" ".join(portalloc)} env s)"; '
        # zsh prints PROMPT_EOL_MARK; an interactive prompt would expand it: do so here.
        'print -P "${PROMPT_EOL_MARK-}" 2>/dev/null; echo "${TAR_OPTIONS-unset}"'
    )
    out = subprocess.run(
        [*argv, script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **SKIP},
        check=False,
    )
    assert "unset" in out.stdout
    assert not marker.exists()


def test_untrusted_hostile_file_runs_nothing_in_fish(tmp_path: Path) -> None:
    if not HAVE_FISH:
        pytest.skip("fish is not installed (CI installs it)")
    marker = tmp_path / "pwned"
    (tmp_path / "portalloc.toml").write_text(HOSTILE.replace("@MARKER@", str(marker)))
    out = subprocess.run(
        [
            "fish",
            "-c",
            f"{sys.executable} -m portalloc env s --format fish | source; "
            "set -q TAR_OPTIONS; or echo unset",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **SKIP},
        check=False,
    )
    assert "unset" in out.stdout and not marker.exists()


# --- no traceback, bounded waits and widths ------------------------------------------------


def test_deeply_nested_project_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "portalloc.toml").write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")
    result = run_cli("env", "s", cwd=tmp_path, process=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_check_wait_has_an_upper_bound() -> None:
    for value in ("inf", "nan", "1e300", "-1", "86401", "soon"):
        result = run_cli("check", "s", "--wait", value, process=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr, value
        # One rule, whatever is wrong: nan was once "must be <= 86400".
        assert (
            "Invalid value for '--wait': must be a number of seconds between 0 and 86400, "
            f"not '{value}'"
        ) in result.stderr, value


def test_a_huge_columns_value_does_not_write_megabytes(tmp_path: Path) -> None:
    assert invoke("allocate", "s", env=SKIP).returncode == 0
    result = run_cli("status", env={"COLUMNS": "10000000"}, process=True)
    assert result.returncode == 0 and len(result.stdout) < 20_000


def test_ctrl_c_while_the_full_cli_is_imported_is_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C lands while Typer and rich are imported (the slow part of start-up)."""
    import importlib.abc

    from portalloc.adapters import entry

    class Interrupt(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, *_args: object) -> None:
            if name == "portalloc.adapters.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "portalloc.adapters.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupt(), *sys.meta_path])
    assert entry.main(["status"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_a_state_dir_inside_the_repository_vouches_for_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repository that ships `.portalloc/trusted/<its hash>` (a clone's files are the
    user's own, 0644): with PORTALLOC_STATE_DIR pointing into it, or relative, nothing
    of it is believed."""
    import hashlib

    monkeypatch.setattr(portalloc.config, "default_state_dir", lambda: tmp_path / "own")
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    content = b'[ports]\nweb = 0\n[env]\nURL = "http://evil.example/{web_port}"\n'
    (repo / "portalloc.toml").write_bytes(content)
    shipped = repo / ".portalloc" / "trusted"
    shipped.mkdir(parents=True, mode=0o700)
    shipped.parent.chmod(0o700)
    (shipped / hashlib.sha256(content).hexdigest()).write_text("x\n")
    (shipped / hashlib.sha256(content).hexdigest()).chmod(0o600)
    for state in (str(repo / ".portalloc"), ".portalloc"):
        env = {"PORTALLOC_STATE_DIR": state, **SKIP}
        result = invoke("env", "s", "--format", "json", cwd=repo, env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {}, state
        invoke("release", "s", cwd=repo, env=env)


# --- found by the hostile review of this change ---------------------------------------------


def test_a_huge_planted_project_file_costs_nothing(tmp_path: Path) -> None:
    """A sparse 2 GiB pyproject.toml in a parent directory (anyone's /tmp) is not read."""
    parent = tmp_path / "shared-tmp"
    (parent / "sub").mkdir(parents=True)
    with (parent / "pyproject.toml").open("wb") as handle:
        handle.truncate(2 << 30)
    result = run_cli("env", "s", "--format", "json", cwd=parent / "sub", process=True)
    assert result.returncode == 0 and "API_PORT" in result.stdout, result.stderr
    with (parent / "sub" / "portalloc.toml").open("wb") as handle:
        handle.truncate(2 << 30)
    refused = run_cli("env", "s", cwd=parent / "sub", process=True)
    assert refused.returncode == 2 and "more than portalloc reads" in refused.stderr


def test_what_trust_shows_is_escaped_never_raw(tmp_path: Path) -> None:
    tree = tmp_path / "x\x1b[31mRED"
    tree.mkdir()
    (tree / "portalloc.toml").write_text(
        '[ports]\napi = 0\n[env]\nAPI_URL = "http://localhost:{api_port}\u202e/moc.live//:ptth"\n'
    )
    warned = invoke("env", "s", cwd=tree, env=SKIP)
    assert "\x1b" not in warned.stderr and "\\x1b" in warned.stderr
    shown = invoke("trust", "--show", cwd=tree)
    assert "\x1b" not in shown.stdout and "\u202e" not in shown.stdout
    assert "\\u202e" in shown.stdout


def test_trust_show_of_a_settings_only_file_marks_nothing_as_waiting(tmp_path: Path) -> None:
    (tmp_path / "portalloc.toml").write_text("base = 20000\n")
    shown = invoke("trust", "--show", cwd=tmp_path).stdout
    assert "SUPABASE_URL=http://localhost:{rest_port}\n" in shown
    assert "only once trusted" not in shown
    assert env_json(tmp_path)["SUPABASE_URL"] == "http://localhost:20001"


def test_closed_stdout_or_stderr_is_no_internal_error(tmp_path: Path) -> None:
    """`portalloc env >&-` or `2>&-`: the documented exit code, and no crash report."""
    import tempfile

    crashes = Path(tempfile.gettempdir())
    before = set(crashes.glob("portalloc-crash-*"))
    for args, code in ((["env", "s"], 0), (["status"], 0), (["env", "bad\x01"], 2)):
        for fd in (1, 2):

            def close(fd: int = fd) -> None:
                os.close(fd)

            proc = subprocess.run(
                [sys.executable, "-m", "portalloc", *args],
                preexec_fn=close,
                cwd=tmp_path,
                env={**os.environ, **SKIP, "PORTALLOC_DEBUG": ""},
                timeout=60,
                check=False,
            )
            assert proc.returncode == code, (args, fd)
    assert set(crashes.glob("portalloc-crash-*")) == before


def test_an_undecodable_output_path_is_a_usage_error(tmp_path: Path) -> None:
    bad = os.fsdecode(bytes(tmp_path) + b"/x\xff.env")
    for option in ("--env-file", "--write"):
        result = invoke("env", "s", option, bad, env=SKIP)
        assert result.returncode == 2 and "not a printable UTF-8 path" in result.stderr
