#!/usr/bin/env bash
# Fine-tune with jaxft on a Cloud TPU VM (v4, v5e, v5p, v6e; one host or a pod slice of many).
#
#   tpu_scripts/tpu.sh [OPTIONS] COMMAND [COMMAND OPTIONS]
#
# Commands (in the order of a run):
#   create --type TYPE [--version V] [--spot]  create the VM, e.g. --type v5litepod-16 (4 hosts), v4-8, v5p-8,
#                                              v6e-8; the software version follows the generation
#   setup [--repo DIR] [--bucket B]            copy this checkout (git HEAD) to every worker and install jaxft
#                                              with jax[tpu]; --bucket mounts gs://B at /mnt/B on every worker
#                                              (a pod slice needs a workdir all workers share)
#   train --config FILE [--data FILE] [--workdir DIR] [-- --config.KEY=VALUE ...]
#                                              start `jaxft train` on all workers at once, in the background;
#                                              the processes find each other through the TPU metadata
#   logs [--worker N]                          follow the training log of a worker (default 0)
#   fetch [--workdir DIR] [--to DIR]           copy the run directory from worker 0
#   delete                                     delete the VM
#
# Options: --name NAME (default $TPU_NAME or jaxft), --zone ZONE (default $TPU_ZONE or us-central2-b),
#          --project P (default: gcloud's), --dry-run (print the commands instead of running them).
set -euo pipefail

NAME="${TPU_NAME:-jaxft}"
ZONE="${TPU_ZONE:-us-central2-b}"
PROJECT="${TPU_PROJECT:-}"
DRY_RUN=0
# On each worker, relative to the home directory (where `gcloud ... ssh --command` starts).
LOG=jaxft-train.log
REMOTE_DIR=jaxft

die() { echo "tpu.sh: error: $*" >&2; exit 2; }

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

# Runs a command, or with --dry-run prints it (quoted so that it can be pasted into a shell).
run() {
  if ((DRY_RUN)); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

gcloud_tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... with the zone and project
  local sub="$1"
  shift
  local args=(gcloud compute tpus tpu-vm "$sub" "$@" "--zone=$ZONE")
  [[ -n "$PROJECT" ]] && args+=("--project=$PROJECT")
  run "${args[@]}"
}

on_workers() {  # on_workers WORKERS COMMAND: a shell command on the given workers (all, or 0, 1, ...)
  gcloud_tpu ssh "$NAME" "--worker=$1" "--command=$2"
}

version_for() {  # the TPU software version for an accelerator type
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "unknown accelerator type '$1' (expected v4-N, v5litepod-N, v5p-N or v6e-N)" ;;
  esac
}

cmd_create() {
  local type="" version="" spot=()
  while (($#)); do
    case "$1" in
      --type) type="${2:?--type needs a value}"; shift 2 ;;
      --version) version="${2:?--version needs a value}"; shift 2 ;;
      --spot) spot=(--spot); shift ;;
      *) die "create: unknown option '$1'" ;;
    esac
  done
  [[ -n "$type" ]] || die "create: --type is required, e.g. --type v5litepod-8"
  [[ -n "$version" ]] || version="$(version_for "$type")"
  gcloud_tpu create "$NAME" "--accelerator-type=$type" "--version=$version" "${spot[@]}"
}

cmd_setup() {
  local repo bucket=""
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  while (($#)); do
    case "$1" in
      --repo) repo="${2:?--repo needs a value}"; shift 2 ;;
      --bucket) bucket="${2:?--bucket needs a value}"; shift 2 ;;
      *) die "setup: unknown option '$1'" ;;
    esac
  done
  local archive="${TMPDIR:-/tmp}/jaxft-src.tar.gz"
  run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  gcloud_tpu scp "$archive" "$NAME:jaxft-src.tar.gz" --worker=all
  on_workers all "mkdir -p $REMOTE_DIR && tar -xzf jaxft-src.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && \
python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]>=0.6,<0.13'"
  if [[ -n "$bucket" ]]; then
    on_workers all "export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s) && \
echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && \
sudo apt-get update -q && sudo apt-get install -y -q gcsfuse && sudo mkdir -p /mnt/$bucket && \
sudo chown \$USER /mnt/$bucket && gcsfuse --implicit-dirs $bucket /mnt/$bucket"
  fi
}

cmd_train() {
  local config="" data="" workdir='runs/tpu' overrides=()
  while (($#)); do
    case "$1" in
      --config) config="${2:?--config needs a value}"; shift 2 ;;
      --data) data="${2:?--data needs a value}"; shift 2 ;;
      --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
      --) shift; overrides=("$@"); break ;;
      *) die "train: unknown option '$1' (config overrides go after --)" ;;
    esac
  done
  [[ -n "$config" ]] || die "train: --config is required, e.g. --config configs/default_lora.py"
  # The config and data files go to every worker: each process reads the data and keeps its rows.
  gcloud_tpu scp "$config" "$NAME:jaxft-config.py" --worker=all
  local args=(--config ../jaxft-config.py --workdir "$workdir")
  if [[ -n "$data" ]]; then
    gcloud_tpu scp "$data" "$NAME:jaxft-data-${data##*/}" --worker=all
    args+=("--config.data.train=../jaxft-data-${data##*/}")
  fi
  args+=("${overrides[@]}")
  local quoted
  quoted="$(printf '%q ' "${args[@]}")"
  on_workers all "cd $REMOTE_DIR && nohup .venv/bin/jaxft train ${quoted% } > ../$LOG 2>&1 < /dev/null &"
  echo "started on all workers of $NAME; follow with: $0 --name $NAME --zone $ZONE logs" >&2
}

cmd_logs() {
  local worker=0
  while (($#)); do
    case "$1" in
      --worker) worker="${2:?--worker needs a value}"; shift 2 ;;
      *) die "logs: unknown option '$1'" ;;
    esac
  done
  on_workers "$worker" "tail -n +1 -F $LOG"
}

cmd_fetch() {
  local workdir='runs/tpu' to="."
  while (($#)); do
    case "$1" in
      --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
      --to) to="${2:?--to needs a value}"; shift 2 ;;
      *) die "fetch: unknown option '$1'" ;;
    esac
  done
  [[ "$workdir" = /* ]] || workdir="jaxft/$workdir"  # relative to the checkout in the worker's home
  gcloud_tpu scp --recurse "$NAME:$workdir" "$to" --worker=0
}

cmd_delete() {
  (($# == 0)) || die "delete: unknown option '$1'"
  gcloud_tpu delete "$NAME" --quiet
}

main() {
  while (($#)); do
    case "$1" in
      --name) NAME="${2:?--name needs a value}"; shift 2 ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      -*) die "unknown option '$1' (see --help)" ;;
      *) break ;;
    esac
  done
  (($#)) || { usage; exit 2; }
  local command="$1"
  shift
  case "$command" in
    create|setup|train|logs|fetch|delete) "cmd_$command" "$@" ;;
    *) die "unknown command '$command' (create, setup, train, logs, fetch, delete)" ;;
  esac
}

main "$@"
