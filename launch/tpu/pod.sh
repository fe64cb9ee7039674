#!/usr/bin/env bash
# A Cloud TPU VM pod slice: create it, install this repository on every worker, start the same
# eu-train command on all workers at once (JAX finds its peers from the TPU metadata), fetch results,
# delete it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

NAME="${NAME:-eu-jax}"
ZONE="${ZONE:-}"
ACCELERATOR="${ACCELERATOR:-v5p-32}"
PROJECT="${PROJECT:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
REPO_URL="${REPO_URL:-}"
REMOTE_DIR="${REMOTE_DIR:-eu_jax}"
RUN_ENV=()  # NAME=VALUE settings for eu-train on every worker (--env)

usage() {
  cat <<'EOF_USAGE'
Usage: launch/tpu/pod.sh [options] COMMAND [ARGS...]

Commands:
  create [GCLOUD_ARGS...]   create the pod slice (extra args go to gcloud, e.g. --spot)
  install                   put this repository on every worker and pip install -e '.[tpu]' there:
                            a copy of this working tree (uncommitted edits included), or a
                            git clone of REPO_URL when that is set
  run EU_TRAIN_ARGS...      run `eu-train EU_TRAIN_ARGS...` on all workers at once, from REMOTE_DIR
  logs RUN_DIR [DEST]       copy RUN_DIR (a gs:// path, or a path on worker 0, relative to
                            REMOTE_DIR) to DEST (default .)
  delete [GCLOUD_ARGS...]   delete the pod slice

Options (or the environment variable in capitals):
  --name=NAME               TPU VM name (NAME, default eu-jax)
  --zone=ZONE               zone, required (ZONE), e.g. us-east5-a for v5p, us-west4-a for v5e
  --accelerator=TYPE        accelerator type (ACCELERATOR, default v5p-32), e.g. v5litepod-16
  --project=PROJECT         Google Cloud project (PROJECT, default: gcloud's configured one)
  --runtime-version=V       TPU software version (RUNTIME_VERSION, default by accelerator:
                            v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e)
  --repo-url=URL            install from this git URL instead of copying (REPO_URL)
  --remote-dir=DIR          repository folder on the workers, relative to home (REMOTE_DIR, default eu_jax)
  --env=NAME=VALUE          set an environment variable for `run` on every worker (repeatable), e.g.
                            JAX_COMPILATION_CACHE_DIR=/mnt/shared/xla (a compilation cache all workers
                            read), LIBTPU_INIT_ARGS=... or XLA_FLAGS=...
  --dry-run                 print every command instead of running it
  -h, --help                this text

On a pod every worker writes its own checkpoint shards and reads the model's: give --config.train.output_dir
and the model checkpoint as paths on storage every worker mounts at the same place (a Filestore / NFS share,
or a bucket through Cloud Storage FUSE); eu_jax does not read or write gs:// URLs itself.

Example:
  launch/tpu/pod.sh --zone=us-east5-a --accelerator=v5p-32 create
  launch/tpu/pod.sh --zone=us-east5-a install
  launch/tpu/pod.sh --zone=us-east5-a run \
    --config=configs/experiment.py:model=llama3_1_8b,method=eu,hardware=tpu_v5p \
    --config.model.checkpoint=/mnt/shared/ckpt/llama3_1_8b --config.data.retain.path=data/retain.jsonl \
    --config.data.forget.path=data/forget.jsonl --config.train.output_dir=/mnt/shared/runs/llama8b_eu
  launch/tpu/pod.sh --zone=us-east5-a logs /mnt/shared/runs/llama8b_eu runs/
  launch/tpu/pod.sh --zone=us-east5-a delete
EOF_USAGE
}

while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --runtime-version=*) RUNTIME_VERSION="${1#*=}" ;;
    --repo-url=*) REPO_URL="${1#*=}" ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    --env=*)
      [[ "${1#*=}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes NAME=VALUE, not '${1#*=}'"
      RUN_ENV+=("${1#*=}")
      ;;
    -*) die "unknown option '$1' (options go before the command; see -h)" ;;
    *) break ;;
  esac
  shift
done
(($#)) || { usage >&2; exit 2; }
COMMAND="$1"
shift
[[ -n "$ZONE" ]] || die "a zone is required: --zone=ZONE or ZONE=..."

if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR" in
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    *) die "no default TPU software version for '$ACCELERATOR'; pass --runtime-version=..." ;;
  esac
fi

TPU_VM=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=(--project="$PROJECT")

# One shell command line on every worker in parallel: a pod's processes must all start to find each other.
on_all_workers() {
  run "${TPU_VM[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

dir="$(quoted "$REMOTE_DIR")"
# pip installs for the user on the TPU images, and non-login ssh shells do not put ~/.local/bin on PATH.
user_path='export PATH="$HOME/.local/bin:$PATH"'

case "$COMMAND" in
  create)
    run "${TPU_VM[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION" "$@"
    ;;
  install)
    if [[ -n "$REPO_URL" ]]; then
      url="$(quoted "$REPO_URL")"
      on_all_workers "if [ -d $dir/.git ]; then git -C $dir pull --ff-only; else git clone $url $dir; fi"
    else
      # The working tree without git history, virtualenv or local run outputs.
      archive="${TMPDIR:-/tmp}/eu_jax-src.tar.gz"
      run tar -czf "$archive" --exclude-vcs --exclude=.venv --exclude=runs --exclude='*.egg-info' \
        --exclude=__pycache__ -C "$REPO_ROOT" .
      run "${TPU_VM[@]}" scp "$archive" "$NAME:eu_jax-src.tar.gz" "${WHERE[@]}" --worker=all
      on_all_workers "mkdir -p $dir && tar -xzf eu_jax-src.tar.gz -C $dir"
    fi
    on_all_workers "cd $dir && python3 -m pip install -e '.[tpu]'"
    ;;
  run)
    (($#)) || die "run needs eu-train arguments, e.g. --config=configs/experiment.py:hardware=tpu_v5p ..."
    train=(eu-train "$@")
    ((${#RUN_ENV[@]} == 0)) || train=(env "${RUN_ENV[@]}" "${train[@]}")
    on_all_workers "cd $dir && $user_path && $(quoted "${train[@]}")"
    ;;
  logs)
    (($#)) || die "logs needs the run's output directory"
    run_dir="$1"
    dest="${2:-.}"
    case "$run_dir" in
      gs://*) run gcloud storage cp --recursive "$run_dir" "$dest" ;;
      # Worker 0 is process 0, which writes the metrics and TensorBoard files.
      /*) run "${TPU_VM[@]}" scp --recurse "$NAME:$run_dir" "$dest" "${WHERE[@]}" --worker=0 ;;
      *) run "${TPU_VM[@]}" scp --recurse "$NAME:$REMOTE_DIR/$run_dir" "$dest" "${WHERE[@]}" --worker=0 ;;
    esac
    ;;
  delete)
    run "${TPU_VM[@]}" delete "$NAME" "${WHERE[@]}" --quiet "$@"
    ;;
  *)
    die "unknown command '$COMMAND'; commands: create, install, run, logs, delete"
    ;;
esac
