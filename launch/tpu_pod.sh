#!/usr/bin/env bash
# Runs parcel_jax training on every worker of a Cloud TPU VM pod.
#
#   bash launch/tpu_pod.sh --tpu=NAME --zone=ZONE --workdir=gs://BUCKET/run \
#       [--project=P] [--config=configs/base.py] [--setup [--repo=URL]] [--dry-run] \
#       [-- --config.seed=1 --config.model.connector.method=m3 ...]
#
# Every worker runs the same command (`gcloud ... ssh --worker=all`) with train's
# --distributed: JAX detects the multi-host TPU topology itself, so
# `jax.distributed.initialize()` needs no coordinator/process arguments.
# See --help for all options.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash launch/tpu_pod.sh --tpu=NAME --zone=ZONE --workdir=DIR [options] [-- OVERRIDES...]

Runs `python -m parcel_jax.train --config=CONFIG --workdir=DIR OVERRIDES...` on all
workers of a TPU VM pod through `gcloud compute tpus tpu-vm ssh --worker=all`.

Options (environment variable in brackets):
  --tpu=NAME          TPU VM name [TPU_NAME]
  --zone=ZONE         zone [ZONE, else CLOUDSDK_COMPUTE_ZONE]
  --project=PROJECT   GCP project [PROJECT]; default: gcloud's configured project
  --workdir=DIR       checkpoints and results, e.g. gs://bucket/parcel/run1 [WORKDIR]
  --config=SPEC       config file, relative to the repo root [CONFIG; configs/base.py]
  --remote-dir=DIR    checkout on the workers, relative to the home dir [REMOTE_DIR; parcel_jax]
  --python=PATH       interpreter on the workers [REMOTE_PYTHON; .venv/bin/python]
  --setup             first sync the code to every worker, create .venv there and
                      pip install -r requirements.txt plus jax[tpu] at the pinned version
  --repo=URL          with --setup: git clone/pull URL on the workers instead of copying
                      this checkout (tracked and untracked-but-not-ignored files)
  --branch=BRANCH     with --repo: branch to check out [main]
  --venv-python=BIN   with --setup: interpreter that creates .venv [python3.11]
  --no-distributed    omit train's --distributed (jax.distributed.initialize() with TPU
                      auto-detection); it is on by default
  --dry-run           print the exact commands instead of running them [DRY_RUN=1]
  -h, --help          this text
  -- OVERRIDES...     passed to train unchanged, e.g. --config.seed=1 --config.model.connector.budgets=16,
EOF
}

# POSIX-shell quoting (like Python's shlex.quote): leaves safe words alone.
quote() {
  if [[ -n "$1" && "$1" != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}

# Quotes and joins all arguments into one command line.
join_quoted() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}

# Runs a command, or prints it under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    join_quoted "$@"
    printf '\n'
  else
    "$@"
  fi
}

die() {
  printf 'tpu_pod.sh: %s\n' "$*" >&2
  exit 2
}

TPU="${TPU_NAME:-}"
ZONE="${ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}"
PROJECT="${PROJECT:-}"
WORKDIR="${WORKDIR:-}"
CONFIG="${CONFIG:-configs/base.py}"
REMOTE_DIR="${REMOTE_DIR:-parcel_jax}"
REMOTE_PYTHON="${REMOTE_PYTHON:-.venv/bin/python}"
DRY_RUN="${DRY_RUN:-0}"
SETUP=0
DISTRIBUTED=(--distributed)
REPO=""
BRANCH="main"
VENV_PYTHON="python3.11"
OVERRIDES=()

# Accepts both --flag=value and --flag value.
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --setup) SETUP=1 ;;
    --no-distributed) DISTRIBUTED=() ;;
    --) shift; OVERRIDES=("$@"); break ;;
    --tpu=* | --zone=* | --project=* | --workdir=* | --config=* | --remote-dir=* | --python=* | \
      --repo=* | --branch=* | --venv-python=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      continue ;;
    --tpu | --zone | --project | --workdir | --config | --remote-dir | --python | --repo | \
      --branch | --venv-python)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --tpu) TPU="$2" ;;
        --zone) ZONE="$2" ;;
        --project) PROJECT="$2" ;;
        --workdir) WORKDIR="$2" ;;
        --config) CONFIG="$2" ;;
        --remote-dir) REMOTE_DIR="$2" ;;
        --python) REMOTE_PYTHON="$2" ;;
        --repo) REPO="$2" ;;
        --branch) BRANCH="$2" ;;
        --venv-python) VENV_PYTHON="$2" ;;
      esac
      shift ;;
    *) die "unknown argument '$1' (train overrides go after --; see --help)" ;;
  esac
  shift
done

[[ -n "$TPU" ]] || die "--tpu (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or ZONE) is required"
[[ -n "$WORKDIR" ]] || die "--workdir (or WORKDIR) is required"
[[ -n "$CONFIG" ]] || die "--config must not be empty"

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
SCOPE=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  SCOPE+=(--project="$PROJECT")
fi

# Runs one shell command line on all workers at once.
on_all_workers() {
  run "${GCLOUD_TPU[@]}" ssh "$TPU" "${SCOPE[@]}" --worker=all --command "$1"
}

if [[ "$SETUP" == 1 ]]; then
  remote_dir_q="$(quote "$REMOTE_DIR")"
  if [[ -n "$REPO" ]]; then
    repo_q="$(quote "$REPO")"
    branch_q="$(quote "$BRANCH")"
    sync="if [ -d $remote_dir_q/.git ]; then git -C $remote_dir_q fetch origin $branch_q"
    sync+=" && git -C $remote_dir_q checkout $branch_q && git -C $remote_dir_q pull --ff-only origin $branch_q;"
    sync+=" else git clone --branch $branch_q $repo_q $remote_dir_q; fi"
  else
    # Copy this checkout: tracked files plus untracked ones that git does not ignore.
    repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    archive="${TMPDIR:-/tmp}/parcel_jax_src.$TPU.tar.gz"
    if [[ "$DRY_RUN" == 1 ]]; then
      printf '%s\n' "$(join_quoted git -C "$repo_root" ls-files -z --cached --others --exclude-standard) | $(join_quoted tar -C "$repo_root" --null --ignore-failed-read -T - -czf "$archive")"
    else
      git -C "$repo_root" ls-files -z --cached --others --exclude-standard |
        tar -C "$repo_root" --null --ignore-failed-read -T - -czf "$archive"
    fi
    run "${GCLOUD_TPU[@]}" scp "$archive" "$TPU:parcel_jax_src.tar.gz" "${SCOPE[@]}" --worker=all
    sync="mkdir -p $remote_dir_q && tar -xzf parcel_jax_src.tar.gz -C $remote_dir_q && rm parcel_jax_src.tar.gz"
  fi
  install="cd $remote_dir_q && $(quote "$VENV_PYTHON") -m venv .venv && .venv/bin/pip install -q -U pip"
  install+=" && .venv/bin/pip install -q -r requirements.txt"
  install+=" && .venv/bin/pip install -q \"jax[tpu]==\$(sed -n 's/^jax==//p' requirements.txt)\""
  on_all_workers "$sync && $install"
fi

TRAIN=("$REMOTE_PYTHON" -m parcel_jax.train --config="$CONFIG" --workdir="$WORKDIR"
  "${DISTRIBUTED[@]}" "${OVERRIDES[@]}")
on_all_workers "cd $(quote "$REMOTE_DIR") && $(join_quoted "${TRAIN[@]}")"
