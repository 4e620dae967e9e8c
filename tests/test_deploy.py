"""The deployment files keep their promises: checked statically, without Docker or nginx.

The image itself is built and run with podman in tests/test_image.py; Docker, compose,
systemd and nginx are not run where the suite runs, so the Dockerfile, deploy/compose.yml,
the systemd unit and the nginx example are parsed here and their invariants asserted: what
is published where, where passwords come from, who the service runs as, which routes a
reverse proxy forwards, and that every ``INTAKE_*`` name they use is a real setting.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from starlette.routing import BaseRoute, Match

from app.api import dicomweb, pages, public
from app.api.apps import create_admin_app, create_public_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "compose.yml"
UNIT = ROOT / "deploy" / "orthanc-intake.service"
NGINX = ROOT / "deploy" / "nginx.conf"
GUIDE = ROOT / "docs" / "DEPLOYMENT.md"

DEFAULTS = Settings.model_fields
ADMIN_PORT = int(DEFAULTS["admin_port"].default)
PUBLIC_PORT = int(DEFAULTS["public_port"].default)
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# Secrets that may also be given as a file (INTAKE_..._FILE), as Docker secrets are.
SECRET_FILE_VARIABLES = {"INTAKE_ORTHANC_PASSWORD_FILE", "INTAKE_WEBHOOK_SECRET_FILE"}


# --------------------------------------------------------------------------- helpers


def _mapping(value: object) -> dict[str, object]:
    assert isinstance(value, dict), f"expected a mapping, got {value!r}"
    assert all(isinstance(key, str) for key in value)
    return value


def _strings(value: object) -> list[str]:
    assert isinstance(value, list), f"expected a list, got {value!r}"
    assert all(isinstance(item, str) for item in value)
    return value


def _items(value: object) -> list[object]:
    if value is None:
        return []
    assert isinstance(value, list), f"expected a list, got {value!r}"
    return value


def _compose() -> dict[str, object]:
    # PyYAML comes with uvicorn[standard], a runtime dependency; it ships no type stubs.
    yaml = importlib.import_module("yaml")
    loaded: object = yaml.safe_load(COMPOSE.read_text())
    return _mapping(loaded)


def _services() -> dict[str, dict[str, object]]:
    return {name: _mapping(body) for name, body in _mapping(_compose()["services"]).items()}


def _environment(service: dict[str, object]) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        pairs = [item.split("=", 1) for item in _strings(raw)]
        return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}
    return {key: str(value) for key, value in _mapping(raw).items()}


def _secret_names(service: dict[str, object]) -> set[str]:
    names = set()
    for item in _items(service.get("secrets")):
        names.add(item if isinstance(item, str) else str(_mapping(item)["source"]))
    return names


@dataclass(frozen=True)
class _Published:
    host_ip: str  # "" means every address
    target: int


def _published(service: dict[str, object]) -> list[_Published]:
    """The ports a service publishes, from compose's short or long syntax."""
    ports: list[_Published] = []
    for item in _items(service.get("ports")):
        if isinstance(item, dict):
            long = _mapping(item)
            ports.append(_Published(str(long.get("host_ip", "")), int(str(long["target"]))))
            continue
        text = str(item).split("/", 1)[0]
        host_ip = ""
        if text.startswith("["):  # [::1]:8001:8001
            host_ip, text = text[1:].split("]:", 1)
        parts = text.split(":")
        if len(parts) == 3:
            host_ip = parts[0]
        assert "-" not in parts[-1], f"port ranges are not expected here: {item!r}"
        ports.append(_Published(host_ip, int(parts[-1])))
    return ports


@dataclass(frozen=True)
class _Instruction:
    keyword: str
    arguments: str


