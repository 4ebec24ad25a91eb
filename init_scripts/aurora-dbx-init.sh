#!/usr/bin/env bash
# aurora-dbx-init.sh: cluster-scoped init script for aurora_dbx (see docs/DATABRICKS.md).
#
# Runs on every node (driver and executors) before Spark starts, as root. It:
#   1. installs a pinned aurora_dbx wheel into the Databricks Python environment
#      (/databricks/python/bin/pip; pyspark and mlflow are not dependencies and stay as they are);
#   2. installs the Amazon RDS CA bundle at /etc/ssl/certs/rds-global-bundle.pem, the path
#      aurora_dbx verifies Aurora's TLS certificate with (aurora_dbx.engines.DEFAULT_CA_BUNDLE);
#   3. on the driver, points the Spark conf spark.aurora_dbx.policy at the admin's access policy
#      (/databricks/driver/conf/00-aurora-dbx.conf);
#   4. optionally (dedicated and job clusters only), makes the node's instance profile assume a
#      base IAM role for every boto3 client on the cluster (AWS_CONFIG_FILE with
#      credential_source = Ec2InstanceMetadata), so `credentials.source: instance_profile`
#      starts from that role.
#
# Safe to run twice: every step compares before it writes and skips what is already done.
# Logs what it did, never a secret (it reads none: no token, no key, no password).
#
# Settings (environment variables; on clusters whose init scripts cannot see custom
# environment variables, e.g. standard access mode on recent runtimes, edit the defaults below
# in the copy you upload to the volume):
#   AURORA_DBX_WHEEL          /Volumes/.../aurora_dbx-X.Y.Z-py3-none-any.whl, or a pinned
#                             requirement aurora-dbx==X.Y.Z (private index); empty: skip step 1
#   AURORA_DBX_WHEEL_SHA256   expected sha256 of the wheel file (optional, recommended)
#   AURORA_DBX_RDS_CA_SOURCE  the RDS CA bundle (global-bundle.pem) in a volume; empty: skip
#   AURORA_DBX_RDS_CA_URL     download it instead (https only), e.g.
#                             https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem
#   AURORA_DBX_POLICY_PATH    the access policy (/Volumes/... or /Workspace/...); empty: skip
#   AURORA_DBX_BASE_ROLE_ARN  optional: base IAM role for the cluster (step 4)
#   AURORA_DBX_PIP            pip to use (default /databricks/python/bin/pip)
#   AURORA_DBX_INIT_ROOT      sandbox prefix for every path (tests and dry runs; default empty)
set -euo pipefail
umask 022

DEFAULT_WHEEL="/Volumes/main/aurora_dbx/artifacts/aurora_dbx-0.1.0-py3-none-any.whl"
DEFAULT_RDS_CA_SOURCE="/Volumes/main/aurora_dbx/artifacts/rds-global-bundle.pem"
DEFAULT_POLICY_PATH="/Volumes/main/aurora_dbx/policy/policy.yaml"

CA_TARGET="/etc/ssl/certs/rds-global-bundle.pem"
POLICY_CONF="/databricks/driver/conf/00-aurora-dbx.conf"
STATE_DIR="/databricks/aurora_dbx"
SPARK_ENV="/databricks/spark/conf/spark-env.sh"
BLOCK_BEGIN="# >>> aurora-dbx >>>"
BLOCK_END="# <<< aurora-dbx <<<"

ROOT="${AURORA_DBX_INIT_ROOT:-}"
ROOT="${ROOT%/}"
WHEEL="${AURORA_DBX_WHEEL-$DEFAULT_WHEEL}"
WHEEL_SHA256="${AURORA_DBX_WHEEL_SHA256:-}"
CA_SOURCE="${AURORA_DBX_RDS_CA_SOURCE-$DEFAULT_RDS_CA_SOURCE}"
CA_URL="${AURORA_DBX_RDS_CA_URL:-}"
POLICY_PATH="${AURORA_DBX_POLICY_PATH-$DEFAULT_POLICY_PATH}"
BASE_ROLE_ARN="${AURORA_DBX_BASE_ROLE_ARN:-}"
CLUSTER_ID="${DB_CLUSTER_ID:-}"

is_driver=false
node="executor"
case "${DB_IS_DRIVER:-}" in
  [Tt][Rr][Uu][Ee]) is_driver=true; node="driver" ;;
esac

