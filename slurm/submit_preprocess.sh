#!/bin/bash
# Submits sharded preprocessing: a job array (slurm/preprocess.sbatch, one task per shard of the input
# files) and a merge job (slurm/merge.sbatch) that runs after every array task succeeded
# (--dependency=afterok:<array job id>). Prints both job ids; the last line is "<array id> <merge id>".
#
#   slurm/submit_preprocess.sh --input 'corpus/*.jsonl.gz' [--input more...] | --files-from LIST \
#       --tokenizer-model tok/spm32k.model --output-prefix data/bin/corpus \
#       [--shards 16] [--mode strided|contiguous] [--workers 8] [--json-keys text ...] [--no-append-eod] \
#       [--log-dir logs/slurm] [--sbatch-args "--partition=cpu --time=02:00:00"] [-- more preprocess_data args]
#
# Result: OUTPUT_PREFIX_<key>_document.bin/.idx (the names tools/preprocess_data.py uses), from the shards
# in OUTPUT_PREFIX.shards/ (kept; pass --remove-shards to delete them after a successful merge).
# The input files are listed once, here (sorted like preprocess_data.py), into OUTPUT_PREFIX.shards/files.txt,
# so every array task works from the same list. --shards defaults to min(16, number of files).
# Run from any directory with a python that has nvium_dist (NVIUM_PYTHON, or NVIUM_VENV to activate).
set -euo pipefail

die() { echo "submit_preprocess.sh: error: $*" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -n "${NVIUM_VENV:-}" ]]; then
  # shellcheck disable=SC1091
  . "$NVIUM_VENV/bin/activate"
fi
python=${NVIUM_PYTHON:-python}

patterns=() keys=() extra=()
files_from="" tokenizer="" output_prefix="" shards="" mode=strided workers=1 append_eod=1 remove=0
log_dir=logs/slurm sbatch_args=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --input) shift; while [[ $# -gt 0 && "$1" != --* ]]; do patterns+=("$1"); shift; done ;;
    --files-from) files_from=$2; shift 2 ;;
    --tokenizer-model) tokenizer=$2; shift 2 ;;
    --output-prefix) output_prefix=$2; shift 2 ;;
    --shards) shards=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --json-keys) shift; while [[ $# -gt 0 && "$1" != --* ]]; do keys+=("$1"); shift; done ;;
    --no-append-eod) append_eod=0; shift ;;
    --remove-shards) remove=1; shift ;;
    --log-dir) log_dir=$2; shift 2 ;;
    --sbatch-args) sbatch_args=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$tokenizer" ]] || die "--tokenizer-model is required"
[[ -f "$tokenizer" ]] || die "tokenizer $tokenizer not found"
[[ -n "$output_prefix" ]] || die "--output-prefix is required"
[[ -n "$files_from" || ${#patterns[@]} -gt 0 ]] || die "give --input PATTERN... or --files-from LIST"
[[ "$mode" == strided || "$mode" == contiguous ]] || die "--mode must be strided or contiguous"
[[ ${#keys[@]} -gt 0 ]] || keys=(text)
command -v sbatch >/dev/null || die "sbatch not found; run this on a Slurm login node"

abspath() { "$python" -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "$1"; }
output_prefix=$(abspath "$output_prefix")
tokenizer=$(abspath "$tokenizer")
shard_dir="$output_prefix.shards"
mkdir -p "$shard_dir" "$log_dir"
list="$shard_dir/files.txt"
if [[ -n "$files_from" ]]; then
  [[ -f "$files_from" ]] || die "file list $files_from not found"
  grep -v '^[[:space:]]*$' "$files_from" | while read -r f; do abspath "$f"; done > "$list.tmp"
else
  "$python" -c 'import os, sys
from nvium_dist.data.inputs import expand_inputs
print("\n".join(os.path.abspath(f) for f in expand_inputs(sys.argv[1:])))' "${patterns[@]}" > "$list.tmp" \
    || die "could not expand --input ${patterns[*]}"
fi
mv "$list.tmp" "$list"
nfiles=$(grep -c . "$list" || true)
(( nfiles > 0 )) || die "no input files"
shards=${shards:-$(( nfiles < 16 ? nfiles : 16 ))}
(( shards >= 1 )) || die "--shards must be >= 1"
if (( shards > nfiles )); then
  echo "submit_preprocess.sh: only $nfiles files; using $nfiles shards instead of $shards" >&2
  shards=$nfiles
fi
rm -f "$shard_dir"/shard_*   # a previous submission's shards must not be merged into this one

pp_args=(--json-keys "${keys[@]}" --tokenizer-model "$tokenizer" --workers "$workers")
(( append_eod )) && pp_args+=(--append-eod)
pp_args+=("${extra[@]}")
# shellcheck disable=SC2206
common=(--parsable ${sbatch_args})

array_id=$(sbatch "${common[@]}" --array="0-$((shards - 1))" --cpus-per-task="$workers" \
  --output="$log_dir/%x-%A_%a.out" \
  "$here/preprocess.sbatch" --files-from "$list" --shard-dir "$shard_dir" --mode "$mode" -- "${pp_args[@]}")
array_id=${array_id%%;*}
merge_args=(--shard-dir "$shard_dir" --num-shards "$shards" --output-prefix "$output_prefix" --json-keys "${keys[@]}")
(( remove )) && merge_args+=(--remove-shards)
merge_id=$(sbatch "${common[@]}" --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
  --output="$log_dir/%x-%j.out" "$here/merge.sbatch" "${merge_args[@]}")
merge_id=${merge_id%%;*}
echo "preprocess array job $array_id ($shards tasks, $nfiles files, $mode) -> $shard_dir"
echo "merge job $merge_id (after the array succeeds) -> ${output_prefix}_<key>_document.bin/.idx"
echo "$array_id $merge_id"
