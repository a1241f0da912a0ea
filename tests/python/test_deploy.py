"""Static checks of the deployment files (no Docker engine or cluster here):
the Dockerfile, docker-compose.yml, the Kubernetes manifests and the Grafana
dashboard parse, reference files that exist, carry the required fields, and
query only metrics the server exports."""

import json
import pathlib
import re
import urllib.request

import torch
import yaml

from conftest import metrics_port

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_dockerfile_is_multi_stage_non_root_with_a_health_check():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
    assert stages == ["build", "runtime"]
    runtime = text.split(" AS runtime", 1)[1]
    user = re.search(r"^USER (\S+)", runtime, re.M)
    assert user and user.group(1) not in ("root", "0")
    assert re.search(r"^EXPOSE 50051 9464$", runtime, re.M)
    assert "HEALTHCHECK" in runtime and '"health"' in runtime
    assert re.search(r"^ARG CUDA=", text, re.M) and "LIBTORCH_URL" in text
    for source in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
        assert (ROOT / source).exists(), source
    # The image is built with the same set-up script as CI.
    assert "scripts/setup.sh" in text


def test_compose_file_parses_and_references_existing_files():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    default = {name for name, s in services.items() if "profiles" not in s}
    assert default == {"amalgamd", "prometheus", "grafana"}
    # The cluster profile: PostgreSQL and two replicas on its catalog and one
    # blob volume, each under its own replica name.
    cluster = {name for name, s in services.items() if s.get("profiles") == ["cluster"]}
    assert cluster == {"postgres", "amalgamd-1", "amalgamd-2"}
    for name in ("amalgamd-1", "amalgamd-2"):
        command = services[name]["command"]
        catalog = command[command.index("--catalog") + 1]
        assert catalog.startswith("postgresql://") and "@postgres:5432/" in catalog
        assert command[command.index("--replica-name") + 1] == name
        assert services[name]["volumes"][0].startswith("amalgam-cluster-blobs:")
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (ROOT / services["amalgamd"]["build"] / "Dockerfile").exists()
    named = set(compose.get("volumes", {}))
    ignored = (ROOT / ".gitignore").read_text().split()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source == "./deploy/compose/tokens":
                # The operator's own tokens: ignored by git, made from the example.
                assert "/deploy/compose/tokens" in ignored
                assert (ROOT / "deploy/compose/tokens.example").exists()
            elif source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source}"
            else:
                assert source in named, f"{name}: {source}"
        for dependency in service.get("depends_on", []):
            assert dependency in services
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["amalgamd:9464"]
    # Published on the host's loopback only: tokens travel without TLS.
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    assert "127.0.0.1:9464:9464" in services["amalgamd"]["ports"]
    assert "--allow-plaintext-tokens" in (ROOT / "Dockerfile").read_text()


def test_kubernetes_manifests_have_the_required_fields():
    documents = [d for f in sorted((ROOT / "deploy/k8s").glob("*.yaml"))
                 for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind = {}
    for d in documents:
        assert d["apiVersion"] and d["metadata"]["name"], d
        by_kind.setdefault(d["kind"], []).append(d)
    assert {"StatefulSet", "Service", "Secret", "ConfigMap", "ServiceMonitor"} <= set(by_kind)
    statefulset = by_kind["StatefulSet"][0]
    pod = statefulset["spec"]["template"]["spec"]
    container = pod["containers"][0]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    assert container["livenessProbe"]["grpc"]["port"] == 50051
    assert container["resources"]["requests"]["cpu"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in pod["volumes"]} | {"data"}
    assert mounts <= volumes
    assert any(a.startswith("--tokens=") for a in container["args"])
    service = by_kind["Service"][0]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {"grpc", "metrics"} <= port_names
    assert service["spec"]["selector"].items() <= labels.items()
    monitor = by_kind["ServiceMonitor"][0]
    assert monitor["spec"]["endpoints"][0]["port"] in port_names


def test_the_cluster_manifests_run_replicas_on_one_catalog_and_blob_volume():
    documents = [d for f in sorted((ROOT / "deploy/k8s/cluster").glob("*.yaml"))
                 for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind = {}
    for d in documents:
        assert d["apiVersion"] and d["metadata"]["name"], d
        by_kind.setdefault(d["kind"], []).append(d)
    assert {"Deployment", "StatefulSet", "PersistentVolumeClaim", "PodDisruptionBudget",
            "Service", "Secret"} <= set(by_kind)
    deployment = by_kind["Deployment"][0]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert "--catalog=$(CATALOG_URI)" in args and "--replica-name=$(POD_NAME)" in args
    env = {e["name"]: e["valueFrom"] for e in container["env"]}
    assert env["CATALOG_URI"]["secretKeyRef"]["name"] == "amalgamd-catalog"
    assert env["POD_NAME"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    claim = {v["name"]: v for v in pod["volumes"]}["blobs"]["persistentVolumeClaim"]
    pvc = {p["metadata"]["name"]: p for p in by_kind["PersistentVolumeClaim"]}
    assert pvc[claim["claimName"]]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod["terminationGracePeriodSeconds"] > 45  # past --drain-timeout
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budget = by_kind["PodDisruptionBudget"][0]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < budget["minAvailable"] < deployment["spec"]["replicas"]
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    assert services["amalgamd"]["spec"]["selector"].items() <= labels.items()
    postgres = by_kind["StatefulSet"][0]
    assert postgres["spec"]["template"]["spec"]["containers"][0]["image"].startswith("postgres:15")
    assert "amalgam-postgres" in services


def test_dashboard_queries_only_exported_metrics(client, session_server):
    # Activity first, so every family has samples.
    w = client.upload_weights({"w": torch.ones(2, 2)}, name="dashboard")
    client.merge([w, w], "average").wait()
    port = metrics_port(session_server[1])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families = dict(re.findall(r"^# TYPE (\w+) (\w+)$", text, re.M))
    exported = set(families)
    for name, kind in families.items():
        if kind == "histogram":
            exported |= {name + "_bucket", name + "_sum", name + "_count"}
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/amalgam.json").read_text())
    datasources = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids
        for target in panel["targets"]:
            queried |= set(re.findall(r"\bamalgam_\w+", target["expr"]))
    assert queried, "the dashboard queries nothing"
    assert queried <= exported, queried - exported
    # Every exported family is on the dashboard.
    missing = {f for f in families
               if not {f, f + "_bucket", f + "_sum", f + "_count"} & queried}
    assert not missing, missing
