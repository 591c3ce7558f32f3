#!/usr/bin/env bash
# One prepared check on an accelerator machine, under 7 minutes on one GPU:
#
#   1. which device JAX and torch use (JAX's CUDA plugin is installed if JAX has no GPU);
#   2. the training-step benchmark, Flax against timm, on the GPU (bench_train_step);
#   3. the regularizer-overhead benchmark (bench_regularizers);
#   4. the LPWD paper's base cell on CIFAR-10 from the image-folder zip: ConvNeXt-T, Adam 1e-4,
#      lambda 1e-2, batch 512, WD and then LPWD for the same epochs, as many as the rest of the
#      budget allows (paper_cell.py).
#
# Each part runs under its own time limit, all of them under one overall budget, and writes
# JSON into the output directory: devices.json, train_step.json, regularizers.json,
# paper_cell.json (the runs themselves in paper_cell/), and device_check.json, which lists every
# part's status (ok, failed, timed_out, skipped), exit code and wall time.
#
#   bash experiments/benchmarks/device_check.sh --output_dir /tmp/device_check
#   bash experiments/benchmarks/device_check.sh --quick   # CPU, tiny sizes, about a minute
#
# Without network access, install JAX's CUDA plugin from downloaded wheels:
# PIP_NO_INDEX=1 PIP_FIND_LINKS=<folder of wheels> bash experiments/benchmarks/device_check.sh
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python}"

usage() {
  cat <<EOF
usage: device_check.sh [--quick] [--output_dir DIR] [--data ZIP] [--budget_s S]
                       [--device cpu|cuda] [--no_install]

  --quick        CPU, tiny sizes: a couple of steps of each part (the digits dataset unless
                 --data is given). For testing this script.
  --output_dir   where the JSON goes (default: a fresh temporary directory).
  --data         the CIFAR-10 image-folder zip (default: <repo>/../shared/data/cifar10-jpeg.zip).
  --budget_s     overall time limit in seconds (default 420; 300 with --quick). The paper
                 cell gets what the other parts leave.
  --device       cuda (default) or cpu (default with --quick).
  --no_install   never pip install (JAX's CUDA plugin, this project).
EOF
}

QUICK=0
OUTPUT_DIR=""
DATA=""
BUDGET_S=""
DEVICE=""
INSTALL=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --output_dir) OUTPUT_DIR="$2"; shift ;;
    --output_dir=*) OUTPUT_DIR="${1#*=}" ;;
    --data) DATA="$2"; shift ;;
    --data=*) DATA="${1#*=}" ;;
    --budget_s) BUDGET_S="$2"; shift ;;
    --budget_s=*) BUDGET_S="${1#*=}" ;;
    --device) DEVICE="$2"; shift ;;
    --device=*) DEVICE="${1#*=}" ;;
    --no_install) INSTALL=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "device_check.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [[ $QUICK == 1 ]]; then
  : "${DEVICE:=cpu}" "${BUDGET_S:=300}"
else
  : "${DEVICE:=cuda}" "${BUDGET_S:=420}"
fi
if [[ $DEVICE != cpu && $DEVICE != cuda ]]; then
  echo "device_check.sh: --device must be cpu or cuda, got '$DEVICE'" >&2
  exit 2
fi
if [[ -z $DATA && $QUICK == 1 ]]; then
  DATASET="digits"
else
  DATA="${DATA:-$REPO/../shared/data/cifar10-jpeg.zip}"
  if [[ ! -f $DATA ]]; then
    echo "device_check.sh: no CIFAR-10 zip at $DATA (pass --data)" >&2
    exit 2
  fi
  DATASET="folder:$(cd "$(dirname "$DATA")" && pwd)/$(basename "$DATA")"
fi
if [[ -z $OUTPUT_DIR ]]; then
  OUTPUT_DIR="$(mktemp -d -t device_check.XXXXXX)"
fi
mkdir -p "$OUTPUT_DIR"
OUTPUT_DIR="$(cd "$OUTPUT_DIR" && pwd)"
PARTS="$OUTPUT_DIR/parts.jsonl"
: >"$PARTS"

START=$SECONDS
export TF_CPP_MIN_LOG_LEVEL=2
# Flax and torch share each benchmark process: JAX takes GPU memory as it needs it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [[ $DEVICE == cpu ]]; then
  export JAX_PLATFORMS=cpu