log() { printf '%s aurora-dbx-init[%s %s]: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${CLUSTER_ID:-sandbox}" "$node" "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }

# The real path of an absolute path: inside the sandbox when AURORA_DBX_INIT_ROOT is set.
at() { printf '%s%s' "$ROOT" "$1"; }

# Write stdin to $1 atomically (same directory, then rename) unless it already has that content;
# a new file gets mode $2, an existing one keeps its mode. Prints "unchanged" or "written".
write_if_changed() {
  local target="$1" mode="$2" tmp
  mkdir -p "$(dirname "$target")"
  tmp="$(mktemp "$(dirname "$target")/.aurora-dbx.XXXXXX")"
  cat > "$tmp"
  if [[ -f "$target" ]] && cmp -s "$tmp" "$target"; then
    rm -f "$tmp"
    echo unchanged
  else
    if [[ -e "$target" ]]; then chmod --reference="$target" "$tmp"; else chmod "$mode" "$tmp"; fi
    mv -f "$tmp" "$target"
    echo written
  fi
}

if [[ -z "$ROOT" && -z "$CLUSTER_ID" ]]; then
  die "not on a Databricks node (DB_CLUSTER_ID is unset): set AURORA_DBX_INIT_ROOT=/some/dir to try it in a sandbox"
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
log "starting (job cluster: ${DB_IS_JOB_CLUSTER:-unknown}${ROOT:+, sandbox $ROOT})"

# -- 1. the aurora_dbx wheel ---------------------------------------------------------------

install_wheel() {
  if [[ -z "$WHEEL" ]]; then
    log "wheel: skipped (AURORA_DBX_WHEEL is empty; install aurora_dbx as a cluster or job library)"
    return
  fi
  local pip spec want stamp file sum
  pip="${AURORA_DBX_PIP:-$(at /databricks/python/bin/pip)}"
  [[ -x "$pip" ]] || die "wheel: no pip at $pip (not a Databricks Python runtime? set AURORA_DBX_PIP)"
  if [[ "$WHEEL" == /* ]]; then
    case "${WHEEL##*/}" in
      aurora_dbx-*.whl) ;;
      *) die "wheel: $WHEEL is not an aurora_dbx wheel (aurora_dbx-X.Y.Z-py3-none-any.whl)" ;;
    esac
    file="$(at "$WHEEL")"
    [[ -f "$file" ]] || die "wheel: $WHEEL does not exist or is not readable by the cluster"
    sum="$(sha256sum "$file" | cut -d' ' -f1)"
    if [[ -n "$WHEEL_SHA256" && "${WHEEL_SHA256,,}" != "$sum" ]]; then
      die "wheel: sha256 of $WHEEL is $sum, expected $WHEEL_SHA256 (AURORA_DBX_WHEEL_SHA256); not installed"
    fi
    spec="$file"
    want="$WHEEL sha256:$sum"
  else
    # A requirement from the configured package index: pinned, and no extras (the `local`
    # extra would install pyspark and mlflow over the runtime's own).
    [[ "$WHEEL" =~ ^aurora[-_]dbx==[0-9][0-9A-Za-z.+!-]*$ ]] \
      || die "wheel: AURORA_DBX_WHEEL must be a /path/to/aurora_dbx-*.whl or a pinned requirement aurora-dbx==X.Y.Z"
    spec="$WHEEL"
    want="$WHEEL"
  fi
  stamp="$(at "$STATE_DIR")/installed-wheel"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "wheel: $want already installed"
    return
  fi
  log "wheel: installing $want"
  # Only aurora_dbx's own dependencies (boto3, databricks-sdk, tenacity, PyYAML, psycopg,
  # PyMySQL) are installed or upgraded, and only when the runtime's versions do not satisfy it.
  "$pip" install --disable-pip-version-check --no-input --upgrade-strategy only-if-needed "$spec" \
    || die "wheel: pip install of $want failed"
  mkdir -p "$(dirname "$stamp")"
  printf '%s\n' "$want" > "$stamp"
  log "wheel: installed $want"
}

# -- 2. the RDS CA bundle ----------------------------------------------------------------------

