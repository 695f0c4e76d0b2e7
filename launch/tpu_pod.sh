#!/usr/bin/env bash
# Train imm_jax on a Cloud TPU VM pod slice: create / setup / train / logs / stop / delete / status / watch.
#
#   launch/tpu_pod.sh [--dry-run] COMMAND [options] [-- extra trainer flags]
#
# Commands
#   create    create the TPU VM (add --spot for spot capacity)
#   setup     copy this checkout (git archive HEAD) to every worker, install it with jax[tpu];
#             when --data is gs://..., also sync the latents to --local-data on every worker
#   train     start training on all workers (background, log in ~/imm_train.log, pid in ~/imm_train.pid)
#   logs      show the training log of --log-worker (default 0); --follow to tail -f
#   stop      SIGTERM the trainer on all workers (it saves a checkpoint and exits)
#   delete    delete the TPU VM
#   status    print the TPU state
#   up        create + setup + train
#   watch     preemption-safe loop: every --interval s, if the TPU is gone/PREEMPTED/TERMINATED, delete it,
#             re-create it, set it up and start training again; the trainer resumes from the latest
#             checkpoint in --workdir (which must be on GCS, not on the VM)
#
# Options (defaults in brackets; most also read from the environment)
#   --name NAME                 TPU name [$IMM_TPU_NAME or imm-jax]
#   --zone ZONE                 [$IMM_TPU_ZONE or us-central2-b]
#   --project PROJECT           [$IMM_TPU_PROJECT or gcloud's default]
#   --accelerator-type TYPE     [$IMM_TPU_TYPE or v4-16]
#   --version RUNTIME           TPU VM software version [$IMM_TPU_VERSION or tpu-ubuntu2204-base]
#   --spot                      request spot capacity (use with `watch`)
#   --config CONFIG             trainer config [configs/imagenet256.py:variant=XL/2]
#   --workdir DIR               checkpoints/metrics, gs://bucket/path or a shared mount [required for train]
#   --data PATH                 latent directory written by imm_jax.tools.encode_latents: gs://... (synced to
#                               --local-data by setup) or a path mounted on every worker
#   --local-data DIR            where setup puts gs:// latents on each worker [/tmp/imm_latents]
#   --remote-dir DIR            code directory on the workers [imm_jax] (relative to $HOME)
#   --repo DIR                  local checkout to ship [the repository containing this script]
#   --log-worker N, --follow    for `logs`
#   --interval S                `watch` poll period [300]
#   --dry-run                   print every command instead of running it
#
# Example (2 workers, v4-16):
#   launch/tpu_pod.sh up --name imm-xl --zone us-central2-b --accelerator-type v4-16 \
#       --workdir gs://my-bucket/runs/im256_xl --data gs://my-bucket/imagenet256_latents \
#       -- --config.data.batch_size=4096
set -euo pipefail

DRY_RUN=0
NAME="${IMM_TPU_NAME:-imm-jax}"
ZONE="${IMM_TPU_ZONE:-us-central2-b}"
PROJECT="${IMM_TPU_PROJECT:-}"
ACCEL="${IMM_TPU_TYPE:-v4-16}"
VERSION="${IMM_TPU_VERSION:-tpu-ubuntu2204-base}"
SPOT=0
CONFIG="configs/imagenet256.py:variant=XL/2"
WORKDIR=""
DATA=""
LOCAL_DATA="/tmp/imm_latents"
REMOTE_DIR="imm_jax"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_WORKER=0
FOLLOW=0
INTERVAL=300
COMMAND=""
EXTRA=()

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --accelerator-type) ACCEL="$2"; shift ;;
    --version) VERSION="$2"; shift ;;
    --spot) SPOT=1 ;;
    --config) CONFIG="$2"; shift ;;
    --workdir) WORKDIR="$2"; shift ;;
    --data) DATA="$2"; shift ;;
    --local-data) LOCAL_DATA="$2"; shift ;;
    --remote-dir) REMOTE_DIR="$2"; shift ;;
    --repo) REPO="$2"; shift ;;
    --log-worker) LOG_WORKER="$2"; shift ;;
    --follow) FOLLOW=1 ;;
    --interval) INTERVAL="$2"; shift ;;
    -h|--help) sed -n '2,45p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$COMMAND" ]] || die "more than one command: $COMMAND and $1"; COMMAND="$1" ;;
  esac
  shift
done
[[ -n "$COMMAND" ]] || die "no command given; use one of create setup train logs stop delete status up watch"

# Hosts (workers) and JAX devices of a slice, for the summary line. v2/v3: N cores, 8 per host;
# v4/v5p: N TensorCores, 2 per chip, 4 chips per host; v5e/v6e: N chips, up to 8 on one host, else 4 per host.
slice_shape() {
  local t="$1" gen n
  gen="${t%-*}"; n="${t##*-}"
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "? ?"; return; }
  case "$gen" in
    v2|v3) echo "$(( n >= 8 ? n / 8 : 1 )) $n" ;;
    v4|v5p) echo "$(( n >= 8 ? n / 8 : 1 )) $(( n / 2 ))" ;;
    v5litepod|v5e|v6e) if (( n <= 8 )); then echo "1 $n"; else echo "$(( n / 4 )) $n"; fi ;;
    *) echo "? ?" ;;
  esac
}