def _dockerfile_stages() -> list[list[_Instruction]]:
    """The Dockerfile's instructions, continuation lines joined, split into stages."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    stages: list[list[_Instruction]] = []
    for text in logical:
        keyword, _, arguments = text.partition(" ")
        instruction = _Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, "the Dockerfile must start with FROM"
        stages[-1].append(instruction)
    return stages


def _all(stage: list[_Instruction], keyword: str) -> list[str]:
    return [i.arguments for i in stage if i.keyword == keyword]


def _exec_form(arguments: str) -> list[str]:
    return _strings(json.loads(arguments))


def _unit() -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: sections of keys that may repeat (Environment=, ...)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, line in enumerate(UNIT.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], {})
            continue
        key, equals, value = stripped.partition("=")
        assert equals, f"line {number} is not KEY=VALUE"
        assert current is not None, f"line {number} is outside a [Section]"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _unit_environment(service: dict[str, list[str]]) -> dict[str, str]:
    pairs = (value.split("=", 1) for value in service.get("Environment", []))
    return {pair[0]: pair[1] for pair in pairs}


@dataclass
class _Directive:
    name: str
    args: list[str]
    block: list[_Directive] | None = None


def _nginx_tokens(text: str) -> list[str]:
    tokens: list[str] = []
    word = ""
    index = 0
    while index < len(text):
        char = text[index]
        if char in "\"'":
            end = text.index(char, index + 1)
            tokens.append(text[index + 1 : end])
            index = end + 1
            continue
        if char == "#":
            index = text.find("\n", index)
            index = len(text) if index < 0 else index
            continue
        if char.isspace() or char in "{};":
            if word:
                tokens.append(word)
                word = ""
            if char in "{};":
                tokens.append(char)
        else:
            word += char
        index += 1
    assert not word, "the nginx configuration ends inside a directive"
    return tokens


def _nginx() -> list[_Directive]:
    """The nginx example as a tree of directives (a small parser for its plain syntax)."""
    root: list[_Directive] = []
    stack = [root]
    words: list[str] = []
    for token in _nginx_tokens(NGINX.read_text()):
        if token == ";":
            stack[-1].append(_Directive(words[0], words[1:]))
            words = []
        elif token == "{":
            directive = _Directive(words[0], words[1:], block=[])
            stack[-1].append(directive)
            assert directive.block is not None
            stack.append(directive.block)
            words = []
        elif token == "}":
            assert not words, f"unterminated directive before '}}': {words}"
            stack.pop()
        else:
            words.append(token)
    assert len(stack) == 1, "unbalanced braces in the nginx configuration"
    assert not words, "the nginx configuration ends inside a directive"
    return root


def _walk(directives: list[_Directive]) -> list[_Directive]:
    found: list[_Directive] = []
    for directive in directives:
        found.append(directive)
        if directive.block is not None:
            found.extend(_walk(directive.block))
    return found


def _named(directives: list[_Directive], name: str) -> list[_Directive]:
    return [d for d in _walk(directives) if d.name == name]


def _https_server() -> list[_Directive]:
    for server in _named(_nginx(), "server"):
        if server.block is None:  # an upstream's `server host:port;`
            continue
        if any("ssl" in d.args for d in server.block if d.name == "listen"):
            return server.block
    raise AssertionError("no `listen ... ssl` server in the nginx example")


def _single(block: list[_Directive], name: str) -> list[str]:
    found = [d.args for d in block if d.name == name]
    assert len(found) == 1, f"expected one `{name}` directive, found {len(found)}"
    return found[0]


def _nginx_bytes(size: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    match = re.fullmatch(r"(\d+)([kmg]?)", size.lower())
    assert match, f"not an nginx size: {size}"
    return int(match.group(1)) * units[match.group(2)]


def _nginx_seconds(duration: str) -> float:
    units = {"": 1, "s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+)(s|m|h)?", duration)
    assert match, f"not an nginx duration: {duration}"
    return int(match.group(1)) * units[match.group(2) or ""]


def _served(app_routes: list[BaseRoute], path: str) -> bool:
    """Whether a path exists on an app, whatever the method (starlette's own matching)."""
    for method in ("GET", "POST"):
        scope: dict[str, object] = {
            "type": "http",
            "path": path,
            "method": method,
            "root_path": "",
            "headers": [],
        }
        for route in app_routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return True
    return False


def _proxied_locations() -> list[tuple[str, str]]:
    """(modifier, path) of every location that passes requests to the intake."""
    locations: list[tuple[str, str]] = []
    for location in (d for d in _https_server() if d.name == "location"):
        assert location.block is not None
        if any(d.name == "proxy_pass" for d in location.block):
            *modifier, path = location.args
            locations.append(("".join(modifier), path))
    return locations


def _nginx_would_proxy(path: str) -> bool:
    for modifier, location in _proxied_locations():
        assert modifier in ("=", "^~"), f"only exact and ^~ locations are expected: {modifier}"
        if (modifier == "=" and path == location) or (
            modifier == "^~" and path.startswith(location)
        ):
            return True
    return False


# --------------------------------------------------------------------------- compose


def test_compose_private_services_publish_no_port() -> None:
    """Orthanc and PostgreSQL publish nothing and use no host network: only the intake gets in."""
    services = _services()
    for name in ("orthanc", "postgres"):
        assert not services[name].get("ports"), f"{name} must not publish a port"
        assert services[name].get("network_mode") != "host"
    assert all(s.get("network_mode") != "host" for s in services.values())


def test_compose_admin_port_is_published_on_loopback_only() -> None:
    """The public port is published; the admin listener only on the host's loopback."""
    intake = _services()["intake"]
    published = _published(intake)
    assert any(p.target == PUBLIC_PORT for p in published)
    admin = [p for p in published if p.target == ADMIN_PORT]
    assert admin, "the admin port is published for the host's own monitoring and PHP app"
    assert all(p.host_ip in LOOPBACK for p in admin), admin
    for name, service in _services().items():
        for port in _published(service):
            if port.target == ADMIN_PORT:
                assert port.host_ip in LOOPBACK, f"{name} publishes {ADMIN_PORT} beyond loopback"


def test_compose_passwords_come_from_secret_files() -> None:
    """Every password or secret variable names a mounted Docker secret, never a value."""
    top_level = _mapping(_compose()["secrets"])
    for name, service in _services().items():
        mounted = _secret_names(service)
        assert mounted <= set(top_level), f"{name} uses an undeclared secret"
        for key, value in _environment(service).items():
            if not re.search(r"PASSWORD|SECRET", key):
                continue
            if key.endswith("_FILE"):
                assert value.startswith("/run/secrets/"), f"{name}: {key}={value}"
                assert value.removeprefix("/run/secrets/") in mounted, f"{name}: {key}"
            else:
                # The orthancteam image's indirection: X_SECRET names the secret file of X.
                assert key.endswith("_SECRET"), f"{name}: {key} holds a secret in the clear"
                assert value in mounted, f"{name}: {key} names a secret it does not mount"
    for name, body in top_level.items():
        source = str(_mapping(body)["file"])
        assert source.startswith("./secrets/"), f"secret {name} comes from {source}"


def test_compose_orthanc_and_intake_share_one_password_file() -> None:
    """The intake's Orthanc password and Orthanc's registered user come from the same secret."""
    services = _services()
    orthanc_env = _environment(services["orthanc"])
    intake_env = _environment(services["intake"])
    user_secrets = {
        value
        for key, value in orthanc_env.items()
        if key.startswith("ORTHANC__REGISTERED_USERS__") and key.endswith("_SECRET")
    }
    assert len(user_secrets) == 1
    assert orthanc_env["ORTHANC__AUTHENTICATION_ENABLED"] == "true"
    password_file = intake_env["INTAKE_ORTHANC_PASSWORD_FILE"]
    assert password_file == "/run/secrets/" + user_secrets.pop()
    # The image names the user after the variable's last part, camel-cased
    # (QUERY_RETRIEVE_SIZE -> QueryRetrieveSize).
    user_key = next(k for k in orthanc_env if k.startswith("ORTHANC__REGISTERED_USERS__"))
    token = user_key.removeprefix("ORTHANC__REGISTERED_USERS__").removesuffix("_SECRET")
    user = "".join(word[0] + word[1:].lower() for word in token.split("_"))
    assert intake_env["INTAKE_ORTHANC_USERNAME"] == user


def test_compose_database_url_is_built_from_the_postgres_secret() -> None:
    """The URL names PostgreSQL's user, database and host; the password is read at each start."""
    services = _services()
    intake, postgres = services["intake"], services["postgres"]
    pg_env = _environment(postgres)
    assert "POSTGRES_PASSWORD" not in pg_env
    pg_secret = pg_env["POSTGRES_PASSWORD_FILE"].removeprefix("/run/secrets/")
    assert pg_secret in _secret_names(postgres)
    assert pg_secret in _secret_names(intake)
    # A placeholder that is not a URL: `docker compose exec` (no entrypoint) must fail
    # rather than use the image's SQLite default; and no credential sits in the file.
    placeholder = _environment(intake)["INTAKE_DATABASE_URL"]
    with pytest.raises(ArgumentError):
        make_url(placeholder)
    script = " ".join(_strings(intake["entrypoint"]))
    assert f"/run/secrets/{pg_secret}" in script
    assert "urllib.parse.quote" in script, "a password may hold URL-reserved characters"
    template = re.search(r'INTAKE_DATABASE_URL="([^"]+)"', script)
    assert template, "the entrypoint exports INTAKE_DATABASE_URL"
    url = make_url(template.group(1).replace("$${password}", "example"))
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "postgres"
    assert url.username == pg_env["POSTGRES_USER"]
    assert url.database == pg_env["POSTGRES_DB"]
    assert "exec orthanc-intake" in script, "the intake, not a shell, receives SIGTERM"
    assert _strings(intake["command"]) == ["serve"]


def test_compose_file_holds_no_credential_literal() -> None:
    """No user:password@ URL and no password-like variable with a literal value."""
    text = COMPOSE.read_text()
    for match in re.finditer(r"://[^\s/:@\"']+:([^\s/@\"']+)@", text):
        assert match.group(1).startswith("$"), f"a credential in a URL: {match.group(0)}"
    for key in ("POSTGRES_PASSWORD:", "INTAKE_ORTHANC_PASSWORD:", "INTAKE_WEBHOOK_SECRET:"):
        assert key not in text


def test_compose_services_have_healthchecks() -> None:
    """Every service has a health check; the intake waits for a healthy PostgreSQL."""
    services = _services()
    for name, service in services.items():
        check = _mapping(service.get("healthcheck"))
        assert not check.get("disable"), name
        assert _strings(check["test"]), name
    depends = _mapping(services["intake"]["depends_on"])
    assert _mapping(depends["postgres"])["condition"] == "service_healthy"
    intake_check = " ".join(_strings(_mapping(services["intake"]["healthcheck"])["test"]))
    assert f"127.0.0.1:{ADMIN_PORT}/healthz" in intake_check


def test_compose_keeps_state_on_named_volumes() -> None:
    """The intake's data, Orthanc's storage and PostgreSQL's data live on declared volumes."""
    services = _services()
    declared = set(_mapping(_compose()["volumes"]))
    expected = {
        "intake": "/data",
        "orthanc": "/var/lib/orthanc/db",
        "postgres": "/var/lib/postgresql/data",
    }
    for name, target in expected.items():
        mounts = dict(m.split(":", 1) for m in _strings(services[name]["volumes"]))
        sources = [source for source, dest in mounts.items() if dest.split(":")[0] == target]
        assert sources, f"{name} keeps nothing at {target}"
        assert sources[0] in declared, f"{name}: {sources[0]} is not a declared volume"


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python() -> None:
    """A builder stage and a final python:3.11-slim stage, each base image pinned by tag."""
    stages = _dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        image = stage[0].arguments.split()[0]
        name, _, tag = image.rpartition(":")
        assert name, image
        assert tag, f"unpinned: {image}"
        assert "/" not in tag, f"unpinned: {image}"
        assert tag != "latest", f"unpinned: {image}"
    final = stages[-1]
    assert final[0].arguments.split()[0].startswith("python:3.11-slim")
    builders = {s[0].arguments.split()[-1] for s in stages[:-1]}
    copied_from = {a.split()[0].removeprefix("--from=") for a in _all(final, "COPY")}
    assert builders & copied_from, "the final stage takes its environment from the builder"


def test_dockerfile_final_stage_runs_as_non_root() -> None:
    """The final stage's last USER is a fixed, non-root UID."""
    users = _all(_dockerfile_stages()[-1], "USER")
    assert users, "the final stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root")
    assert user.isdigit(), "a fixed numeric UID"
    assert int(user) >= 1000, "a UID outside the system range"


