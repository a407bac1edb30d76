#!/usr/bin/env bash
# The wall time of every smoke-test preset as shipped: the `tiny` presets (tiny-random, a random
# 2-layer model made on the fly) with the inputs their docstrings say to make first, and the demo
# model's `quick` presets. Each runs in a fresh workdir under DIR, one after the other, on one
# process with the machine's CPU devices; the times (and exit statuses) go to DIR/times.txt and
# each run's output to DIR/<name>.log. The configs' docstrings quote these times.
#
#   scripts/time_presets.sh [DIR]   (default: runs/time_presets; emptied first if new or an earlier run's)
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-runs/time_presets}")
if [[ -d "$out" && -n "$(ls -A "$out")" && ! -f "$out/times.txt" ]]; then
  echo "time_presets.sh: $out is not empty and holds no times.txt (not an earlier run of this script); refused"
  exit 2
fi
rm -rf "$out" && mkdir -p "$out"
times="$out/times.txt"
echo "# $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+local changes'), $(nproc) cores, $(date -u +%FT%TZ)" > "$times"

run() {  # run NAME COMMAND...: the wall time of one command
  local name=$1 start end status log
  shift
  log="$out/$(echo "$name" | tr -cs 'A-Za-z0-9_.' '_' | sed 's/^_//; s/_$//').log"
  start=$(date +%s.%N)
  "$@" > "$log" 2>&1
  status=$?
  end=$(date +%s.%N)
  printf "%-26s %6.1f s  exit %d\n" "$name" "$(echo "$end - $start" | bc)" "$status" | tee -a "$times"
}

# tiny-random is made once (into $SSAH_CACHE_DIR, else $XDG_CACHE_HOME/ssah_jax or ~/.cache/ssah_jax)
# before any timing
run make_tiny_random python -c "from ssah_jax.checkpoints import model_path; model_path('tiny-random')"
run reproduce:tiny ssah-jax reproduce --config=configs/reproduce.py:tiny --workdir="$out/reproduce_tiny"
run reproduce:tiny_maker ssah-jax reproduce --config=configs/reproduce.py:tiny_maker --workdir="$out/reproduce_tiny_maker"
run signals:tiny ssah-jax signals --config=configs/signals.py:tiny --workdir="$out/signals_tiny"
run sweeps/fractions:tiny ssah-jax sweep --config=configs/sweeps/fractions.py:tiny --workdir="$out/fractions"
run sweeps/signal:tiny ssah-jax sweep --config=configs/sweeps/signal.py:tiny --workdir="$out/signal"
run "  its unit map" ssah-jax prune --config=configs/prune.py:quick --config.model=tiny-random \
  "--config.variants=()" --workdir="$out/protection/units"
run sweeps/protection:tiny ssah-jax sweep --config=configs/sweeps/protection.py:tiny --workdir="$out/protection"
run "  its contrast answers" ssah-jax generate --config=configs/generate.py:quick --config.model=tiny-random \
  --config.prompts_dataset=benign_contrast:128 --config.max_new_tokens=2 --config.batch_size=64 \
  --workdir="$out/alignment/contrast"
run sweeps/alignment:tiny ssah-jax sweep --config=configs/sweeps/alignment.py:tiny --workdir="$out/alignment"
run generate:quick ssah-jax generate --config=configs/generate.py:quick --workdir="$out/generate_quick"
run evaluate:quick ssah-jax evaluate --config=configs/evaluate.py:quick --workdir="$out/evaluate_quick"
run finetune:quick ssah-jax finetune --config=configs/finetune.py:quick --workdir="$out/finetune_quick"
run prune:quick ssah-jax prune --config=configs/prune.py:quick --workdir="$out/prune_quick"
echo "Report: $times"
