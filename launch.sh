#!/usr/bin/env bash
# Set-up and the named jobs. Every job creates/reuses .venv first (idempotent).
#
#   ./launch.sh setup                      create/refresh .venv (runtime deps)
#   ./launch.sh setup gpu                  the same plus JAX's CUDA build of the installed jax
#                                          (CUDA 13, or 12 where the driver has no 13; done by
#                                          every job when nvidia-smi sees a GPU; use it where
#                                          none is visible: login nodes, container builds)
#   ./launch.sh quickstart                 ViT and DiffViT on the embedded digits data (CPU, minutes)
#   ./launch.sh test                       the test suite (installs the test extra: pytest, torch, timm)
#   ./launch.sh tiny_imagenet [protocol] [sizes] [seeds] [--dry_run|--status|--slurm ...]
#                                          the six experiments x seeds (the sweep,
#                                          diffvit_jax/tools/sweep.py): protocol v2|seed (default
#                                          v2), sizes "10m 20m 30m", seeds "0 1 2"; the plan, then
#                                          one run per GPU (the next on the first that frees), the
#                                          report; --dry_run: the plan only; --status: each run's
#                                          state; --slurm: sbatch scripts (a job array + report)
#   ./launch.sh report [RUN_DIR...]        plots and tables from runs/ (default: every run)
#   ./launch.sh multihost N [main.py flags...]
#                                          N training processes on this machine (CPU devices,
#                                          coordinator on 127.0.0.1), as a multi-host job runs;
#                                          see diffvit_jax/tools/multihost.py for its own flags
#   ./launch.sh gpu_rehearsal [--targets h100,a100,rtx4090] [--protocols v2,seed] [--sizes ...]
#                                          every experiment compiled for NVIDIA GPUs without one
#                                          -> benchmarks/gpu_rehearsal.{json,md}
#   ./launch.sh gpu_check [--dry_run] [--out DIR]
#                                          what only a GPU can tell (<10 min on one H100/H200):
#                                          -> benchmarks/gpu_check.{json,md}; --dry_run: CPU, tiny
#   ./launch.sh clutter [seeds] [sweep flags]
#                                          the clutter study (CPU, < 1 h on 2 cores): ViT vs
#                                          DiffViT on cluttered digits at 0/4/8/16 fragments,
#                                          seeds "0 1 2" by default; runs/clutter, then the
#                                          verdict per level, the interaction and the attention
#                                          shares in reports/clutter/report.md
#   ./launch.sh study [seeds]              ViT vs DiffViT on digits (CPU), seeds "0 1 2 3 4" by
#                                          default: runs/study/<arch>/seed<k>, then the verdict
#                                          with its confidence interval in reports/study/report.md
#
# Environment: PYTHON (interpreter for the venv, default python3), VENV (default .venv), EXTRA_ARGS (appended to
# every training command, e.g. "--config.train.steps=100"), TFDS_DATA_DIR (where Tiny
# ImageNet is built, default ~/tensorflow_datasets; put tiny-imagenet-200.zip in
# $TFDS_DATA_DIR/downloads/manual to skip the download).
set -euo pipefail
cd "$(dirname "$0")"

VENV="${VENV:-.venv}"
PY="$VENV/bin/python"

setup() {  # setup [extra|gpu]: install the package (and an extra) once per pyproject.toml version
  local extra="${1:-}" gpu=""
  if [ "$extra" = gpu ]; then extra="" gpu=1; elif [ "$(num_gpus)" -gt 0 ]; then gpu=1; fi
  if [ ! -x "$PY" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
  fi
  local stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)${extra:+-$extra}"
  if [ ! -f "$stamp" ]; then
    echo "== installing diffvit_jax${extra:+[$extra]} into $VENV"
    "$PY" -m pip install -q -e ".${extra:+[$extra]}"
    touch "$stamp"
  fi
  # The tests compile for NVIDIA GPUs without one (the GPU rehearsal): JAX's CUDA 13 plugin,
  # on the CUDA 13 libraries torch brought (no second copy of cuDNN).
  if [ "$extra" = test ]; then install_cuda_plugin 13 plugin; fi
  if [ -n "$gpu" ]; then install_cuda_plugin "$(driver_cuda_major)" runtime; fi
  check_cuda_env
}

driver_cuda_major() {  # the CUDA major the driver supports (nvidia-smi), 13 where none says
  local version
  version=$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9]*' | grep -o '[0-9]*$' || true)
  if [ -n "$version" ] && [ "$version" -lt 13 ]; then echo 12; else echo 13; fi
}

