"""Domain values: the profile, the lease and the allocation handed to users."""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

from portalloc.errors import InvalidSessionId

MAX_SESSION_ID_LENGTH = 4096

HeldWhile = Literal["pid", "worktree", "ttl"]
MAX_TTL_MINUTES = 525_600  # one year
MAX_PID = 4_194_304  # Linux's PID_MAX_LIMIT; no OS portalloc runs on goes higher

# Every name that reaches an output must match its rule as a whole: fullmatch, so a
# trailing newline ("NAME\n") is not a match, as it would be with `^...$`.
SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
COMPOSE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")

# Variables that change how a shell, loader, interpreter, editor or build tool behaves:
# a project file in a cloned repository must not set them in its users' shells, and a
# shared ledger must not carry them into another user's. Compared upper-cased (zsh
# ties lowercase `path`, `cdpath`, `fpath`... to the uppercase ones). Besides this
# list, every variable's template must use a field of the lease (see config.py), so
# no variable can carry a fixed command.
FORBIDDEN_VARIABLES = frozenset(
    {
        # shells and their prompts, history, startup files
        "PATH", "HOME", "SHELL", "IFS", "ENV", "CDPATH", "FPATH", "MANPATH", "MAILPATH",
        "MAIL", "MAILCHECK", "MODULE_PATH", "PROMPT_COMMAND", "PROMPT", "PROMPT2", "PROMPT3",
        "PROMPT4", "RPROMPT", "RPROMPT2", "RPS1", "RPS2", "SPROMPT", "PS0", "PS1", "PS2",
        "PS3", "PS4", "PSVAR", "SHELLOPTS", "BASHOPTS", "GLOBIGNORE", "FIGNORE", "FCEDIT",
        "HISTFILE", "HISTCONTROL", "HISTSIZE", "HISTFILESIZE", "HISTIGNORE", "HISTTIMEFORMAT",
        "INPUTRC", "ZDOTDIR", "TMOUT", "NULLCMD", "READNULLCMD", "WORDCHARS", "PWD",
        "OLDPWD", "SHLVL", "TERM", "TERMINFO", "TERMINFO_DIRS", "TERMCAP", "COLUMNS",
        "LINES", "POSIXLY_CORRECT", "HOSTALIASES", "RESOLV_HOST_CONF", "LOCALDOMAIN",
        "RES_OPTIONS", "TMPDIR", "TMP", "TEMP", "TZ", "TZDIR", "LANG", "LANGUAGE", "NLSPATH",
        "LOCPATH", "GCONV_PATH", "MALLOC_CHECK_", "MALLOC_PERTURB_", "GLIBC_TUNABLES",
        # editors, pagers and the programs they start
        "EDITOR", "VISUAL", "PAGER", "MANPAGER", "MANOPT", "BROWSER", "LESS", "LESSOPEN",
        "LESSCLOSE", "LESSKEY", "VIMINIT", "GVIMINIT", "EXINIT", "MYVIMRC", "VIMRUNTIME",
        "EMACSLOADPATH", "SSH_ASKPASS", "SUDO_ASKPASS", "SUDO_EDITOR", "GIT_EDITOR",
        # interpreters, runtimes and build tools
        "CLASSPATH", "RUBYOPT", "RUBYLIB", "GEM_HOME", "GEM_PATH", "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "MAVEN_OPTS", "GRADLE_OPTS", "SBT_OPTS",
        "TCLLIBPATH", "RUSTC_WRAPPER", "RUSTC", "RUSTFLAGS", "RUSTDOCFLAGS", "CC", "CXX",
        "CPP", "LD", "AR", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "MAKEFLAGS",
        "MAKEFILES", "MFLAGS", "OPENSSL_CONF", "OPENSSL_ENGINES", "OPENSSL_MODULES",
        "SSLKEYLOGFILE", "SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE", "CURL_HOME", "WGETRC", "KUBECONFIG", "DOCKER_CONFIG",
        "VIRTUAL_ENV", "CONDA_PREFIX", "R_PROFILE", "R_PROFILE_USER", "R_ENVIRON",
        "R_ENVIRON_USER", "JULIA_LOAD_PATH", "JULIA_DEPOT_PATH", "ERL_LIBS", "ERL_FLAGS",
        "ERL_AFLAGS", "ERL_ZFLAGS", "MIX_EXS", "PHPRC", "PHP_INI_SCAN_DIR", "MAGIC",
        "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME",
        "XDG_RUNTIME_DIR", "XDG_CONFIG_DIRS", "XDG_DATA_DIRS", "DISPLAY", "WAYLAND_DISPLAY",
        "DBUS_SESSION_BUS_ADDRESS", "XAUTHORITY", "KRB5CCNAME", "KRB5_CONFIG",
        "NETRC", "HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "ALL_PROXY", "NO_PROXY",
        "SOCKS_PROXY", "RSYNC_RSH", "RSYNC_PROXY", "CVS_RSH", "SVN_EDITOR", "HGRCPATH",
        "HGEDITOR", "HGPLAIN", "GOFLAGS", "GOPATH", "GOROOT", "GOPROXY", "GOBIN", "GOENV",
        "GOTOOLCHAIN", "GOCACHE", "GOMODCACHE", "GOPRIVATE", "GONOSUMDB", "GONOPROXY",
        "GOSUMDB", "GOINSECURE", "GOWORK", "GOEXPERIMENT", "GODEBUG", "GOOS", "GOARCH",
    }
)  # fmt: skip
FORBIDDEN_PREFIXES = (
    "LD_", "DYLD_", "PYTHON", "PERL", "RUBY", "BASH_", "ZSH", "KSH_", "FISH_", "LC_",
    "GIT_", "SVN_", "SSH_", "GPG_", "GNUPG", "DOCKER_", "BUILDKIT_", "PODMAN_",
    "CONTAINERS_", "NPM_", "YARN_", "PNPM_", "COREPACK_", "NODE_", "BUN_", "DENO_",
    "PIP_", "UV_", "POETRY_", "PDM_", "HATCH_", "CONDA_", "PYENV", "RBENV", "NVM_",
    "ASDF_", "MISE_", "DIRENV_", "CARGO_", "RUSTUP_", "JAVA_", "JDK_", "GRADLE_",
    "MAVEN_", "M2_", "DOTNET_", "COMPLUS_", "CORECLR_", "MONO_", "LUA", "TCL", "TK_",
    "PHP", "COMPOSER_", "GEM_", "BUNDLE_", "JULIA_", "R_", "ERL_", "ELIXIR", "MIX_",
    "HEX_", "AWS_", "AZURE_", "GOOGLE_", "GCLOUD_", "CLOUDSDK_", "KUBE", "HELM_",
    "TF_", "VAULT_", "OPENSSL_", "SSL_", "NIX_", "GUIX_", "FLATPAK_", "SNAP_",
    "PORTALLOC_", "PORT_ALLOC_", "CLAUDE_", "CODEX_", "GEMINI_", "ANTHROPIC_", "OPENAI_",
)  # fmt: skip
# Compose reads these from the shell: COMPOSE_FILE or COMPOSE_PROFILES could point a
# stack at a file of the attacker's. Only the project name is portalloc's to set.
COMPOSE_ALLOWED = frozenset({"COMPOSE_PROJECT_NAME"})


