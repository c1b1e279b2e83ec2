#!/usr/bin/env bash
# Usage (here, in the repository's root): bash final_project/results/build_trees.sh DIR:REV [DIR:REV ...]
# Each DIR becomes `git archive REV` without final_project, with DIR/COMMIT naming it: the clean trees a device
# script's `step` runs in (.gpu by default, TREE=DIR for another; final_project/results/device_steps.sh).
set -u
for t in "$@"; do
  dir=${t%%:*}; rev=${t#*:}
  rm -rf "$dir" && mkdir "$dir" && git archive "$rev" -- . ':!final_project' | tar -x -C "$dir" \
    && git rev-parse --short "$rev" > "$dir/COMMIT" && echo "$dir $(cat "$dir/COMMIT")" || exit 1
done
