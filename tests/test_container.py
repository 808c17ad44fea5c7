"""The container images (Dockerfile, Dockerfile.cpu), the KubeRay manifest (rayservice.yaml) and the
package agree: image names and versions, the entry point, ports, the Serve import path, the data folder.

Nothing is built or pulled: the Dockerfiles are read line by line (FROM, ARG, ENV, LABEL, COPY, RUN,
EXPOSE, USER, VOLUME, HEALTHCHECK, ENTRYPOINT, CMD) with their build arguments substituted, and what they
say is compared with pyproject.toml, constraints.txt, the `fisedit` CLI and the manifests."""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
CONFIGS = ROOT / "deployments" / "configs"
RAYSERVICE_PATH = CONFIGS / "rayservice.yaml"
FLAVORS = {"gpu": "Dockerfile", "cpu": "Dockerfile.cpu"}


# ---- reading a Dockerfile ---------------------------------------------------------------------------
@dataclass
class Dockerfile:
    path: Path
    header: str = ""  # the comment block before the first instruction
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments), expanded
    variables: dict[str, str] = field(default_factory=dict)  # ARG defaults and ENV values, last wins
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"{self.path.name} has no {keyword} instruction"
        return found[-1]

    def exec_form(self, keyword: str) -> list[str]:
        rest = self.last(keyword)
        assert rest.startswith("["), (
            f"{self.path.name}: {keyword} {rest} is in shell form; the exec form (a JSON list) lets the "
            "process get SIGTERM, on which `fisedit serve` stops Serve and Ray"
        )
        return json.loads(rest)

    @property
    def argv(self) -> list[str]:
        return self.exec_form("ENTRYPOINT") + self.exec_form("CMD")

    @property
    def exposed(self) -> set[int]:
        return {int(p.split("/")[0]) for rest in self.all("EXPOSE") for p in rest.split()}

    @property
    def base(self) -> str:
        return self.last("FROM").split()[0]


def _expand(text: str, variables: dict[str, str]) -> str:
    """${NAME} and $NAME replaced by the build arguments' defaults and ENV values; unknown names stay."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def _pairs(text: str) -> dict[str, str]:
    return dict(token.split("=", 1) for token in shlex.split(text))


def read_dockerfile(name: str) -> Dockerfile:
    path = ROOT / name
    assert path.exists(), f"{name} is missing at the repository root"
    df = Dockerfile(path)
    header, logical, pending = [], [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            if not logical and not pending:
                header.append(line.lstrip("#").strip())
            continue  # Docker drops comment lines, inside continued instructions too
        if not line and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append((pending + line).strip())
        pending = ""
    assert not pending, f"{name} ends inside a continued line"
    df.header = "\n".join(header)
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG":
            key, eq, default = rest.partition("=")
            if eq:  # an ARG repeated without a value inside the stage keeps the global default
                df.variables[key] = _expand(default.strip('"'), df.variables)
            df.instructions.append((keyword, rest))
            continue
        rest = _expand(rest, df.variables)
        if keyword == "ENV":
            values = _pairs(rest)
            df.env.update(values)
            df.variables.update(values)
        elif keyword == "LABEL":
            df.labels.update(_pairs(rest))
        df.instructions.append((keyword, rest))
    return df


@pytest.fixture(scope="module", params=sorted(FLAVORS))
def flavor(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def dockerfile(flavor) -> Dockerfile:
    return read_dockerfile(FLAVORS[flavor])


@pytest.fixture(scope="module")
def gpu_dockerfile() -> Dockerfile:
    return read_dockerfile(FLAVORS["gpu"])


# ---- what the package says ----------------------------------------------------------------------------
def image_name(flavor: str) -> str:
    """The image name scheme: fisedit-ray:<version of pyproject.toml>-<gpu|cpu>."""
    return f"{PROJECT['name']}:{PROJECT['version']}-{flavor}"


def serve_defaults() -> dict[str, int]:
    """The ports `fisedit serve` listens on unless told (its typer parameters' defaults)."""
    from fisedit_ray.cli import serve

    params = inspect.signature(serve).parameters
    defaults = {}
    for name in ("port", "metrics_port"):
        default = params[name].default
        default = getattr(default, "default", default)  # a `= typer.Option(8000)` default
        assert isinstance(default, int), f"fisedit serve --{name.replace('_', '-')} has no int default"
        defaults[name] = default
    return defaults


def ray_ports() -> dict[str, int]:
    """Ray's own defaults, where a `ray start --head` (KubeRay's command) puts the GCS and dashboard."""
    from ray._private import ray_constants

    return {"gcs-server": ray_constants.DEFAULT_PORT, "dashboard": ray_constants.DEFAULT_DASHBOARD_PORT}


def parse_serve_command(argv: list[str]):
    """The click context `fisedit <argv[1:]>` would run with: its command's name and its parameters."""
    import typer

    scripts = PROJECT.get("scripts", {})
    assert argv and argv[0] in scripts, (
        f"the image runs {argv[:1]}, which is not a console script of pyproject.toml {sorted(scripts)}"
    )
    module, _, attr = scripts[argv[0]].partition(":")
    app = getattr(importlib.import_module(module), attr)
    assert isinstance(app, typer.Typer), f"{scripts[argv[0]]} is not a typer app"
    names = {info.name or info.callback.__name__.replace("_", "-") for info in app.registered_commands}
    assert len(argv) > 1 and argv[1] in names, (
        f"the image runs `{' '.join(argv)}`, but {argv[0]} has no command {argv[1:2]} "
        f"(it has {sorted(names)})"
    )
    command = typer.main.get_command(app).commands[argv[1]]
    return argv[1], command.make_context(argv[1], list(argv[2:])).params  # raises on an unknown option


def rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE_PATH.read_text())


