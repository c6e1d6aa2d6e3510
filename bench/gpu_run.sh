#!/usr/bin/env bash
# The GPU benchmarks on a lent machine (python 3.12, torch preinstalled; zarr & co. carried as wheels in .whl/, made
# here by `bash bench/gpu_wheels.sh`). Results land in $OUT (or bench/results).
# Usage: bash bench/gpu_run.sh [fit|all|s2t|distill|capture|store|methods|loader|students|distributed|quality|trl]
# `fit` (the default) is what one 15-minute lend holds with room for a rerun: the s2t memory, offline vs online
# distillation and the loader rows, ~7 min at their caps (s2t 1 min, distill 4, loader 2). `capture` (2.5 min) is
# the next call if time is left. `all` runs every part at full size, each stopping at its own cap (s2t 2 min,
# capture 5, distill 7, store 7, loader 7, methods 9.5, students 9.5, distributed 7 and only with 2+ GPUs: 47-54 min).
# `quality` (8 min, its own call): the quality recipe's `gpu` size built and ranked there (configs/quality.toml):
# does the cross-tokenizer ranking of the CPU's `full` size hold with a larger world, vocabularies and models?
# `trl` (issue 26, its own call, ~9 min at its caps; needs trl and datasets among the wheels: `bash
# bench/gpu_wheels.sh trl`; not yet run on a device): our uld against TRL GOLD's ULD on the GPU, whole runs of the
# published shapes (TRL GOLD online / ours online / cache-teacher + store, 1 student, 2 epochs) and the step split.
# DEVICE, TEACHER_SHAPE and STUDENT_SHAPE override cuda / qwen1.5-1.8b / gpt2 (a CPU smoke test of the commands:
# DEVICE=cpu TEACHER_SHAPE=tiny-qwen2 STUDENT_SHAPE=tiny-gpt2 OUT=/tmp/gpu_run_smoke bash bench/gpu_run.sh fit).
# A part that fails (or stops at its time cap: exit 124) is printed as FAILED when it happens, listed in
# $res/gpu_run-failed.txt, and the script exits 1 after running the other parts.
set -uo pipefail
what=${1:-fit}
res=${OUT:-bench/results}
dev=${DEVICE:-cuda}
teacher=${TEACHER_SHAPE:-qwen1.5-1.8b}
student=${STUDENT_SHAPE:-gpt2}
mkdir -p "$res"
rm -f "$res/gpu_run-failed.txt"
failed=()
part() {  # part NAME COMMAND...: run one part; a failure is recorded, not swallowed
  local name=$1 rc
  shift
  "$@"
  rc=$?
  if (( rc != 0 )); then
    echo "FAILED: $name (exit $rc$( ((rc == 124)) && echo ', stopped at its time cap'))" >&2
    failed+=("$name: exit $rc")
    echo "$name: exit $rc" >> "$res/gpu_run-failed.txt"
  fi
}
if [ -d .whl ] && command -v nvidia-smi >/dev/null; then  # the lent machine (here .whl is for its Python)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/.ns || exit 1
fi
# The project's folders import as dskd_pipe.*: make that namespace without installing (no network there).
mkdir -p .ns/dskd_pipe && for d in pipeline cache stages configs; do ln -sfn "$PWD/$d" ".ns/dskd_pipe/$d"; done
for f in __init__.py losses.py; do ln -sfn "$PWD/dskd_pipe/$f" ".ns/dskd_pipe/$f"; done  # the public surface
export PYTHONPATH=${PYTHONPATH:-}:$PWD/.ns PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"
python3 -c "import torch, transformers, zarr; print('torch', torch.__version__, 'transformers', transformers.__version__, 'zarr', zarr.__version__)"
if [[ $what == fit ]]; then
  SECONDS=0
  part s2t timeout 60 python3 bench/s2t_memory.py --device "$dev" --tokens 8192 --vocab 151936 --d-teacher 2048 \
    --out "$res"
  echo "s2t: ${SECONDS}s"
  part distill timeout 240 python3 bench/distill_offline_vs_online.py --teacher-shape "$teacher" \
    --student-shape "$student" \
    --device "$dev" --limit 64 --max-length 512 --micro-batch-size 4 --grad-accum 4 --steps 4 --num-workers 4 \
    --out "$res"
  echo "s2t + distill: ${SECONDS}s"
  part loader timeout 120 python3 bench/loader.py --device "$dev" --workers 0,2,4,8 --kb-per-token 4 --steps 20 \
    --dir /tmp/loader_bench --out "$res"
  echo "s2t + distill + loader: ${SECONDS}s"
fi
if [[ $what == all || $what == s2t ]]; then
  part s2t timeout 120 python3 bench/s2t_memory.py --device "$dev" --tokens 8192 --vocab 151936 --d-teacher 2048 \
    --out "$res"