install_cuda_plugin() {  # install_cuda_plugin 12|13 plugin|runtime: JAX's CUDA build, once
  # Of the very jax version installed (never -U, which takes the newest jax). 'plugin': the
  # plugin alone (compiles; the cuDNN comes from torch's CUDA 13 wheels); 'runtime': jax[cudaN],
  # with every CUDA library a GPU run loads. One CUDA major per venv: the two write the same
  # library paths (nvidia/cudnn/lib/libcudnn.so.9, ...), so a venv holding the other is refused.
  local major="$1" kind="$2" other jax_version
  other=$([ "$major" = 12 ] && echo 13 || echo 12)
  jax_version=$("$PY" -c 'import importlib.metadata as m; print(m.version("jax"))')
  local stamp="$VENV/.cuda$major-$kind-jax-$jax_version"
  [ -f "$stamp" ] && return 0
  if "$PY" -m pip show -q "jax-cuda$other-plugin" "nvidia-cudnn-cu$other" >/dev/null 2>&1; then
    {
      echo "error: $VENV holds CUDA $other libraries (JAX's CUDA $other plugin, or torch's cuDNN"
      echo "from the test extra) and this step needs CUDA $major; the two overwrite each other's"
      echo "files. Use another venv for it: VENV=.venv-cuda$major ./launch.sh ... (README: GPU set-up)."
    } >&2
    exit 1
  fi
  echo "== installing JAX's CUDA $major ${kind} for jax $jax_version into $VENV"
  if [ "$kind" = runtime ]; then "$PY" -m pip install -q "jax[cuda$major]==$jax_version"
  else "$PY" -m pip install -q "jax-cuda$major-plugin==$jax_version" "jax-cuda$major-pjrt==$jax_version"; fi
  touch "$stamp"
}

check_cuda_env() {  # no venv whose JAX CUDA plugin loads another CUDA's libraries
  local problem
  problem=$(JAX_PLATFORMS=cpu "$PY" -c \
    'from diffvit_jax import targets; print(targets.cuda_env_problem() or "")' 2>&1 | tail -n 1)
  if [ -n "$problem" ]; then
    echo "error: $VENV: $problem. Remove $VENV and run the set-up again (README: GPU set-up)." >&2
    exit 1
  fi
}

require_cuda() {  # jobs that expect a GPU run on it (JAX_PLATFORMS=cuda) or stop saying why
  if [ -n "${JAX_PLATFORMS:-}" ]; then return 0; fi  # the user chose the platforms
  local err  # checked before JAX_PLATFORMS=cuda is set: JAX's error then names the cause
  if ! err=$("$PY" -c 'import jax; jax.devices("cuda")' 2>&1); then
    {
      echo "error: this job expects an NVIDIA GPU, and JAX in $VENV cannot use one. Rather than"
      echo "run on the CPU, it stops: install the CUDA build of jaxlib with './launch.sh setup gpu'"
      echo "(README: GPU set-up) and run it again; if it is installed, JAX says what else is wrong:"
      echo "  $(tail -n 1 <<<"$err")"
    } >&2
    exit 1
  fi
  export JAX_PLATFORMS=cuda
}

train() {  # train CONFIG WORKDIR [flags...]
  local config="$1" workdir="$2"
  shift 2
  # shellcheck disable=SC2086
  "$PY" -m diffvit_jax.main --config "$config" --workdir "$workdir" "$@" ${EXTRA_ARGS:-}
}

host_cores() {  # the cores this process may run on (its affinity: a cgroup or SLURM cpuset)
  "$PY" -c 'import os; print(len(os.sched_getaffinity(0)))' 2>/dev/null || echo 1
}

progress() {  # progress ROOT PID...: every 15 s, each run's last progress line, while any runs
  local root="$1" line arch n=0
  shift
  while kill -0 "$@" 2>/dev/null; do
    sleep 1
    n=$((n + 1))
    [ $((n % 15)) -eq 0 ] || continue
    line=""
    for arch in vit diffvit; do
      line+="$arch $(grep -o '[0-9.]* steps/s, [0-9.]*% ([0-9]*/[0-9]*)' \
        "$root/$arch/train.log" 2>/dev/null | tail -n 1 || true)   "
    done
    echo "   $line"
  done
}