def forbidden_variable(name: str) -> bool:
    """Whether NAME changes how a shell, loader, interpreter or tool behaves."""
    upper = name.upper()
    if upper.startswith("COMPOSE_"):
        return upper not in COMPOSE_ALLOWED
    return (
        upper in FORBIDDEN_VARIABLES
        or upper.startswith(FORBIDDEN_PREFIXES)
        or upper.endswith("_PROXY")
    )


def validate_session_id(session_id: object) -> str:
    """Return the id unchanged if it is a valid session id, else raise InvalidSessionId."""
    if not isinstance(session_id, str):
        raise InvalidSessionId(f"must be a string, got {type(session_id).__name__}")
    if not session_id:
        raise InvalidSessionId("must not be empty")
    if len(session_id) > MAX_SESSION_ID_LENGTH:
        raise InvalidSessionId(
            f"is {len(session_id)} characters long; the maximum is {MAX_SESSION_ID_LENGTH}"
        )
    if session_id.isspace():
        raise InvalidSessionId("must not be only whitespace")
    for index, char in enumerate(session_id):
        category = unicodedata.category(char)
        if category == "Cc":
            raise InvalidSessionId(
                f"control character U+{ord(char):04X} at position {index} is not allowed"
            )
        if category == "Cs":
            # A lone surrogate is what undecodable bytes in argv become; it cannot be
            # written back out as UTF-8, so it could never round-trip.
            raise InvalidSessionId(f"position {index} is not valid UTF-8")
    return session_id