fi
if [[ $what == all || $what == capture ]]; then
  # the full set: ~2,000 records; alone after `fit`, 400 records keep it within 2.5 min
  n=$([[ $what == capture ]] && echo 400 || echo 0)
  part capture timeout $([[ $what == capture ]] && echo 150 || echo 300) python3 bench/capture.py \
    --teacher-shape qwen1.5-1.8b \
    --device "$dev" --examples "$n" --out-dir /tmp/capture --results "$res"
fi
if [[ $what == all || $what == distill ]]; then
  part distill timeout 420 python3 bench/distill_offline_vs_online.py --teacher-shape "$teacher" \
    --student-shape "$student" \
    --device "$dev" --limit 256 --max-length 512 --micro-batch-size 4 --grad-accum 8 --steps 6 --num-workers 4 \
    --out "$res"
fi
if [[ $what == all || $what == methods ]]; then
  # every distill method vs dskd-cma: Qwen1.5-1.8B -> GPT-2 and GPT-2 1.5B -> GPT-2 shapes, batch 4 x 512 (issue 5);
  # a dedicated GPU: isolated timing (one process per method) fits the time limit, paired would double the set-ups
  part methods timeout 570 python3 bench/methods.py --shape gpu --device "$dev" --timing isolated \
    --work /tmp/methods_bench \
    --out "$res"
fi
if [[ $what == all || $what == store ]]; then
  part store timeout 400 python3 bench/store_read.py --gb 4 --dir /tmp/store_bench --out "$res/store_read-gpu-host.json"
fi
if [[ $what == all || $what == loader ]]; then
  # the DataLoader path against a simulated GPU step (sleep kernel), pinned memory and real H2D copies (issue 15)
  part loader timeout 420 python3 bench/loader.py --device "$dev" --workers 0,1,2,4,8 --steps 30 \
    --dir /tmp/loader_bench \
    --out "$res"
fi
if [[ $what == all || $what == students ]]; then
  # one cache + N students vs N online runs, N = 1, 3, 10 (issue 15); Qwen1.5-1.8B -> GPT-2 shapes
  part students timeout 570 python3 bench/many_students.py --teacher-shape "$teacher" --student-shape "$student" \
    --device "$dev" \
    --limit 128 --max-length 512 --micro-batch-size 8 --grad-accum 1 --num-workers -1 --students 10 --out "$res"
fi
if [[ $what == all || $what == distributed ]]; then
  # DDP / FSDP2 / one process on the node's GPUs (issue 12); one GPU has nothing to compare
  ngpu=$(nvidia-smi -L | wc -l)
  if (( ngpu >= 2 )); then
    part distributed timeout 420 python3 bench/distributed.py --student-size 200m --nproc "$ngpu" --device "$dev" \
      --micro-batch-size 4 \
      --steps 10 --out "$res/distributed-gpu-200m.json"
  else
    echo "distributed bench skipped: $ngpu GPU(s), it compares 2+ processes against one"
  fi
fi
if [[ $what == quality ]]; then
  # everything built on the device: world, tokenizers, teacher SFT, student bases, store, students, scores; a rerun
  # of the same command in the same --out reuses what finished (a cut-off call loses only the step it was in): a part
  # "quality" FAILED at exit 124 stopped at its cap, rerun to continue
  SECONDS=0
  part quality timeout 480 python3 -m dskd_pipe recipe quality --size gpu \
    --out /tmp/quality_gpu --no-progress
  echo "quality: ${SECONDS}s"
  mkdir -p "$res/quality_gpu" && cp /tmp/quality_gpu/summary.* /tmp/quality_gpu/timings.jsonl \
    /tmp/quality_gpu/tokenizers/agreement.json "$res/quality_gpu/" 2>/dev/null
fi
if [[ $what == trl ]]; then
  SECONDS=0
  part trl_parity timeout 60 python3 bench/trl_gold_parity.py --device "$dev" --out "$res"
  part whole_runs timeout 360 python3 bench/whole_runs.py --teacher-shape "$teacher" --student-shape "$student" \
    --device "$dev" --limit 64 --max-length 512 --micro-batch-size 8 --epochs 2 --students 1 --out "$res"
  part step_breakdown timeout 120 python3 bench/step_breakdown.py --teacher-shape "$teacher" --student-shape \
    "$student" --device "$dev" --limit 32 --max-length 512 --steps 3 --out "$res"
  echo "trl: ${SECONDS}s"
fi
ls -la "$res"
if (( ${#failed[@]} )); then
  printf 'FAILED parts (also in %s):\n' "$res/gpu_run-failed.txt" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