def test_dockerfile_final_stage_installs_no_compiler() -> None:
    """No compiler, build tools or development headers in the image that runs."""
    forbidden = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|[\w.+-]+-dev)\b")
    for command in _all(_dockerfile_stages()[-1], "RUN"):
        assert not forbidden.search(command), command


def test_dockerfile_installs_runtime_dependencies_only() -> None:
    """The project is installed without its test extras."""
    runs = " ".join(_all(_dockerfile_stages()[0], "RUN"))
    assert re.search(r"pip install (--editable|-e) \.(\s|$)", runs), runs
    assert "[test]" not in DOCKERFILE.read_text()


def test_dockerfile_ships_migrations_beside_the_package() -> None:
    """app/, alembic/ and alembic.ini land in one folder: app/db/migrations.py looks there."""
    builder = _dockerfile_stages()[0]
    workdir = ""
    destinations: dict[str, str] = {}
    for instruction in builder:
        if instruction.keyword == "WORKDIR":
            workdir = instruction.arguments
        if instruction.keyword == "COPY" and "--from" not in instruction.arguments:
            *sources, dest = instruction.arguments.split()
            for source in sources:
                target = dest if dest.startswith("/") else f"{workdir}/{dest}"
                folder = target.rstrip("/")
                if Path(folder).name == source:  # COPY app ./app
                    folder = str(Path(folder).parent)
                destinations[source] = str(Path(folder))
    for needed in ("app", "alembic", "alembic.ini", "pyproject.toml"):
        assert needed in destinations, f"{needed} is not copied into the image"
    assert destinations["alembic"] == destinations["app"] == destinations["alembic.ini"]
    final_copies = " ".join(_all(_dockerfile_stages()[-1], "COPY"))
    assert destinations["app"] in final_copies, "the source tree is copied into the final stage"