quickstart() {
  setup
  local root=runs/quickstart start=$SECONDS shares=1 pids=() arch i
  # Both models at once, each pinned to its own share of the cores where there are two:
  # their tiny steps gain little from a second thread (benchmarks/RESULTS.md, "Quickstart:
  # two runs at once"). Elsewhere one after the other.
  if [ "$(host_cores)" -ge 2 ]; then shares=2; fi
  for arch in vit diffvit; do
    mkdir -p "$root/$arch"
    if [ "$shares" -eq 2 ]; then
      echo "== training $arch on digits (CPU, cores share ${#pids[@]}/2) -> $root/$arch" \
        "(log: $root/$arch/train.log)"
      DIFFVIT_CPU_SHARE="${#pids[@]}/2" JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
        train "configs/digits.py:$arch" "$root/$arch" >"$root/$arch/train.log" 2>&1 &
      pids+=($!)
    else
      echo "== training $arch on digits (CPU) -> $root/$arch"
      JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" train "configs/digits.py:$arch" "$root/$arch"
    fi
  done
  if [ "$shares" -eq 2 ]; then
    trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM  # each run saves and exits
    progress "$root" "${pids[@]}"
  fi
  i=0
  for arch in vit diffvit; do
    [ "$shares" -eq 2 ] || break
    if ! wait "${pids[$i]}"; then
      kill -TERM "${pids[@]}" 2>/dev/null || true  # the other run saves and stops too
      wait || true
      tail -n 20 "$root/$arch/train.log" >&2
      echo "training $arch stopped (interrupted or failed), see $root/$arch/train.log;" \
        "rerun ./launch.sh quickstart to resume both" >&2
      exit 1
    fi
    i=$((i + 1))
  done
  echo "== training took $((SECONDS - start)) s"
  "$PY" - "$root" <<'PYEOF'
import json, os, sys
root = sys.argv[1]
print(f"{'model':10s} {'params':>8s} {'val top-1':>9s} {'val loss':>8s} {'train s':>8s}")
for arch in ("vit", "diffvit"):
  with open(os.path.join(root, arch, "run_info.json")) as f:
    info = json.load(f)
  ev = info["final_eval"]
  print(f"{arch:10s} {info['params']:8d} {ev['top1']:9.4f} {ev['loss']:8.4f} "
        f"{info['train_seconds']:8.1f}")
print(f"\nTensorBoard logs: {os.path.abspath(root)}   (tensorboard --logdir {root})")
PYEOF
}

run_tests() {
  setup test
  # loadfile: each test module runs on one worker, so its module-scoped training runs happen
  # once. (xdist's loadgroup would be finer, but pytest 9.2 no longer honours its marks.)
  "$PY" -m ruff check --quiet .
  "$PY" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
}

num_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else echo 0; fi
}

tiny_imagenet() {  # tiny_imagenet [protocol] [sizes] [seeds] [sweep flags...]: the sweep
  setup
  local positional=() flags=() data_dir="${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}" plan_only=""
  for arg in "$@"; do  # positionals first; from the first flag on, everything is a flag
    if [ "${#flags[@]}" -eq 0 ] && [ "${arg#-}" = "$arg" ]; then positional+=("$arg")
    else flags+=("$arg"); fi
    case "$arg" in --dry_run | --dry_run=true | --status | --status=true) plan_only=1 ;; esac
  done
  local protocol="${positional[0]:-v2}" sizes="${positional[1]:-10m 20m 30m}"
  local seeds="${positional[2]:-0 1 2}"
  if [ "$(num_gpus)" -gt 0 ]; then require_cuda; fi
  # Download (or take from $data_dir/downloads/manual) and build once; a no-op when built.
  # Not for a plan or a look at the state, which must not start a download.
  if [ -z "$plan_only" ]; then
    "$PY" -m diffvit_jax.data.prepare tiny_imagenet --data_dir "$data_dir"
  fi
  # The queue, its plan, status, SLURM scripts and the report: diffvit_jax/tools/sweep.py.
  # shellcheck disable=SC2086
  "$PY" -m diffvit_jax.tools.sweep --protocol "$protocol" --sizes "$sizes" --seeds "$seeds" \
    --config.data.dir="$data_dir" ${flags[@]+"${flags[@]}"} ${EXTRA_ARGS:-}
}

report() {
  setup
  if [ "$#" -eq 0 ]; then
    mapfile -t dirs < <(find runs -name run_info.json -printf '%h\n' 2>/dev/null | sort)
    set -- "${dirs[@]}"
  fi
  "$PY" -m diffvit_jax.reporting.report "$@" --out reports
}

