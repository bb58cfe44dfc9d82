#!/usr/bin/env bash
# Every GPU check of bench/RESULTS.md in one call (about 9 minutes on an H200), for a machine lent for minutes:
# the training-step bench, the real-size end-to-end runs, the compiled settings and two profiles, each under
# its own time limit so one hang cannot cost the others. Results go to $OUT (default /tmp/gpu_out).
#
#   bash bench/gpu_session.sh              # with anima-train installed (pip install -e '.[cuda]')
#   bash bench/gpu_session.sh nccl latent_cache     # only these steps (names below)
#
# On a machine where the project cannot be installed, put the wheels of the missing packages in .whl/ first:
# they are installed into /tmp/site, and the checkout is used in place (plugins/ as anima_plugins).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  ln -sfn "$PWD/plugins" /tmp/site/anima_plugins
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
step() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - started)) s" | tee -a "$OUT/steps.txt"
}
{
  nvidia-smi
  python3 -c "import torch, transformers, diffusers, bitsandbytes, accelerate; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'bitsandbytes', bitsandbytes.__version__, 'accelerate', accelerate.__version__)"
} >"$OUT/env.txt" 2>&1
run_bench() {
  step bench 200 python3 bench/bench_train.py --steps 8 --warmup 3 --json "$OUT/bench.json" \
    --settings plain,gc,unsloth,swap18,swap26,fp8,b4,b4_gc
}
run_real_size() { step real_size 200 python3 bench/real_size_run.py --root /tmp/real-size --json "$OUT/real_size.json"; }
run_compile() {
  step bench_compile 120 python3 bench/bench_train.py --steps 8 --warmup 3 --json "$OUT/bench_compile.json" \
    --settings plain+compile,gc+compile
}
run_profiles() {
  step profile_plain 30 python3 bench/bench_train.py --profile plain --steps 3 --warmup 2
  step profile_gc 30 python3 bench/bench_train.py --profile gc --steps 3 --warmup 2
}
# One run as before and the same run started by torchrun: one process in an NCCL group (issue 19).
run_nccl() {
  step nccl 260 python3 bench/real_size_run.py --root /tmp/real-size --variants adamw8bit --launchers none,torchrun \
    --steps 30 --json "$OUT/nccl.json"
}
# Issue 29 in one call (about 13 minutes; the whole of a 15-minute loan): our step for sd-scripts' settings
# eager, compiled (the CUDA default), compiled with the fused LoRA GEMM and as CUDA graphs, plus selective
# checkpointing, one profile, then sd-scripts on this card (the kit of ../shared/bench/sdscripts-kit copied
# to .anchors/kit, sd-scripts in .anchors/sd-scripts, its pinned wheels in .whl-sd/, all carried). The kit
# installs its wheels into /tmp/site, so it runs last, after our bench has imported its own packages.
run_floor() {
  step floor 330 python3 bench/bench_train.py --steps 8 --warmup 3 --json "$OUT/floor.json" \
    --settings plain,plain+compile,plain+compile+fused,plain+graphs,gc,gc+compile,gc+compile+fused,selective,selective+compile,swap26,swap26+compile,fp8+compile,b4+compile
  step profile_floor 60 python3 bench/bench_train.py --profile plain+compile+fused --steps 3 --warmup 2
  if [ -d .anchors/kit ]; then
    step sdscripts 330 env SD_SCRIPTS=.anchors/sd-scripts WHL_DIR=.whl-sd BENCH_CONFIGS="nogc gc" BENCH_STEPS=20 \
      BENCH_BUDGET_S=300 bash .anchors/kit/run_sdscripts.sh
  fi
}
# Issue 30 (about 8 minutes): Anima 2B full fine-tuning through the command line, Adafactor with the fused
# backward pass and checkpointing (sd-scripts reports 23-24 GB on a 4090; the planner predicts its peak and the
# run logs prediction beside measurement), then the same with 14 blocks swapped.
run_full() {
  step full 480 python3 bench/real_size_run.py --root /tmp/real-size --variants full_fused,full_fused_swap14 \
    --steps 6 --json "$OUT/full.json"
}
run_latent_cache() { step latent_cache 120 python3 bench/bench_latent_cache.py --n 96 --json "$OUT/latent_cache.json"; }
# Issue 24's data-path rates on two otherwise idle cores: this checkout against commit 0c54742, which must be
# unpacked in .before/ first (git archive 0c54742 anima_core | tar -x -C .before).
run_data_2cores() {
  step data_before 150 taskset -c 0,1 python3 bench/bench_data.py --sizes 1000,5000 --code .before \
    --json "$OUT/data_before.json"
  step data_after 150 taskset -c 0,1 python3 bench/bench_data.py --sizes 1000,5000 --repeat 2 --json "$OUT/data_after.json"
}
for name in "${@:-bench real_size compile profiles}"; do
  for one in $name; do "run_$one"; done
done
