#!/bin/sh
# Fetch the data this commit tracks from the team's DVC remote, then serve flow runs from the work pool.
set -eu
cd "$TUNEPATH_PROJECT_DIR"
if [ -f data/raw.dvc ]; then
  dvc pull --quiet data/raw.dvc || echo "tunepath-worker: dvc pull failed; runs will fail at validate until the remote holds the data" >&2
fi
exec prefect worker start --pool "${TUNEPATH_WORK_POOL:-tunepath}" --type process "$@"