gpu_rehearsal() {  # the experiments compiled for NVIDIA GPUs, on this machine, without one
  setup test
  JAX_PLATFORMS=cpu "$PY" -m diffvit_jax.tools.gpu_rehearsal "$@"
}

gpu_check() {
  setup
  case " $* " in *" --dry_run "* | *" --dry_run=true "*) ;; *) require_cuda ;; esac
  "$PY" -m diffvit_jax.tools.gpu_check "$@"
}

study() {  # study [seeds]: paired seeds of ViT and DiffViT, so the report can draw a verdict
  setup
  local seeds="${1:-0 1 2 3 4}" root=runs/study start=$SECONDS workdirs=()
  # The study's design (family, margin, planned seeds) in $root/study.json before any run
  # trains; kept on a rerun, and a rerun with another design is refused.
  # shellcheck disable=SC2086
  JAX_PLATFORMS=cpu "$PY" -m diffvit_jax.reporting.manifest --out "$root/study.json" \
    --config configs/digits.py --seeds "$seeds" ${EXTRA_ARGS:-} || exit 1
  # Seed-major: stopped early, the runs done so far are still complete pairs.
  for seed in $seeds; do
    for arch in vit diffvit; do
      local workdir="$root/$arch/seed$seed"
      workdirs+=("$workdir")
      # Skipped only when it holds a finished run of exactly the requested config (EXTRA_ARGS
      # included); a run of another config is refused, never mixed into the verdict.
      local matches=0
      # shellcheck disable=SC2086
      JAX_PLATFORMS=cpu "$PY" -m diffvit_jax.reporting.runs --matches "$workdir" \
        --config "configs/digits.py:$arch" --config.train.seed="$seed" ${EXTRA_ARGS:-} \
        >/dev/null || matches=$?
      if [ "$matches" -eq 0 ]; then
        echo "== $arch seed $seed: already trained in $workdir"
        continue
      fi
      [ "$matches" -eq 1 ] || exit 1  # another config (named above): not overwritten
      echo "== training $arch seed $seed on digits (CPU) -> $workdir"
      mkdir -p "$workdir"
      JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" train "configs/digits.py:$arch" "$workdir" \
        --config.train.seed="$seed" >"$workdir/train.log" 2>&1 \
        || { echo "training failed, see $workdir/train.log" >&2; exit 1; }
    done
  done
  echo "== training took $((SECONDS - start)) s"
  "$PY" -m diffvit_jax.reporting.report "${workdirs[@]}" --out reports/study \
    --manifest "$root/study.json"
}

clutter() {  # clutter [seeds] [sweep flags...]: the clutter study (configs/clutter.py)
  setup
  local seeds="${1:-0 1 2}" levels slots
  shift || true
  levels=$("$PY" -c 'import sys; sys.path.insert(0, "configs"); import clutter; print(*clutter.LEVELS)')
  # One slot per core, at most one per 2 GiB of memory (a run holds about 1.6 GiB).
  slots=$("$PY" -c 'import os; print(int(os.sysconf("SC_PAGE_SIZE")
  * os.sysconf("SC_PHYS_PAGES") / 2**31))' 2>/dev/null || echo 1)
  slots=$(( slots < $(host_cores) ? slots : $(host_cores) ))
  slots=$(( slots > 0 ? slots : 1 ))
  # The sweep: the design in runs/clutter/clutter/study.json first, one run per core (each
  # pinned to its own), finished runs skipped, failures recorded, then the report.
  # shellcheck disable=SC2086
  JAX_PLATFORMS=cpu "$PY" -m diffvit_jax.tools.sweep --study clutter --protocol clutter \
    --sizes "$levels" --seeds "$seeds" --devices "cpu:$slots" --root runs/clutter \
    --reports reports/clutter "$@" ${EXTRA_ARGS:-}
}

cmd="${1:-}"
shift || true
case "$cmd" in
  setup) setup "$@" ;;
  quickstart) quickstart ;;
  test) run_tests "$@" ;;
  tiny_imagenet) tiny_imagenet "$@" ;;
  report) report "$@" ;;
  study) study "$@" ;;
  clutter) clutter "$@" ;;
  multihost) setup && "$PY" -m diffvit_jax.tools.multihost "$@" ;;
  gpu_check) gpu_check "$@" ;;
  gpu_rehearsal) gpu_rehearsal "$@" ;;
  *) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 2 ;;
esac
