"""The deployment files are checked offline: no Docker engine, no cluster, no network.

- docker-compose.yml against the compose-spec JSON schema (``check-jsonschema
  --builtin-schema vendor.compose-spec``), plus what the schema cannot say (healthchecks
  behind every ``service_healthy``, KRaft, worker replicas, loopback-only ports);
- the Prometheus config and its rules with ``promtool check config``;
- the Kubernetes manifests against the Kubernetes JSON schemas shipped in the
  ``kubernetes-validate`` wheel (strict: unknown fields fail), plus probes, HPA targets,
  Service selectors and the ConfigMap's streamlearn.toml loaded as real settings;
- the Dockerfile: multi-stage, installs wheels offline, runs as a numeric non-root user.

Each tool check skips with its reason only when the tool is not installed
(``make test`` installs promtool; the dev extra brings the Python ones).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
K8S = ROOT / "deploy" / "kubernetes"
#: Oldest Kubernetes minor the manifests promise to fit (autoscaling/v2 is GA since 1.23).
K8S_VERSION = "1.28.0"


def _tool(name: str) -> str | None:
    """An executable next to this interpreter (the venv) or on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    tool = _tool("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[dev]')")
    return subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60)


# -- docker compose ------------------------------------------------------------


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = _check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_refuses_a_broken_file(tmp_path: Path) -> None:
    # The check above can fail: an unknown depends_on condition is refused.
    doc = _compose()
    doc["services"]["api"]["depends_on"]["kafka"]["condition"] = "service_ready"
    broken = tmp_path / "compose.yml"
    broken.write_text(yaml.safe_dump(doc))
    result = _check_compose(broken)
    assert result.returncode != 0
    assert "service_ready" in result.stdout + result.stderr


def test_compose_services_kafka_kraft_workers_api_prometheus() -> None:
    services = _compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    replicas = str(services["worker"]["deploy"]["replicas"])
    assert re.fullmatch(r"\$\{WORKER_REPLICAS:-[2-9]\d*\}|[2-9]\d*", replicas), replicas
    for name in ("worker", "api"):
        assert services[name]["environment"]["STREAMLEARN_KAFKA__BOOTSTRAP"] == "kafka:9092"
    assert services["prometheus"]["image"].startswith("prom/prometheus:")


def test_compose_healthy_conditions_point_at_healthchecks() -> None:
    services = _compose()["services"]
    conditions = 0
    for name, service in services.items():
        for dep, rule in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if isinstance(rule, dict) and rule.get("condition") == "service_healthy":
                conditions += 1
                assert "healthcheck" in services[dep], f"{name} waits on {dep}, which has none"
    assert conditions >= 3
    assert services["api"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["prometheus"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])


def test_compose_ports_bind_loopback_and_config_files_exist() -> None:
    doc = _compose()
    for name, service in doc["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    for name, config in doc["configs"].items():
        assert (ROOT / config["file"]).is_file(), f"config {name}: {config['file']} is missing"
    assert (ROOT / doc["configs"]["prometheus"]["file"]).resolve() == PROMETHEUS


# -- prometheus ----------------------------------------------------------------


def _promtool(path: Path) -> subprocess.CompletedProcess[str]:
    tool = _tool("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (make test installs Debian's prometheus package)")
    return subprocess.run([tool, "check", "config", str(path)], capture_output=True, text=True,
                          timeout=60)


def test_prometheus_config_passes_promtool() -> None:
    result = _promtool(PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rules found" in result.stdout + result.stderr  # the rule file was read too


def test_promtool_refuses_a_broken_config(tmp_path: Path) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    config["scrape_configs"][0]["scrape_interval"] = "five seconds"
    config["rule_files"] = []
    broken = tmp_path / "prometheus.yml"
    broken.write_text(yaml.safe_dump(config))
    assert _promtool(broken).returncode != 0


# -- kubernetes ----------------------------------------------------------------


def _k8s_validate(doc: dict[str, Any]) -> None:
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate is not installed (dev extra)")
    kv.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_manifests_match_the_kubernetes_schemas() -> None:
    docs = _k8s_docs()
    kinds = sorted(doc["kind"] for _, doc in docs)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler",
                     "HorizontalPodAutoscaler", "Service"]
    for name, doc in docs:
        try:
            _k8s_validate(doc)
        except Exception as exc:  # noqa: BLE001 - name the file and object in the failure
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc}")


def test_kubernetes_validation_refuses_a_broken_manifest() -> None:
    deployment = next(doc for _, doc in _k8s_docs() if doc["kind"] == "Deployment")
    kv = pytest.importorskip("kubernetes_validate")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}  # a typo
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in _k8s_docs() if doc["kind"] == kind}


def test_kubernetes_api_probes_service_and_hpa_fit_together() -> None:
    deployments = _by_kind("Deployment")
    api = deployments["streamlearn-api"]["spec"]
    container = api["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = _by_kind("Service")["streamlearn-api"]["spec"]
    labels = api["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert api["selector"]["matchLabels"].items() <= labels.items()
    assert service["ports"][0]["targetPort"] in port_names
    for hpa in _by_kind("HorizontalPodAutoscaler").values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu"}
        # A CPU utilization target needs a CPU request on the pods it scales.
        scaled = deployments[target["name"]]["spec"]["template"]["spec"]["containers"][0]
        assert "cpu" in scaled["resources"]["requests"]


def test_kubernetes_pods_run_as_non_root_read_only() -> None:
    for name, deployment in _by_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts and container["workingDir"] == "/tmp", name


def test_kubernetes_configmap_is_a_valid_streamlearn_config(tmp_path: Path) -> None:
    from streamlearn.settings import load_settings

    text = _by_kind("ConfigMap")["streamlearn-config"]["data"]["streamlearn.toml"]
    path = tmp_path / "streamlearn.toml"
    path.write_text(text)
    settings = load_settings(path)
    assert [s.name for s in settings.specs] == ["fraud"]
    hpa = _by_kind("HorizontalPodAutoscaler")["streamlearn-worker"]
    # Workers past the partition count would idle in the consumer group.
    assert hpa["spec"]["maxReplicas"] <= settings.kafka.partitions
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert tomllib.loads(text)["api"]["host"] == "0.0.0.0"


# -- image ---------------------------------------------------------------------


def _stages() -> list[list[str]]:
    """Dockerfile instructions per stage (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_non_root_and_installs_the_wheel() -> None:
    stages = _stages()
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert any("pip wheel" in line for line in build)
    installs = [line for line in final if line.upper().startswith("RUN") and "pip install" in line]
    assert installs and all("--no-index" in line for line in installs), installs
    # The final stage takes wheels from the build stage, never the source tree.
    copies = [line for line in final if line.upper().startswith("COPY")]
    assert any("--from=build" in line for line in copies)
    for line in copies:
        assert not re.search(r"\b(streamlearn|services|kernels)\s+\S", line.split("--from")[0]
                             .replace("streamlearn.toml", "")), line
    users = [line.split(None, 1)[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000  # numeric: runAsNonRoot can check it
    pods = _by_kind("Deployment").values()
    assert all(d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
               for d in pods)