fi

echo "device_check: device $DEVICE, quick $QUICK, budget ${BUDGET_S} s, output $OUTPUT_DIR"

# record NAME RC WALL_S LIMIT_S: one line of parts.jsonl, and one on the terminal.
record() {
  local status
  if (($2 == 124 || $2 == 137)); then status=timed_out; elif (($2 == 0)); then status=ok; else status=failed; fi
  echo "== $1: $status (exit $2, $3 s)"
  printf '{"part": "%s", "status": "%s", "rc": %d, "wall_s": %d, "limit_s": %d}\n' \
    "$1" "$status" "$2" "$3" "$4" >>"$PARTS"
}

# run_part NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, what is left of the budget).
run_part() {
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((limit > left)); then limit=$left; fi
  if ((limit < 10)); then
    echo "== $name: skipped, ${left} s of the budget left"
    printf '{"part": "%s", "status": "skipped", "rc": null, "wall_s": 0, "limit_s": 0}\n' \
      "$name" >>"$PARTS"
    return 0
  fi
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  record "$name" $? $((SECONDS - t0)) "$limit"
}

# ---------------------------------------------------------------------------------------------
# 0. What is installed: this project, and JAX's CUDA plugin when JAX sees no GPU.

pip_install() {
  timeout --kill-after=10 100 "$PYTHON" -m pip install --retries 1 --timeout 20 \
    -c "$REPO/.ci/constraints.txt" "$@"
}

install() {
  if ! "$PYTHON" -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
    lpwd_optax.experiments.benchmarks flax timm 2>/dev/null; then
    echo "installing this project: pip install -e '$REPO[experiments,timm]'"
    pip_install -e "$REPO[experiments,timm]" ||
      pip_install --no-deps --no-build-isolation -e "$REPO"
  fi
  if [[ $DEVICE == cuda ]] && ! "$PYTHON" -c "import jax; jax.devices('cuda')" 2>/dev/null; then
    local jax_version cuda extra
    jax_version="$("$PYTHON" -c "import jax; print(jax.__version__)")"
    # The CUDA major version of the installed torch build names JAX's extra (cuda12, cuda13).
    cuda="$("$PYTHON" -c "import torch; print((torch.version.cuda or '13').split('.')[0])")"
    extra="cuda${cuda}"
    # Keep the CUDA libraries torch was installed with: pin every installed nvidia-*/cuda-*.
    "$PYTHON" -m pip freeze | grep -iE '^(nvidia-|cuda-)' >"$OUTPUT_DIR/cuda_constraints.txt"
    echo "JAX sees no GPU: pip install 'jax[$extra]==$jax_version'"
    pip_install -c "$OUTPUT_DIR/cuda_constraints.txt" "jax[$extra]==$jax_version" ||
      pip_install "jax[$extra-local]==$jax_version"
  fi
}

if [[ $INSTALL == 1 ]]; then
  echo "== install"
  T0=$SECONDS
  install
  record install $? $((SECONDS - T0)) 200
fi

# ---------------------------------------------------------------------------------------------
# 1. Which device each framework uses.

run_part devices 60 "$PYTHON" - "$OUTPUT_DIR/devices.json" "$DEVICE" <<'EOF'
import json, os, shutil, subprocess, sys

out, wanted = sys.argv[1], sys.argv[2]
info = {"requested": wanted, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS")}
try:
    import jax

    info["jax"] = {
        "version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}: {d.device_kind}" for d in jax.devices()],
    }
except Exception as e:  # report, do not stop: the other framework may still work
    info["jax"] = {"error": repr(e)}
try:
    import torch

    cuda = torch.cuda.is_available()
    info["torch"] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
except Exception as e:
    info["torch"] = {"error": repr(e)}
