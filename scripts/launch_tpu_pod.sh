#!/usr/bin/env bash
# Runs one ssah-jax command on every worker of a Cloud TPU VM slice (creating the slice if it
# does not exist), from this checkout.
#
# usage: scripts/launch_tpu_pod.sh --name=NAME --zone=ZONE [--type=v5litepod-16] [--runtime=VERSION]
#            [--spot] [--bucket=BUCKET] [--data=DIR] [--dry-run] -- ssah-jax <experiment> --config=... --workdir=...
#
#   --name, --zone  the TPU VM (created with --type and --runtime when it does not exist; reused otherwise)
#   --type          accelerator type of a new slice (default v5litepod-16: 4 hosts x 4 chips)
#   --runtime       TPU VM software version of a new slice (default v2-alpha-tpuv5-lite; v4: tpu-ubuntu2204-base)
#   --spot          create a spot (preemptible) slice; a preempted run resumes when launched again
#   --bucket        mount gs://BUCKET at /mnt/BUCKET on every worker (gcsfuse, no metadata cache): put --workdir
#                   there, since every host must see the same workdir (an NFS / Filestore mount works too)
#   --data          a directory of the data kit to copy to every worker (as ../shared/data beside the checkout)
#   --dry-run       print the gcloud commands instead of running them
#
# The command gets --multihost appended (JAX finds the slice's other hosts itself). The checkout
# (tracked and new files, local changes included) is copied to ~/ssah_jax on every worker and
# installed with the TPU extra (jax[tpu]); process 0 reports, the others print only errors.
set -euo pipefail

name="" zone="" type="v5litepod-16" runtime="v2-alpha-tpuv5-lite" spot="" bucket="" data="" dry=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --type=*) type="${1#*=}" ;;
    --runtime=*) runtime="${1#*=}" ;;
    --spot) spot="--spot" ;;
    --bucket=*) bucket="${1#*=}" ;;
    --data=*) data="${1#*=}" ;;
    --dry-run) dry=1 ;;
    --) shift; break ;;
    *) echo "launch_tpu_pod.sh: unknown option $1 (see the usage at the top of the script)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$name" && -n "$zone" ]] || { echo "launch_tpu_pod.sh: --name and --zone are required" >&2; exit 2; }
[[ $# -gt 0 && "$1" == "ssah-jax" ]] || { echo "launch_tpu_pod.sh: give the command after --, starting with ssah-jax" >&2; exit 2; }
[[ -z "$data" || -d "$data" ]] || { echo "launch_tpu_pod.sh: --data=$data: no such directory" >&2; exit 2; }
# As python3 -m (a user-level pip install puts the ssah-jax script where a non-interactive ssh
# does not look).
command="python3 -m ssah_jax.cli "$(printf '%q ' "${@:2}")"--multihost"

run() {  # prints, and runs unless --dry-run
  echo "+ $*"
  [[ -n "$dry" ]] || "$@"
}

cd "$(dirname "$0")/.."
tpu=(gcloud compute tpus tpu-vm)
if [[ -n "$dry" ]] || ! "${tpu[@]}" describe "$name" --zone="$zone" > /dev/null 2>&1; then
  run "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$type" --version="$runtime" $spot
fi

archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git ls-files -z --cached --others --exclude-standard | tar -czf "$archive" --null -T -
run "${tpu[@]}" scp "$archive" "$name:ssah_jax.tar.gz" --zone="$zone" --worker=all
setup="rm -rf ~/ssah_jax && mkdir -p ~/ssah_jax && tar -xzf ~/ssah_jax.tar.gz -C ~/ssah_jax"
setup+=' && python3 -m pip install -q -e "$HOME/ssah_jax[tpu]"'  # $HOME: the worker's
if [[ -n "$data" ]]; then
  run "${tpu[@]}" scp --recurse "$data" "$name:data" --zone="$zone" --worker=all
  setup+=" && rm -rf ~/shared/data && mkdir -p ~/shared && mv ~/data ~/shared/data"
fi
if [[ -n "$bucket" ]]; then
  # No metadata cache: a file process 0 wrote must be there for every host right after the barrier.
  setup+=" && sudo mkdir -p /mnt/$bucket && (mountpoint -q /mnt/$bucket || sudo gcsfuse --implicit-dirs"
  setup+=" --metadata-cache-ttl-secs=0 -o allow_other $bucket /mnt/$bucket)"
fi
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$setup"
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="cd ~/ssah_jax && $command"
