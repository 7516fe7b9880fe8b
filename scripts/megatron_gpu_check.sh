#!/usr/bin/env bash
# One H200: lasp2-pretrain-gpt trains a ~110M-parameter hybrid GPT (12 layers, LLLS x 3:
# linear attention with LASP-2, softmax with LASP-2H) for 50 steps in bf16 with Megatron's
# distributed optimizer, the Transformer Engine spec where TE imports (else the local spec),
# and checks that the loss falls. Prints the per-step log (loss, tokens/s, TFLOP/s per GPU).
#   bash scripts/megatron_gpu_check.sh            (from the repository root, lasp2 built)
#   DECAY=gate bash scripts/megatron_gpu_check.sh (per-token gates: Lasp2LinearMixer's linear_gate)
# PATTERN overrides the 12-letter layer pattern (L / G / K / S; e.g. PATTERN=LGLSLGLSLGLS); PATTERN=
# (empty) leaves --hybrid-layer-pattern out, for layouts chosen by EXTRA. DIST replaces
# --use-distributed-optimizer (DIST= plain DDP; DIST=--use-torch-fsdp2 FSDP2, in bf16 with DDP
# --bf16's mixed precision: fp32 shards, bf16 compute, fp32 gradient reduction); PRECISION= runs
# fp32. FSDP2 against DDP, both bf16 (the same loss at step 1, then close, not bit-equal):
#   LOG=ddp_bf16.log DIST= bash scripts/megatron_gpu_check.sh
#   LOG=fsdp2_bf16.log DIST=--use-torch-fsdp2 bash scripts/megatron_gpu_check.sh
# EXTRA is appended, e.g.
#   PATTERN= EXTRA="--experimental-attention-variant gated_delta_net --linear-attention-freq 4" bash ...
#   EXTRA="--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 1024 --disable-bias-linear" bash ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${LOG:-megatron_gpu_check.log}
PATTERN=${PATTERN-LLLSLLLSLLLS}
DECAY=${DECAY:-fixed}
DIST=${DIST---use-distributed-optimizer}
EXTRA=${EXTRA:-}
LAYOUT=()
[ -n "$PATTERN" ] && LAYOUT=(--hybrid-layer-pattern "$PATTERN")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if "$PY" -c 'import transformer_engine' 2>/dev/null; then IMPL=transformer_engine; else IMPL=local; fi
echo "spec: $IMPL, pattern ${PATTERN:-(none)}, decay $DECAY, $DIST $EXTRA"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m megatron_patches.pretrain_gpt \
  --device cuda ${PRECISION---bf16} $DIST --transformer-impl "$IMPL" \
  --num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 2048 --vocab-size 32000 \
  "${LAYOUT[@]}" --sp-provider lasp2 --linear-attention-decay "$DECAY" \
  --micro-batch-size 4 --global-batch-size 16 --train-iters 50 --lr 3e-4 --optimizer adam \
  --log-interval 1 $EXTRA 2>&1 | tee "$LOG"
"$PY" - "$LOG" <<'PYEOF'
import re, sys
losses = [float(m.group(1)) for m in re.finditer(r"lm loss ([0-9.]+)", open(sys.argv[1]).read())]
if len(losses) != 50:
    sys.exit(f"expected 50 logged steps, found {len(losses)}")
first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
print(f"loss: mean of steps 1-5 {first:.4f}, of steps 46-50 {last:.4f}")
if not last < first - 0.5:
    sys.exit("FAIL: the loss did not fall by 0.5")
print("OK: the loss fell")
PYEOF
