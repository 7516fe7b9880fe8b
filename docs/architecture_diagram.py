"""Draws docs/architecture.png, the picture of docs/architecture.md.

    python docs/architecture_diagram.py          # needs matplotlib

Layers bottom-up, each box naming its folder; the dashed boxes are what a new
linear-attention family adds (one core folder, one op module).
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

# (row, x, width, title, folder, body); rows count from the bottom
BOXES = [
    (0, 0.0, 10.0, "core vocabulary", "csrc/core/include/lasp2/",
     "ScalarType, tensor views, AttentionParams, PartLayout, StateRecord;\n"
     "the two interfaces KernelBackend and Communicator"),
    (1, 0.0, 3.6, "schedules", "csrc/core/sp/",
     "LASP-2 (one AllGather a direction),\nLASP-1 (ring); over any part summary"),
    (1, 3.75, 3.0, "backends", "csrc/core/cpu/, csrc/core/cuda/",
     "chunked kernels;\nthe CPU one is the reference"),
    (1, 6.9, 3.1, "communicators", "csrc/core/comm/, csrc/torch/",
     "native NCCL;\nthe torch ProcessGroup adapter"),
    (2, 0.0, 10.0, "binding", "csrc/torch/  ->  lasp2._C",
     "tensors -> views, allocation, errors -> ValueError: the only LibTorch code"),
    (3, 0.0, 4.3, "vocabulary and SP context", "lasp2/options.py, lasp2/distributed/",
     "PROVIDERS, SPLITS, FEATURE_MAPS, LAYER_LETTERS;\nSPContext: parts, positions, document starts"),
    (3, 4.45, 5.55, "ops and providers", "lasp2/ops/",
     "linear_attention -> providers/{lasp2, lasp1, ulysses}\n(one face, one registry); softmax_attention (LASP-2H)"),
    (4, 0.0, 10.0, "nn", "lasp2/nn/",
     "LinearAttention, SoftmaxAttention, HybridStack (pattern \"LLLS\"), RMSNorm; one SP context per batch"),
    (5, 0.0, 10.0, "megatron_patches", "megatron_patches/",
     "Megatron arguments and layer specs, core attention / linear mixer, batch and RoPE slicing"),
]
NEW_FAMILY = [  # (row, x, width, text)
    (1, 10.3, 3.3, "csrc/core/<family>/\nits part summary, kernel-backend\ninterface, cpu/ and cuda/ kernels"),
    (3, 10.3, 3.3, "lasp2/ops/<family>.py\nthe op and its autograd; registers\nits providers (providers.register)"),
]
ROW_H, GAP = 1.15, 0.22


def y_of(row):
    return row * (ROW_H + GAP)


def main(out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "architecture.png")):
    fig, ax = plt.subplots(figsize=(13.5, 6.6))
    for row, x, w, title, folder, body in BOXES:
        y = y_of(row)
        ax.add_patch(FancyBboxPatch((x, y), w, ROW_H, boxstyle="round,pad=0.02", fc="#e8eef7", ec="#35506b"))
        ax.text(x + 0.1, y + ROW_H - 0.17, title, fontsize=10, weight="bold", va="center")
        ax.text(x + 0.1, y + ROW_H - 0.42, folder, fontsize=8.5, family="monospace", va="center", color="#35506b")
        ax.text(x + 0.1, y + 0.3, body, fontsize=8, va="center", linespacing=1.3)
    for row, x, w, text in NEW_FAMILY:
        y = y_of(row)
        ax.add_patch(FancyBboxPatch((x, y), w, ROW_H, boxstyle="round,pad=0.02", fc="#fff4e0", ec="#c07000",
                                    ls="--", lw=1.5))
        ax.text(x + w / 2, y + ROW_H / 2, text, fontsize=8.5, ha="center", va="center", linespacing=1.3)
    ax.text(10.3 + 3.3 / 2, y_of(5) + ROW_H / 2, "a new linear-attention family adds\nthe two dashed boxes and reuses\n"
            "the rest: schedules, communicators,\nbinding helpers, SP context, tests",
            fontsize=9, ha="center", va="center", color="#c07000")
    ax.set_xlim(-0.2, 13.7)
    ax.set_ylim(-0.2, y_of(6))
    ax.axis("off")
    ax.set_title("lasp2: layers, bottom-up (each layer calls only the ones below it)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