def test_dockerfile_health_check_calls_the_admin_liveness_route() -> None:
    """HEALTHCHECK runs valid Python against the admin listener's /healthz (no curl needed)."""
    checks = _all(_dockerfile_stages()[-1], "HEALTHCHECK")
    assert len(checks) == 1
    command = checks[0][checks[0].index("CMD") + 3 :].strip()
    argv = _exec_form(command)
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "<healthcheck>", "exec")
    assert "/healthz" in argv[2]
    assert "127.0.0.1" in argv[2]
    assert "INTAKE_ADMIN_PORT" in argv[2]


def test_dockerfile_declares_data_volume_ports_and_entrypoint() -> None:
    """VOLUME /data holds the database and spool; ENTRYPOINT orthanc-intake, CMD serve."""
    final = _dockerfile_stages()[-1]
    volumes = " ".join(_all(final, "VOLUME"))
    assert "/data" in volumes
    assert _exec_form(_all(final, "ENTRYPOINT")[-1]) == ["orthanc-intake"]
    assert _exec_form(_all(final, "CMD")[-1]) == ["serve"]
    exposed = {int(p) for a in _all(final, "EXPOSE") for p in a.split()}
    assert {PUBLIC_PORT, ADMIN_PORT} <= exposed
    env = " ".join(_all(final, "ENV"))
    assert "INTAKE_DATABASE_URL=sqlite:////data/" in env
    assert "INTAKE_SPOOL_DIR=/data/" in env


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    """Local environments, state, VCS data and secret files never reach the build context."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".git", ".venv", "var", "deploy/secrets"):
        assert needed in patterns, needed
    for kept in ("app", "alembic", "alembic.ini", "pyproject.toml", "README.md"):
        assert not any(fnmatch.fnmatch(kept, p) for p in patterns), f"{kept} is excluded"


# --------------------------------------------------------------------------- systemd


def test_unit_runs_serve_as_its_own_user_with_hardening() -> None:
    """A dedicated user, `orthanc-intake serve`, restarts on failure, and a tight sandbox."""
    unit = _unit()
    assert {"Unit", "Service", "Install"} <= set(unit)
    service = unit["Service"]

    def one(key: str) -> str:
        values = service.get(key, [])
        assert len(values) == 1, f"{key}= is expected once, found {values}"
        return values[0]

    assert one("User") not in ("", "root", "0")
    program, *arguments = one("ExecStart").split()
    assert Path(program).name == "orthanc-intake"
    assert program.startswith("/"), "an absolute path, as systemd wants"
    assert arguments == ["serve"]
    assert one("Restart") == "on-failure"
    assert _nginx_seconds(one("TimeoutStopSec")) > 0
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("PrivateTmp") == "yes"
    assert one("EnvironmentFile").startswith("/etc/orthanc-intake/")
    # `systemctl reload` loads a renewed certificate: SIGHUP to the main process only (the
    # validation workers would end on it); without TLS the intake logs it and carries on.
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_state_lives_under_its_writable_path() -> None:
    """The database and the spool are under ReadWritePaths, the only writable place."""
    service = _unit()["Service"]
    writable = [p for value in service["ReadWritePaths"] for p in value.split()]
    env = _unit_environment(service)
    database = make_url(env["INTAKE_DATABASE_URL"]).database
    assert database
    for path in (database, env["INTAKE_SPOOL_DIR"]):
        assert any(path.startswith(w.rstrip("/") + "/") for w in writable), path
    assert env.get("INTAKE_ADMIN_HOST", "127.0.0.1") in LOOPBACK


def test_unit_hands_the_orthanc_password_over_as_a_credential() -> None:
    """The password reaches the service as a systemd credential file, not a variable."""
    service = _unit()["Service"]
    credentials = dict(value.split(":", 1) for value in service["LoadCredential"])
    env = _unit_environment(service)
    assert "INTAKE_ORTHANC_PASSWORD" not in env
    name = env["INTAKE_ORTHANC_PASSWORD_FILE"].removeprefix("%d/")
    assert name in credentials
    assert credentials[name].startswith("/etc/orthanc-intake/")


# --------------------------------------------------------------------------- nginx


def test_nginx_streams_bodies_up_to_the_request_cap() -> None:
    """Bodies are streamed, not buffered, and capped no lower than MAX_REQUEST_BYTES."""
    server = _https_server()
    cap = _nginx_bytes(_single(server, "client_max_body_size")[0])
    assert cap >= int(DEFAULTS["max_request_bytes"].default)
    assert _single(server, "proxy_request_buffering") == ["off"]
    assert _single(server, "proxy_buffering") in (["on"], ["off"])
    idle = _nginx_seconds(_single(server, "client_body_timeout")[0])
    assert idle <= float(DEFAULTS["body_idle_timeout_seconds"].default)
    for timeout in ("client_header_timeout", "send_timeout", "proxy_read_timeout"):
        assert _nginx_seconds(_single(server, timeout)[0]) > 0


def test_nginx_never_reaches_the_admin_listener() -> None:
    """Requests go to the public port only; the admin port appears nowhere."""
    tree = _nginx()
    upstream_servers = [d.args[0] for d in _named(tree, "server") if d.block is None]
    assert upstream_servers
    assert all(s.endswith(f":{PUBLIC_PORT}") for s in upstream_servers), upstream_servers
    for directive in _walk(tree):
        assert not any(str(ADMIN_PORT) in arg for arg in directive.args), directive
    upstreams = {d.args[0] for d in _named(tree, "upstream")}
    for proxy in _named(tree, "proxy_pass"):
        assert proxy.args[0].removeprefix("http://") in upstreams, proxy.args


def test_nginx_proxies_exactly_the_public_routes() -> None:
    """Every public route is forwarded, every forwarded location is public, no admin route is."""
    settings = Settings()
    public_routes = list(create_public_app(settings).router.routes)
    admin_routes = list(create_admin_app(settings).router.routes)
    for modifier, location in _proxied_locations():
        sample = location + ("x" if modifier == "^~" else "")
        assert _served(public_routes, sample), f"nginx forwards {location}, not a public route"
        # Both listeners answer "/" (the front page; a pointer to the admin docs), and
        # nginx passes only to the public one: no admin route is reached through it.
        if location != "/":
            assert not _served(admin_routes, sample), f"{location} reaches an admin route"
    for router in (public.router, dicomweb.router, pages.router):
        for route in router.routes:
            assert isinstance(route, APIRoute)
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            assert _served(public_routes, path)
            assert _nginx_would_proxy(path), f"the public route {path} is not forwarded"
    for path in ("/healthz", "/readyz", "/metrics", "/api/uploads", "/docs", "/openapi.json"):
        assert _served(admin_routes, path)
        assert not _nginx_would_proxy(path), path


def test_nginx_forwarded_for_matches_the_trusted_proxies() -> None:
    """X-Forwarded-For is appended to, and the documented TRUSTED_PROXIES covers nginx."""
    server = _https_server()
    headers = {d.args[0].lower(): d.args[1] for d in server if d.name == "proxy_set_header"}
    assert headers["x-forwarded-for"] == "$proxy_add_x_forwarded_for"
    documented = re.search(r"INTAKE_TRUSTED_PROXIES=(\S+)", NGINX.read_text())
    assert documented, "the example says which TRUSTED_PROXIES goes with it"
    settings = Settings(trusted_proxies=documented.group(1).split(","))
    upstream_hosts = {
        d.args[0].rsplit(":", 1)[0] for d in _named(_nginx(), "server") if d.block is None
    }
    # nginx talks to a loopback upstream from the loopback address.
    assert upstream_hosts <= {"127.0.0.1"}
    assert any(n.startswith("127.0.0.1") for n in settings.trusted_proxies)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("path", [COMPOSE, DOCKERFILE, UNIT, NGINX, GUIDE], ids=lambda p: p.name)
def test_every_intake_variable_is_a_real_setting(path: Path) -> None:
    """Each INTAKE_* name in the deployment files is a setting (or a secret's _FILE form)."""
    known = {f"INTAKE_{name.upper()}" for name in Settings.model_fields} | SECRET_FILE_VARIABLES
    named = set(re.findall(r"\bINTAKE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert named, f"{path.name} names no setting"
    assert named <= known, f"not settings: {sorted(named - known)}"