def cluster_containers(manifest: dict) -> list[tuple[str, dict, dict]]:
    """(group, rayStartParams, container) for the head and every worker group's Ray container."""
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    found = []
    for name, group in groups:
        containers = group["template"]["spec"]["containers"]
        assert containers, f"rayservice.yaml: group {name} has no containers"
        found.append((name, group.get("rayStartParams", {}), containers[0]))  # KubeRay's Ray container
    return found


def serve_configs() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        if config.get("kind") == "RayService":
            config = yaml.safe_load(config["spec"]["serveConfigV2"])
        found.append((path.name, config))
    return found


# ---- image names and versions -------------------------------------------------------------------------
def test_dockerfiles_say_their_image_name_with_the_package_version(flavor, dockerfile):
    name, version, expected = PROJECT["name"], PROJECT["version"], image_name(flavor)
    where = dockerfile.path.name
    assert f"Image: {expected}" in dockerfile.header, (
        f"{where}'s header comment does not name the image {expected} (package {name} {version})"
    )
    build = f"docker build -t {expected} -f {where} ."
    assert build in dockerfile.header, f"{where}'s header comment does not document `{build}`"
    labels = dockerfile.labels
    assert labels.get("org.opencontainers.image.title") == name, (
        f"{where}: LABEL org.opencontainers.image.title is {labels.get('org.opencontainers.image.title')!r}, "
        f"the package is {name!r}"
    )
    assert labels.get("org.opencontainers.image.version") == version, (
        f"{where}: LABEL org.opencontainers.image.version is "
        f"{labels.get('org.opencontainers.image.version')!r}, pyproject.toml says {version!r}"
    )
    assert labels.get("io.fisedit.image") == expected, (
        f"{where}: LABEL io.fisedit.image is {labels.get('io.fisedit.image')!r}, expected {expected!r}"
    )


def test_rayservice_names_the_gpu_image_for_head_and_workers():
    expected = image_name("gpu")
    for group, _, container in cluster_containers(rayservice()):
        image = container.get("image", "")
        # a registry in front (REGISTRY/fisedit-ray:0.1.0-gpu) is where the cluster pulls it from
        assert image.rsplit("/", 1)[-1] == expected, (
            f"rayservice.yaml: the {group} container runs image {image!r}, but Dockerfile builds "
            f"{expected} (package {PROJECT['name']} {PROJECT['version']})"
        )
    text = RAYSERVICE_PATH.read_text()
    build = f"docker build -t {expected} -f {FLAVORS['gpu']} ."
    assert build in text, f"rayservice.yaml's comments do not document how to build its image: `{build}`"
    assert f"docker push REGISTRY/{expected}" in text, (
        f"rayservice.yaml's comments do not document pushing {expected} to the cluster's registry"
    )


