#!/usr/bin/env bash
# Pack a results folder into the device tool's $OUT as one file (a call brings back at most
# 8 files, and a harness folder holds dozens):
#
#   OUT=... bash benchmarks/pack_out.sh FOLDER STEP
#
# writes $OUT/NAME-STEP.tgz without the latents.pt files and $OUT/NAME-STEP-latents.tgz with
# them (latents may exceed a returned file's 16 MiB; the results must not be lost with them),
# then removes FOLDER if it lies under $OUT so that its loose files do not count.
set -euo pipefail
folder=$(realpath "$1") step=$2 OUT=$(realpath "$OUT")
[ "$folder" != "$OUT" ] || { echo "pack_out.sh: pack a folder inside \$OUT, not \$OUT itself" >&2; exit 2; }
name=$(basename "$folder") parent=$(dirname "$folder")
tar czf "$OUT/$name-$step.tgz" --exclude=latents.pt -C "$parent" "$name"
(cd "$parent" && find "$name" -name latents.pt | tar czf "$OUT/$name-$step-latents.tgz" -T -)
case $folder in "$OUT"/*) rm -rf "$folder" ;; esac
