"""Helpers of scripts/ops-check.sh (run with the venv's Python: PyYAML comes with schemathesis).

  ops_kit.py compose              cross-file checks of deploy/ (no Docker engine needed)
  ops_kit.py listening FILE       wait for the gateway's listening line, print "HTTP ADMIN"
  ops_kit.py traffic HTTP ADMIN   send a little of everything so the scrape has labelled series
"""

import hashlib
import hmac
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def fail(msg):
    print(f"ops_kit: {msg}", file=sys.stderr)
    sys.exit(1)


def compose():
    """`docker compose config` needs the compose plugin, which CI has not: check what matters."""
    import yaml

    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc.get("services") or fail("compose.yaml: no services")
    for name in ("kafka", "switchboard", "prometheus", "grafana"):
        if name not in services:
            fail(f"compose.yaml: no {name} service")
    declared_volumes = set((doc.get("volumes") or {}).keys())
    for name, svc in services.items():
        if not ("image" in svc or "build" in svc):
            fail(f"compose.yaml: {name} has neither image nor build")
        image = svc.get("image", "")
        if "build" not in svc and (":" not in image or image.endswith(":latest")):
            fail(f"compose.yaml: {name} image {image!r} needs a pinned tag")
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            if dep not in services:
                fail(f"compose.yaml: {name} depends on unknown service {dep}")
        for mount in svc.get("volumes") or []:
            src = mount.split(":")[0]
            if src.startswith("."):
                if not (DEPLOY / src).exists():
                    fail(f"compose.yaml: {name} mounts {src}, which does not exist")
            elif src not in declared_volumes:
                fail(f"compose.yaml: {name} mounts undeclared volume {src}")
        for port in svc.get("ports") or []:
            if not str(port).startswith("127.0.0.1:"):
                fail(f"compose.yaml: {name} publishes {port} beyond loopback")

    sb = services["switchboard"]
    build = sb["build"]
    if not (DEPLOY / build["context"] / build.get("dockerfile", "Dockerfile")).exists():
        fail("compose.yaml: switchboard's Dockerfile is not where build points")
    env = sb.get("environment") or {}
    for key in ("SWITCHBOARD_HTTP__LISTEN", "SWITCHBOARD_ADMIN__LISTEN"):
        if not str(env.get(key, "")).startswith("0.0.0.0:"):
            fail(f"compose.yaml: switchboard must set {key}=0.0.0.0:<port> (reachable from the network)")
    admin_port = env["SWITCHBOARD_ADMIN__LISTEN"].split(":")[1]

    # Kafka: the advertised listener is what the gateway is told to use.
    kenv = services["kafka"]["environment"]
    advertised = kenv["KAFKA_ADVERTISED_LISTENERS"].split("//")[1]
    if env.get("SWITCHBOARD_KAFKA__BROKERS") != advertised:
        fail(f"compose.yaml: SWITCHBOARD_KAFKA__BROKERS should be {advertised}")

    # Prometheus scrapes the gateway's admin port and loads the alert rules it mounts.
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = [t for sc in prom["scrape_configs"] if sc["job_name"] == "switchboard"
               for s in sc["static_configs"] for t in s["targets"]]
    if targets != [f"switchboard:{admin_port}"]:
        fail(f"prometheus.yml: the switchboard job should scrape switchboard:{admin_port}, not {targets}")
    mounted = {m.split(":")[1] for m in services["prometheus"]["volumes"] if m.startswith(".")}
    for rule_file in prom["rule_files"]:
        if f"/etc/prometheus/{rule_file}" not in mounted:
            fail(f"compose.yaml: prometheus does not mount {rule_file}")

    # Grafana: the datasource points at the prometheus service, with the uid the dashboard uses.
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    source = ds["datasources"][0]
    if source["url"] != "http://prometheus:9090":
        fail("grafana datasource: url should be http://prometheus:9090")
    dash = json.loads((DEPLOY / "grafana/switchboard.json").read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    if uids != {source["uid"]}:
        fail(f"dashboard datasource uids {uids} differ from the provisioned {source['uid']}")
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/switchboard.yaml").read_text())
    path = prov["providers"][0]["options"]["path"]
    gmounts = {m.split(":")[1] for m in services["grafana"]["volumes"] if m.startswith(".")}
    if f"{path}/switchboard.json" not in gmounts:
        fail(f"compose.yaml: grafana does not mount the dashboard under {path}")
    print("compose kit: consistent (services, mounts, ports, brokers, scrape target, datasource)")


def listening(path):
    deadline = time.time() + 60
    while time.time() < deadline:
        for line in Path(path).read_text().splitlines():
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if v.get("event") == "listening":
                print(v["http"], v["admin"])
                return
        time.sleep(0.1)
    fail("the gateway did not print its listening line within 60 s")


def request(url, body=None, headers=None, method=None):
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def signed_event(http, secret, body):
    ts = str(int(time.time()))
    sig = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return request(
        f"http://{http}/v1/events",
        body,
        {"content-type": "application/json", "x-switchboard-timestamp": ts,
         "x-switchboard-signature": f"v1={sig}"},
    )


def traffic(http, admin, secret):
    """A few records (a histogram of sink latency), a duplicate, and some rejections."""
    run = str(int(time.time() * 1000))
    for i in range(3):
        body = json.dumps({"event_id": f"ops-{run}-{i}", "customer": {"phone": f"1380013{i:04d}"},
                           "text": "家里宽带从昨晚开始断网 broadband down"}).encode()
        status, _ = signed_event(http, secret, body)
        if status != 202:
            fail(f"a signed event answered {status}")
    status, answer = signed_event(http, secret, body)
    if status != 202 or not json.loads(answer).get("duplicate"):
        fail(f"a resent event answered {status} {answer!r}, not a duplicate")
    statuses = [
        request(f"http://{http}/v1/events", b"{}", {"content-type": "application/json"})[0],
        request(f"http://{http}/v1/events", b"x", {"content-type": "text/plain"})[0],
        request(f"http://{http}/nowhere")[0],
    ]
    if statuses != [401, 415, 404]:
        fail(f"rejections answered {statuses}")
    status, _ = request(f"http://{admin}/readyz")
    if status != 200:
        fail(f"/readyz answered {status}")


def main(argv):
    if argv[:1] == ["compose"]:
        compose()
    elif argv[:1] == ["listening"] and len(argv) == 2:
        listening(argv[1])
    elif argv[:1] == ["traffic"] and len(argv) == 4:
        traffic(*argv[1:])
    else:
        fail(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