def isoformat(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    # fromisoformat is ~30x faster than strptime, which matters with 1,000 leases.
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no timezone")
    return moment.astimezone(UTC)


def template_fields(template: str) -> list[str]:
    """Names a `{...}` template refers to; raises ValueError for anything but plain names."""
    names: list[str] = []
    for _literal, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if spec or conversion:
            raise ValueError(f"format specs and conversions are not allowed in {{{name}}}")
        if not name.isidentifier():
            raise ValueError(f"{{{name}}} is not a plain field name")
        names.append(name)
    return names


def render_template(template: str, fields: dict[str, str]) -> str:
    """Substitute plain `{name}` fields; the profile loader has already vetted the names."""
    out: list[str] = []
    for literal, name, _spec, _conversion in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append(fields[name])
    return "".join(out)


# Internal records are NamedTuples rather than dataclasses: each frozen dataclass
# costs ~0.8 ms to create at import, and every `portalloc env` pays for imports.


class Profile(NamedTuple):
    """Named ports at fixed offsets in a block, and the variables that expose them."""

    ports: tuple[tuple[str, int], ...]
    env: tuple[tuple[str, str], ...]
    compose_prefix: str = "ac"
    source: Path | None = None

    @property
    def span_needed(self) -> int:
        return max(offset for _name, offset in self.ports) + 1

    def allowed_fields(self) -> set[str]:
        return {f"{name}_port" for name, _ in self.ports} | {"compose_project_name", "session_id"}


DEFAULT_PROFILE = Profile(
    ports=(("db", 0), ("rest", 1), ("realtime", 2), ("api", 3)),
    env=(
        ("AGENT_COORDINATOR_DB_PORT", "{db_port}"),
        ("AGENT_COORDINATOR_REST_PORT", "{rest_port}"),
        ("AGENT_COORDINATOR_REALTIME_PORT", "{realtime_port}"),
        ("API_PORT", "{api_port}"),
        ("COMPOSE_PROJECT_NAME", "{compose_project_name}"),
        ("SUPABASE_URL", "http://localhost:{rest_port}"),
    ),
)


class Owner(NamedTuple):
    """The process a lease lives with: PID plus its start time, so a reused PID is not it."""

    pid: int
    started: float | None  # seconds since the epoch, where the OS tells


class Lease(NamedTuple):
    """One session's block of ports, as recorded in the ledger."""

    session_id: str
    start: int
    span: int
    ports: tuple[tuple[str, int], ...]
    env: tuple[tuple[str, str], ...]
    compose_project_name: str
    created_at: datetime
    expires_at: datetime
    ttl_minutes: int
    owner: Owner | None = None
    worktree: str | None = None
    # `portalloc run` processes using a lease they did not make: while any of them
    # lives the lease stays, whatever its own anchor says.
    guests: tuple[Owner, ...] = ()

    @property
    def end(self) -> int:
        return self.start + self.span - 1

    def overlaps(self, start: int, end: int) -> bool:
        return self.start <= end and start <= self.end

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at

    @property
    def held_while(self) -> HeldWhile:
        """What keeps the lease: its owner process, its worktree, or only its TTL."""
        if self.owner is not None:
            return "pid"
        if self.worktree is not None:
            return "worktree"
        return "ttl"

    def port_named(self, name: str) -> int | None:
        return dict(self.ports).get(name)


@dataclass(frozen=True)
class PortAllocation:
    """A lease as users see it: ports, names, timestamps and the environment block."""

    session_id: str
    ports: dict[str, int]
    compose_project_name: str
    created_at: datetime
    expires_at: datetime
    ttl_remaining_minutes: float
    env: dict[str, str]
    block_start: int
    block_end: int
    pid: int | None = None
    worktree: str | None = None
    held_while: HeldWhile = "ttl"
    guests: tuple[int, ...] = ()
    home_block: int | None = None

    @classmethod
    def from_lease(cls, lease: Lease, now: datetime, home: int | None = None) -> PortAllocation:
        remaining = max(0.0, (lease.expires_at - now).total_seconds() / 60)
        return cls(
            session_id=lease.session_id,
            ports=dict(lease.ports),
            compose_project_name=lease.compose_project_name,
            created_at=lease.created_at,
            expires_at=lease.expires_at,
            ttl_remaining_minutes=round(remaining, 2),
            env=dict(lease.env),
            block_start=lease.start,
            block_end=lease.end,
            pid=lease.owner.pid if lease.owner else None,
            worktree=lease.worktree,
            held_while=lease.held_while,
            guests=tuple(guest.pid for guest in lease.guests),
            home_block=home,
        )

    def __getattr__(self, name: str) -> int:
        # `a.rest_port` for whatever ports the profile names.
        if name.endswith("_port"):
            ports = self.__dict__.get("ports", {})
            if name[: -len("_port")] in ports:
                port: int = ports[name[: -len("_port")]]
                return port
        raise AttributeError(name)

    @property
    def env_snippet(self) -> str:
        from portalloc.render import render_sh

        return render_sh(self.env)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"session_id": self.session_id}
        for name, port in self.ports.items():
            data[f"{name}_port"] = port
        data.update(
            compose_project_name=self.compose_project_name,
            created_at=isoformat(self.created_at),
            expires_at=isoformat(self.expires_at),
            ttl_remaining_minutes=self.ttl_remaining_minutes,
            block_start=self.block_start,
            block_end=self.block_end,
            pid=self.pid,
            worktree=self.worktree,
            held_while=self.held_while,
            guests=list(self.guests),
            home_block=self.home_block,
            env=self.env,
        )
        return data