def test_ray_and_python_versions_agree():
    gpu, cpu = read_dockerfile(FLAVORS["gpu"]), read_dockerfile(FLAVORS["cpu"])
    ray_spec = next(
        Requirement(r) for r in PROJECT["optional-dependencies"]["serve"] if Requirement(r).name == "ray"
    ).specifier
    cluster_ray = str(rayservice()["spec"]["rayClusterConfig"]["rayVersion"])
    for df in (gpu, cpu):
        ray_version = df.variables.get("RAY_VERSION")
        assert ray_version == cluster_ray, (
            f"{df.path.name} installs Ray {ray_version}, rayservice.yaml's rayVersion is {cluster_ray}"
        )
        assert ray_version in ray_spec, (
            f"{df.path.name}'s Ray {ray_version} is outside pyproject.toml's ray{ray_spec} (serve extra)"
        )
        assert f'"ray[serve,data]=={ray_version}"' in " ".join(df.all("RUN")), (
            f"{df.path.name} does not pin ray[serve,data]=={ray_version} where it installs the package"
        )
    match = re.fullmatch(r"rayproject/ray:([\w.]+)-py(\d)(\d+)-(cu\d+)", gpu.base)
    assert match, (
        f"Dockerfile's base {gpu.base!r} is not a Ray CUDA image rayproject/ray:<ray>-py<py>-cu<cuda>"
    )
    assert match[1] == cluster_ray, (
        f"Dockerfile's base {gpu.base} is Ray {match[1]}, the cluster {cluster_ray}"
    )
    gpu_python = f"{match[2]}.{match[3]}"
    cpu_match = re.fullmatch(r"python:(\d+\.\d+)-slim", cpu.base)
    assert cpu_match, f"Dockerfile.cpu's base {cpu.base!r} is not python:<version>-slim"
    assert cpu_match[1] == gpu_python, (
        f"the CPU image runs Python {cpu_match[1]}, the GPU image {gpu_python}: one cluster, one Python"
    )
    requires = SpecifierSet(PROJECT["requires-python"])
    assert f"{gpu_python}.0" in requires, f"Python {gpu_python} is outside requires-python {requires}"


def test_torch_is_the_tested_version_in_the_right_build(flavor, dockerfile):
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    )
    where, version = dockerfile.path.name, dockerfile.variables.get("TORCH_VERSION")
    assert version == pins.get("torch"), (
        f"{where} installs torch {version}, constraints.txt pins {pins.get('torch')} (the tested version)"
    )
    index = dockerfile.variables.get("TORCH_INDEX", "")
    if flavor == "cpu":
        assert index.endswith("/whl/cpu"), f"{where} takes torch from {index!r}, not PyTorch's CPU index"
    else:
        cuda = dockerfile.variables.get("CUDA")
        assert dockerfile.base.endswith(f"-{cuda}"), f"{where}: base {dockerfile.base} is not CUDA {cuda}"
        assert index.endswith(f"/whl/{cuda}"), (
            f"{where} takes torch from {index!r}, not PyTorch's index for the base's CUDA ({cuda})"
        )
    installs = [r for r in dockerfile.all("RUN") if f'"torch=={version}"' in r and index in r]
    assert installs, f"{where} has no RUN that installs torch=={version} from {index}"


# ---- entry point, ports, health -----------------------------------------------------------------------
def test_the_image_runs_fisedit_serve_on_all_interfaces(dockerfile):
    command, params = parse_serve_command(dockerfile.argv)
    assert command == "serve", f"{dockerfile.path.name} runs `fisedit {command}`, not `fisedit serve`"
    assert params["host"] == "0.0.0.0", (
        f"{dockerfile.path.name}: `fisedit serve` listens on {params['host']}, unreachable from outside "
        "the container; pass --host 0.0.0.0"
    )


def test_exposed_ports_are_the_ones_the_package_uses(dockerfile):
    defaults = serve_defaults()
    _, params = parse_serve_command(dockerfile.argv)
    for name, default in defaults.items():
        assert params[name] == default, (
            f"{dockerfile.path.name} runs `fisedit serve` with {name}={params[name]}, its default (which "
            f"rayservice.yaml uses) is {default}"
        )
    wanted = {defaults["port"], defaults["metrics_port"], *ray_ports().values()}
    assert dockerfile.exposed == wanted, (
        f"{dockerfile.path.name} EXPOSEs {sorted(dockerfile.exposed)}, the package uses {sorted(wanted)} "
        f"(Serve HTTP, metrics from `fisedit serve`; GCS and dashboard from Ray: {ray_ports()})"
    )


def test_healthcheck_asks_the_ingress_healthz(dockerfile):
    from fisedit_ray.deployments.ingress import api

    # Serve moves the class's routes onto a router of their own: its OpenAPI schema lists them all
    paths = api.openapi()["paths"]
    assert "get" in paths.get("/healthz", {}), f"the ingress has no GET /healthz route ({sorted(paths)})"
    check = dockerfile.last("HEALTHCHECK")
    port = serve_defaults()["port"]
    assert re.search(rf"(127\.0\.0\.1|localhost):{port}/healthz", check), (
        f"{dockerfile.path.name}'s HEALTHCHECK does not ask http://127.0.0.1:{port}/healthz: {check}"
    )