install_ca_bundle() {
  local tmp="$WORK/rds-ca.pem" from result count sum
  if [[ -n "$CA_URL" ]]; then
    [[ "$CA_URL" == https://* ]] || die "CA bundle: AURORA_DBX_RDS_CA_URL must be an https:// URL"
    curl --fail --silent --show-error --location --proto '=https' --tlsv1.2 --retry 3 --max-time 60 \
      --output "$tmp" "$CA_URL" || die "CA bundle: download from $CA_URL failed"
    from="$CA_URL"
  elif [[ -n "$CA_SOURCE" ]]; then
    [[ -f "$(at "$CA_SOURCE")" ]] || die "CA bundle: $CA_SOURCE does not exist or is not readable by the cluster"
    cat "$(at "$CA_SOURCE")" > "$tmp"
    from="$CA_SOURCE"
  else
    log "CA bundle: skipped (no AURORA_DBX_RDS_CA_SOURCE or AURORA_DBX_RDS_CA_URL; set clusters.<name>.ca_bundle in the policy)"
    return
  fi
  count="$(grep -c -- '-----BEGIN CERTIFICATE-----' "$tmp" || true)"
  [[ "$count" -ge 1 ]] || die "CA bundle: $from is not a PEM certificate bundle"
  sum="$(sha256sum "$tmp" | cut -d' ' -f1)"
  result="$(write_if_changed "$(at "$CA_TARGET")" 0644 < "$tmp")"
  log "CA bundle: $CA_TARGET $result ($count certificates, sha256 $sum, from $from)"
}

# -- 3. the access policy (driver) -------------------------------------------------------------

write_policy_conf() {
  if [[ "$is_driver" != true ]]; then
    log "policy: executor node, nothing to do (executors never read the policy)"
    return
  fi
  if [[ -z "$POLICY_PATH" ]]; then
    log "policy: skipped (AURORA_DBX_POLICY_PATH is empty; pass policy= to aurora_dbx.configure)"
    return
  fi
  [[ "$POLICY_PATH" =~ ^/(Volumes|Workspace)/[A-Za-z0-9._@+=,/-]+$ ]] \
    || die "policy: AURORA_DBX_POLICY_PATH must be a /Volumes/... or /Workspace/... path of plain characters"
  local result
  result="$(write_if_changed "$(at "$POLICY_CONF")" 0644 <<EOF
[driver] {
  "spark.aurora_dbx.policy" = "$POLICY_PATH"
}
EOF
)"
  log "policy: spark.aurora_dbx.policy = $POLICY_PATH ($POLICY_CONF $result)"
  if [[ ! -r "$(at "$POLICY_PATH")" ]]; then
    log "policy: note: $POLICY_PATH is not readable from the init script; users need READ VOLUME (or workspace file access) on it"
  fi
}

# -- 4. optional cluster-wide base role --------------------------------------------------------

configure_base_role() {
  local env_file config current next result session
  env_file="$(at "$SPARK_ENV")"
  config="$STATE_DIR/aws-config"
  if [[ -n "$BASE_ROLE_ARN" ]]; then
    [[ "$BASE_ROLE_ARN" =~ ^arn:aws(-[a-z]+)*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$ ]] \
      || die "base role: AURORA_DBX_BASE_ROLE_ARN is not an IAM role ARN"
    session="aurora-dbx-$(printf '%s' "${CLUSTER_ID:-sandbox}" | tr -c 'A-Za-z0-9+=,.@_-' '_' | cut -c1-52)"
    result="$(write_if_changed "$(at "$config")" 0644 <<EOF
[default]
role_arn = $BASE_ROLE_ARN
credential_source = Ec2InstanceMetadata
role_session_name = $session
EOF
)"
    log "base role: $BASE_ROLE_ARN from the instance profile ($config $result)"
  fi
  if [[ -z "$BASE_ROLE_ARN" ]] && ! grep -qxF -- "$BLOCK_BEGIN" "$env_file" 2>/dev/null; then
    log "base role: not configured (the library uses credentials.source from the policy)"
    return
  fi
  # spark-env.sh: drop our previous block, then add the current one (if any).
  current=""
  [[ -f "$env_file" ]] && current="$(cat "$env_file")"
  next="$(printf '%s\n' "$current" | awk -v b="$BLOCK_BEGIN" -v e="$BLOCK_END" '$0==b{skip=1;next} $0==e{skip=0;next} !skip')"
  if [[ -n "$BASE_ROLE_ARN" ]]; then
    next="$(printf '%s\n%s\nexport AWS_CONFIG_FILE=%s\n%s' "$next" "$BLOCK_BEGIN" "$(at "$config")" "$BLOCK_END")"
  fi
  result="$(printf '%s\n' "$next" | sed -e '/./,$!d' | write_if_changed "$env_file" 0755)"
  if [[ -n "$BASE_ROLE_ARN" ]]; then
    log "base role: AWS_CONFIG_FILE exported in $SPARK_ENV ($result)"
  else
    log "base role: removed from $SPARK_ENV ($result)"
  fi
}

install_wheel
install_ca_bundle
write_policy_conf
configure_base_role
log "done"