quote() {  # shell-quote one word, single-quote style (copy-pasteable)
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

run() {  # print (dry run) or execute a command given as words
  if (( DRY_RUN )); then
    printf '+'; local w; for w in "$@"; do printf ' '; quote "$w"; done; printf '\n'
  else
    "$@"
  fi
}

GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")

on_workers() {  # on_workers WORKER 'shell command'
  run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker="$1" --command="$2"
}

data_on_worker() {
  if [[ "$DATA" == gs://* ]]; then echo "$LOCAL_DATA"; else echo "$DATA"; fi
}

cmd_create() {
  local args=("${GCLOUD[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
  (( SPOT )) && args+=(--spot)
  run "${args[@]}"
}

cmd_setup() {
  local tarball="/tmp/imm_jax_src_$$.tar.gz"
  run git -C "$REPO" archive --format=tar.gz -o "$tarball" HEAD
  run "${GCLOUD[@]}" scp "$tarball" "$NAME:imm_jax_src.tar.gz" "${LOC[@]}" --worker=all
  on_workers all "set -e; rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/imm_jax_src.tar.gz -C ~/$REMOTE_DIR && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ~/$REMOTE_DIR"
  if [[ "$DATA" == gs://* ]]; then
    # Local copy on every worker: LatentShards memory-maps plain files. rsync makes re-runs cheap.
    on_workers all "set -e; mkdir -p $LOCAL_DATA && gcloud storage rsync --recursive $DATA $LOCAL_DATA"
  fi
}

trainer_command() {
  local data cmd
  data="$(data_on_worker)"
  cmd="python3 -m imm_jax.main $(quote "--config=$CONFIG") $(quote "--workdir=$WORKDIR") --multihost"
  [[ -n "$data" ]] && cmd+=" $(quote "--config.data.path=$data")"
  local e
  for e in "${EXTRA[@]+"${EXTRA[@]}"}"; do cmd+=" $(quote "$e")"; done
  echo "$cmd"
}

cmd_train() {
  [[ -n "$WORKDIR" ]] || die "train needs --workdir (gs://bucket/path or a shared mount; checkpoints live there)"
  local tc
  tc="$(trainer_command)"
  # setsid+nohup: the trainer outlives the ssh session; IMM_JAX_MULTIHOST=1 -> jax.distributed.initialize().
  # ~/imm_train.done marks a trainer that exited 0 (finished), so `watch` stops restarting it.
  on_workers all "cd ~/$REMOTE_DIR && rm -f ~/imm_train.done && IMM_JAX_MULTIHOST=1 setsid nohup bash -c $(quote "$tc && touch ~/imm_train.done") >> ~/imm_train.log 2>&1 < /dev/null & echo \$! > ~/imm_train.pid; echo started on \$(hostname)"
}

cmd_logs() {
  if (( FOLLOW )); then on_workers "$LOG_WORKER" "tail -n 50 -f ~/imm_train.log"
  else on_workers "$LOG_WORKER" "tail -n 200 ~/imm_train.log"; fi
}

cmd_stop() {
  on_workers all "if [ -f ~/imm_train.pid ]; then kill -TERM \$(cat ~/imm_train.pid) 2>/dev/null || true; rm -f ~/imm_train.pid; fi"
}

cmd_delete() { run "${GCLOUD[@]}" delete "$NAME" "${LOC[@]}" --quiet; }

cmd_status() { run "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" --format="value(state)"; }

cmd_watch() {
  [[ -n "$WORKDIR" ]] || die "watch needs --workdir on GCS (gs://...) so checkpoints survive preemption"
  while true; do
    local state
    if (( DRY_RUN )); then
      cmd_status; state="PREEMPTED"
      echo "# dry run: assuming state=$state to show the recovery sequence"
    else
      state="$("${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" --format="value(state)" 2>/dev/null || echo MISSING)"
    fi
    case "$state" in
      READY)
        if (( ! DRY_RUN )); then
          local probe
          probe="$("${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command='if [ -f ~/imm_train.done ]; then echo done; elif [ -f ~/imm_train.pid ] && kill -0 $(cat ~/imm_train.pid) 2>/dev/null; then echo running; else echo dead; fi' 2>/dev/null || echo unreachable)"
          case "$probe" in
            *done*) echo "[watch] training finished"; return 0 ;;
            *dead*) echo "[watch $(date -u +%FT%TZ)] trainer not running on a READY TPU (maintenance restart?): resuming"
                    cmd_setup && cmd_train || true ;;
          esac
        fi ;;
      CREATING|STARTING|RESTARTING|REPAIRING) ;;
      *)
        echo "[watch $(date -u +%FT%TZ)] TPU $NAME state=$state: recreating and resuming"
        [[ "$state" == MISSING ]] || cmd_delete || true
        cmd_create && cmd_setup && cmd_train || echo "[watch] recovery failed; retrying in ${INTERVAL}s"
        ;;
    esac
    (( DRY_RUN )) && break
    sleep "$INTERVAL"
  done
}

read -r HOSTS DEVICES <<< "$(slice_shape "$ACCEL")"
echo "# tpu $NAME ($ACCEL: $HOSTS worker(s), $DEVICES JAX devices) zone $ZONE${PROJECT:+ project $PROJECT}"
case "$COMMAND" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  train) cmd_train ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
  status) cmd_status ;;
  up) cmd_create; cmd_setup; cmd_train ;;
  watch) cmd_watch ;;
  *) die "unknown command $COMMAND; use one of create setup train logs stop delete status up watch" ;;
esac
