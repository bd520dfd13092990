"""The rules every name, number and id must meet wherever it comes from: flags, the
environment, a project file or the ledger. Above errors.py only: the bottom of the
import graph."""

from __future__ import annotations

import re
from functools import cache

from portalloc.errors import InvalidSessionId

TYPE_CHECKING = False  # `typing` costs start-up time on the read path (bench/README.md)
if TYPE_CHECKING:
    from collections.abc import Container

    from portalloc.models import Lease

MAX_SESSION_ID_LENGTH = 4096

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
# list, every variable's template must use a field of the lease (see profile.py), so
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
        # found passing this list in review (it is the second wall, behind trust)
        "TAR_OPTIONS", "PSQLRC", "LESSEDIT", "IRBRC", "SCREENRC", "IPYTHONDIR", "STTY",
        "RIPGREP_CONFIG_PATH", "CCACHE_PREFIX", "PROMPT_EOL_MARK", "PIP_INDEX_URL",
        # zsh: assigning these calls setuid()/setgid()
        "UID", "EUID", "GID", "EGID", "USERNAME", "USER", "LOGNAME",
        "GOPACKAGESDRIVER", "CONTAINER_HOST", "CONTAINERS_CONF",
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
    "HIST", "PROMPT", "SYSTEMD_", "GH_", "FZF_", "JUPYTER_", "PYTEST_", "RSYNC_", "CCACHE_",
    "TAR_", "LESS", "SCREEN", "TMUX", "EMACS", "VIM", "NVIM", "CMAKE_", "STARSHIP_",
    "RUSTC", "ANSIBLE_", "DISTCC_", "PKG_CONFIG", "MESON_", "NINJA_", "BAZEL", "CONAN_",
    "VCPKG_", "TERRAFORM_", "PULUMI_", "OLLAMA_", "HF_", "TRANSFORMERS_", "TORCH_",
)  # fmt: skip
# Endings that name a program to start, options a tool splices into its command line,
# or a start-up file: TAR_OPTIONS, GH_PAGER, FZF_DEFAULT_COMMAND, PSQLRC...
FORBIDDEN_SUFFIXES = (
    "_PAGER", "_EDITOR", "_OPTIONS", "_OPTS", "_ADDOPTS", "_COMMAND", "_CMD", "_PROG",
    "_PROGRAM", "_SHELL", "_HOOK", "_PROXY", "_PRELOAD", "RC",
)  # fmt: skip
# Compose reads these from the shell: COMPOSE_FILE or COMPOSE_PROFILES could point a
# stack at a file of the attacker's. Only the project name is portalloc's to set.
COMPOSE_ALLOWED = frozenset({"COMPOSE_PROJECT_NAME"})


# Shapes whose value cannot carry a command, a path or a URL, whatever the variable's
# name: a port number, a compose project name, a container name. A variable of such a
# shape is safe by construction, so `NODE_PORT` or `SSH_PORT` (a port named `node` or
# `ssh`) is allowed although its prefix is refused for any other value.
PORT_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*_PORT")
CONTAINER_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*_CONTAINER_NAME")
CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
PORT_VALUE = re.compile(r"[0-9]{1,5}")
COMPOSE_PROJECT_VARIABLE = "COMPOSE_PROJECT_NAME"


# Named URLs (`http://<port>.<slug>.localhost:<proxy port>`): every part of a host name
# is a DNS label, lowercase, by construction. The default proxy port lies below the
# default span (10000-11999), below every OS's ephemeral range (32768 and up) and above
# the privileged ports: nothing portalloc hands out, and nothing the kernel picks for an
# outgoing connection, ever holds it.
DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
DEFAULT_PROXY_PORT = 9999
URL_DOMAIN = "localhost"


def dns_label(text: str) -> str:
    """TEXT as a DNS label: ASCII letters and digits lowercased, every other run of
    characters one `-`, at most 63 characters; '' when nothing is left."""
    import unicodedata  # only where a name is made: not on the read path

    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")[:63].rstrip("-")


def port_label(name: str) -> str | None:
    """The DNS label of port NAME (`web_3000` -> `web-3000`), or None when it has none."""
    label = name.lower().replace("_", "-")
    return label if DNS_LABEL.fullmatch(label) else None


def slug_for(session_id: str, worktree: str | None, taken: Container[str]) -> str:
    """The session's slug: the DNS label of its worktree's directory name (or of the
    session id's last path component), with hex digits of the id's SHA-256 added when
    another session holds that label (TAKEN)."""
    source = (worktree or session_id).replace("\\", "/").rstrip("/")
    base = dns_label(source.rsplit("/", 1)[-1] or source) or "session"
    if base not in taken:
        return base
    import hashlib

    digest = hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()
    for length in range(8, len(digest) + 1):
        head = base[: 63 - length - 1].rstrip("-") or "s"
        slug = f"{head}-{digest[:length]}"
        if slug not in taken:
            return slug
    raise AssertionError("two distinct session ids share a full SHA-256")  # pragma: no cover