def test_rayservice_ports_are_the_ones_the_package_uses(gpu_dockerfile):
    manifest, defaults = rayservice(), serve_defaults()
    http = yaml.safe_load(manifest["spec"]["serveConfigV2"]).get("http_options", {})
    assert http.get("port") == defaults["port"], (
        f"rayservice.yaml serves HTTP on {http.get('port')}, `fisedit serve` on {defaults['port']}"
    )
    assert http.get("host") == "0.0.0.0", f"rayservice.yaml's Serve proxies listen on {http.get('host')}"
    by_name = {"serve": defaults["port"], "metrics": defaults["metrics_port"]}
    for group, params, container in cluster_containers(manifest):
        metrics = params.get("metrics-export-port")
        assert metrics is not None and int(metrics) == defaults["metrics_port"], (
            f"rayservice.yaml: {group}'s metrics-export-port is {metrics}, `fisedit serve` exports metrics "
            f"on {defaults['metrics_port']}"
        )
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        wanted = {**by_name, **ray_ports()} if group == "head" else by_name
        for name, port in wanted.items():
            assert ports.get(name) == port, (
                f"rayservice.yaml: the {group} container's port {name!r} is {ports.get(name)}, the package "
                f"uses {port}"
            )
        unexposed = set(ports.values()) - gpu_dockerfile.exposed
        assert not unexposed, (
            f"rayservice.yaml: the {group} container opens {sorted(unexposed)}, which Dockerfile does not "
            f"EXPOSE ({sorted(gpu_dockerfile.exposed)})"
        )


# ---- the app and what the images install --------------------------------------------------------------
@pytest.mark.parametrize("name, config", serve_configs(), ids=[name for name, _ in serve_configs()])
def test_serve_import_paths_resolve_in_the_package(name, config):
    packages = PYPROJECT["tool"]["setuptools"]["packages"]
    for app in config["applications"]:
        path = app["import_path"]
        module, _, attr = path.partition(":")
        assert module in packages or module.rpartition(".")[0] in packages, (
            f"{name}: import_path {path} is not in a package that pyproject.toml ships ({packages})"
        )
        target = getattr(importlib.import_module(module), attr, None)
        assert callable(target), f"{name}: import_path {path} names nothing callable in the package"


def test_images_install_the_package_with_the_serve_extra(dockerfile):
    where = dockerfile.path.name
    copied = set()
    for rest in dockerfile.all("COPY"):
        tokens = [t for t in shlex.split(rest) if not t.startswith("--")]
        copied.update(t.rstrip("/") for t in tokens[:-1])
    setuptools = PYPROJECT["tool"]["setuptools"]
    package_dirs = setuptools.get("package-dir", {})
    needed = {"pyproject.toml", PROJECT["readme"]}
    needed |= {package_dirs.get(p, p.split(".")[0]) for p in setuptools["packages"]}
    assert needed <= copied, f"{where} does not COPY {sorted(needed - copied)}, which the package build reads"
    ignored = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    for path in needed:
        hit = [p for p in ignored if fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/"))]
        assert not hit, f".dockerignore's {hit} leaves {path} out of the build context, which {where} copies"
    installs = [r for r in dockerfile.all("RUN") if "pip install" in r and re.search(r"\[serve[\],]", r)]
    assert installs, f"{where} does not pip install the package with its serve extra (fisedit-ray[serve])"


def test_the_gpu_image_reaches_the_manifest_blob_store(gpu_dockerfile):
    (app,) = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])["applications"]
    scheme = str(app["args"].get("blob_url", "")).partition("://")[0]
    needs = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(scheme)
    if needs:
        runs = " ".join(gpu_dockerfile.all("RUN")).split()
        assert needs in runs, (
            f"rayservice.yaml keeps blobs at {app['args']['blob_url']}, which needs {needs}; Dockerfile "
            "does not install it"
        )


def test_data_folder_is_the_one_the_package_reads(dockerfile, monkeypatch):
    from fisedit_ray.deployments.app import default_data_dir

    where = dockerfile.path.name
    data = dockerfile.env.get("FISEDIT_DATA")
    assert data, f"{where} sets no ENV FISEDIT_DATA (where `fisedit serve` keeps sessions)"
    monkeypatch.setenv("FISEDIT_DATA", data)
    assert default_data_dir() == Path(data), "the package does not take its data folder from $FISEDIT_DATA"
    volumes = set()
    for rest in dockerfile.all("VOLUME"):
        volumes.update(json.loads(rest) if rest.startswith("[") else rest.split())
    assert data in volumes, f"{where}: the data folder {data} is not a VOLUME ({sorted(volumes)})"


def test_the_image_runs_as_a_user_other_than_root(dockerfile):
    user = dockerfile.last("USER").split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile.path.name} runs as {user}"