if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    info["nvidia_smi"] = smi.stdout.strip().splitlines()
jax_on = info["jax"].get("backend", "none")
jax_devices = ", ".join(info["jax"].get("devices", [])) or info["jax"].get("error")
torch_on = "cuda" if info["torch"].get("cuda_available") and wanted == "cuda" else "cpu"
torch_devices = ", ".join(info["torch"].get("devices", [])) or "cpu"
print(f"JAX   {info['jax'].get('version')}: runs on {jax_on} ({jax_devices})")
print(f"torch {info['torch'].get('version')}: runs on {torch_on} ({torch_devices})")
expected = {"cuda": "gpu", "cpu": "cpu"}[wanted]
info["ok"] = jax_on == expected and (wanted == "cpu" or torch_on == "cuda")
if not info["ok"]:
    print(f"WARNING: asked for {wanted}, but JAX runs on {jax_on} and torch on {torch_on}")
with open(out, "w") as f:
    json.dump(info, f, indent=2)
sys.exit(0 if info["ok"] else 1)
EOF

# ---------------------------------------------------------------------------------------------
# 2. Training step, Flax against timm.

if [[ $QUICK == 1 ]]; then
  STEP_ARGS=(--models convnext_atto --batch-size 8 --steps 1 --repeats 1)
else
  STEP_ARGS=(--models convnext_tiny swin_tiny --batch-size 256 --steps 10 --repeats 3)
fi
run_part train_step 150 "$PYTHON" -m lpwd_optax.experiments.benchmarks.bench_train_step \
  --device "$DEVICE" --depthwise auto "${STEP_ARGS[@]}" --out "$OUTPUT_DIR/train_step.json"

# ---------------------------------------------------------------------------------------------
# 3. Regularizer overhead (on JAX's default device: the GPU when JAX has one).

if [[ $QUICK == 1 ]]; then
  REG_ARGS=(--model convnext_atto --model-overrides '{"dims": [16, 32], "depths": [1, 1]}'
    --image-size 32 --steps 1 --repeats 1 --warmup 0
    --only "LPWD (layer-wise pre_weight_decay)" "weight_rescaling(1), every step")
else
  REG_ARGS=()
fi
run_part regularizers 90 "$PYTHON" -m lpwd_optax.experiments.benchmarks.bench_regularizers \
  ${REG_ARGS[@]+"${REG_ARGS[@]}"} --out "$OUTPUT_DIR/regularizers.json"

# ---------------------------------------------------------------------------------------------
# 4. The LPWD paper's base cell (ConvNeXt-T, CIFAR-10, Adam 1e-4, lambda 1e-2, batch 512): WD,
#    then LPWD for the epochs WD finished, in what is left of the budget (paper_cell.py).

CELL_ARGS=(--output_dir "$OUTPUT_DIR/paper_cell")
if [[ $QUICK == 1 ]]; then
  CELL_ARGS+=(--quick --epochs 2)
fi
if [[ $DATASET != digits ]]; then
  CELL_ARGS+=(--data "$DATA")
fi
# The program stops its own runs within its budget; the part's limit is a backstop.
CELL_LEFT=$((BUDGET_S - (SECONDS - START) - 20))
run_part paper_cell $((CELL_LEFT + 20)) "$PYTHON" -m lpwd_optax.experiments.benchmarks.paper_cell \
  --budget_s "$CELL_LEFT" "${CELL_ARGS[@]}"
if [[ -f $OUTPUT_DIR/paper_cell/paper_cell.json ]]; then
  cp "$OUTPUT_DIR/paper_cell/paper_cell.json" "$OUTPUT_DIR/paper_cell.json"
fi

# ---------------------------------------------------------------------------------------------
# What ran, in one file.

"$PYTHON" - "$OUTPUT_DIR" "$((SECONDS - START))" "$DEVICE" "$QUICK" <<'EOF'
import json, sys
from pathlib import Path

out, wall_s, device, quick = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
parts = [json.loads(line) for line in (out / "parts.jsonl").read_text().splitlines()]
files = {"devices": "devices.json", "train_step": "train_step.json",
         "regularizers": "regularizers.json", "paper_cell": "paper_cell.json"}
for p in parts:
    name = files.get(p["part"])
    p["json"] = name if name and (out / name).exists() else None
report = {"device": device, "quick": quick == "1", "total_wall_s": wall_s, "parts": parts}
(out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(f"\ndevice_check ({device}, {wall_s:.0f} s): results in {out}")
for p in parts:
    print(f"  {p['part']:<13} {p['status']:<9} {p['wall_s']:>4} s  {p['json'] or ''}")
EOF