# Unicode category Cc (control characters), searched in C: the ledger checks every
# string of every lease it loads.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def first_unprintable(text: str) -> int | None:
    """Where TEXT holds its first control character (Unicode category Cc) or lone
    surrogate (Cs), or None. Surrogates are found by the UTF-8 encoder, which refuses
    them: a character class spanning them costs half a millisecond to compile on every
    start-up (bench/README.md)."""
    found = CONTROL.search(text)
    end = len(text) if found is None else found.start()
    if not text.isascii():
        try:
            text[:end].encode("utf-8")
        except UnicodeEncodeError as exc:
            return exc.start
    return None if found is None else end


@cache
def forbidden_variable(name: str) -> bool:
    """Whether NAME changes how a shell, loader, interpreter or tool behaves."""
    upper = name.upper()
    if upper.startswith("COMPOSE_"):
        return upper not in COMPOSE_ALLOWED
    return (
        upper in FORBIDDEN_VARIABLES
        or upper.startswith(FORBIDDEN_PREFIXES)
        or upper.endswith(FORBIDDEN_SUFFIXES)
    )


def safe_value(name: str, value: str) -> bool:
    """Whether NAME=VALUE is a port number, compose project or container name: a shape no
    shell, loader or tool can turn into a command, whatever NAME is."""
    if PORT_VARIABLE.fullmatch(name):
        return PORT_VALUE.fullmatch(value) is not None
    if name == COMPOSE_PROJECT_VARIABLE:
        return COMPOSE_NAME.fullmatch(value) is not None
    if CONTAINER_VARIABLE.fullmatch(name):
        return CONTAINER_NAME.fullmatch(value) is not None and len(value) <= 255
    return False


def variable_problem(name: str, value: str) -> str | None:
    """Why a lease may not set NAME=VALUE, or None: the one rule for every variable a lease
    carries, applied when a lease is made and again when it is loaded."""
    if not SHELL_NAME.fullmatch(name):
        return "is not a valid shell variable name"
    if has_unprintable(value):
        return "holds a control character"
    if forbidden_variable(name) and not safe_value(name, value):
        return "changes how shells, loaders, interpreters or tools behave"
    return None


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
    index = first_unprintable(session_id)
    if index is not None:
        char = session_id[index]
        if "\ud800" <= char <= "\udfff":
            # A lone surrogate is what undecodable bytes in argv become; it cannot be
            # written back out as UTF-8, so it could never round-trip.
            raise InvalidSessionId(f"position {index} is not valid UTF-8")
        raise InvalidSessionId(
            f"control character U+{ord(char):04X} at position {index} is not allowed"
        )
    return session_id


def has_unprintable(text: str) -> bool:
    """Whether TEXT holds a control character or a lone surrogate."""
    return first_unprintable(text) is not None


def lease_problem(lease: Lease) -> str | None:
    """Why a lease breaks the rules, or None: the one set of lease rules, checked before
    a lease is written and again when it is loaded, so a lease portalloc writes is a
    lease it loads (a refused one would be dropped and its ports handed out again)."""
    try:
        validate_session_id(lease.session_id)
    except InvalidSessionId as exc:
        return exc.message
    who = f"lease {lease.session_id!r}"
    if not 1 <= lease.ttl_minutes <= MAX_TTL_MINUTES or not 1 <= lease.span <= 65535:
        return f"{who} has an absurd TTL or span"
    if not 1 <= lease.start <= lease.end <= 65535:
        return f"{who} spans {lease.start}-{lease.end}"
    for name, port in lease.ports:
        if not SHELL_NAME.fullmatch(name) or not lease.start <= port <= lease.end:
            return f"{who} has a bad port {name!r}"
    # Control characters and lone surrogates (what undecodable bytes become, which no
    # UTF-8 write can carry: one would make every later save fail) in no string.
    for name, value in lease.env:
        problem = variable_problem(name, value)
        if problem is not None:
            return f"{who} sets variable {name!r}, which {problem}"
    if not COMPOSE_NAME.fullmatch(lease.compose_project_name):
        return f"{who} has a bad compose project name"
    if lease.slug is not None and not DNS_LABEL.fullmatch(lease.slug):
        return f"{who} has a slug that is not a DNS label"
    if lease.bare is not None and lease.bare not in dict(lease.ports):
        return f"{who} names a port it does not have for its bare name"
    if lease.worktree is not None and (not lease.worktree or has_unprintable(lease.worktree)):
        return f"{who} has a bad worktree path"
    for owner in (lease.owner, *lease.guests):
        if owner is not None and not (
            1 <= owner.pid <= MAX_PID and (owner.started is None or 0 <= owner.started < 2**40)
        ):
            return f"{who} has an impossible PID"
    return None
