#!/bin/bash
# Submit prep's stages as Slurm arrays, chained: each stage's array starts only after EVERY task of the
# previous stage's array succeeded (--dependency=afterok:<array job id>), because a stage reads the
# whole output of the one before it.
#
#   PREP_CONFIG=my.yaml recipes/slurm/submit.sh                    # every stage with enable: true, in order
#   PREP_CONFIG=my.yaml recipes/slurm/submit.sh reorganize_tar generate_wdinfo
#   ARRAY_REORGANIZE_TAR=64 PREP_CONFIG=my.yaml recipes/slurm/submit.sh   # array size per stage
#   AFTER=123456 ...                                              # first stage waits for job 123456 too
#
# Environment passes through to the jobs (PREP, PREP_ARGS, PREP_WORKERS, PREP_CONFIG). Extra sbatch options
# for every job: SBATCH_ARGS="--partition=cpu --account=me". Prints one "STAGE JOBID" line per stage.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${PREP_CONFIG:?set PREP_CONFIG to the stage config YAML}"
PREP_CONFIG=$(cd "$(dirname "$PREP_CONFIG")" && pwd)/$(basename "$PREP_CONFIG")
export PREP_CONFIG
read -r -a SB_EXTRA <<< "${SBATCH_ARGS:-}"

if [ "$#" -gt 0 ]; then
  stages=("$@")
else  # the stages the config enables, in pipeline order
  read -r -a PY <<< "${PYTHON:-python3}"
  mapfile -t stages < <("${PY[@]}" -c '
import sys
from prep.config import load_config
from prep.stages import STAGE_ORDER
cfg = load_config(sys.argv[1])
print("\n".join(s for s in STAGE_ORDER if getattr(cfg, s).enable))' "$PREP_CONFIG")
fi

dep=${AFTER:-}
for stage in "${stages[@]}"; do
  script="$here/$stage.sbatch"
  [ -f "$script" ] || { echo "error: no Slurm script for stage '$stage' ($script)" >&2; exit 2; }
  size_var="ARRAY_$(echo "$stage" | tr '[:lower:]' '[:upper:]')"
  args=(--parsable --export=ALL)
  [ -n "${!size_var:-}" ] && args+=("--array=0-$(( ${!size_var} - 1 ))")
  [ -n "$dep" ] && args+=("--dependency=afterok:$dep" --kill-on-invalid-dep=yes)
  out=$(sbatch "${args[@]}" ${SB_EXTRA[@]+"${SB_EXTRA[@]}"} "$script")
  dep=${out%%;*}  # --parsable prints "JOBID" or "JOBID;CLUSTER"
  echo "$stage $dep"
done
