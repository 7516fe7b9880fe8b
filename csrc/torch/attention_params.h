// What every linear attention entry point for torch tensors shares: the one argument
// bundle from Python (bound once as lasp2._C.LinearAttentionArgs), its checks, and
// turning it into the core's AttentionParams and PartLayout (plus the tensors,
// converted to the compute precision, that the params point into).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <vector>

#include "lasp2/communicator.h"
#include "lasp2/lasp2.h"
#include "lasp2/params.h"
#include "lasp2/part_layout.h"

namespace lasp2::torch_binding {

using OptTensor = std::optional<at::Tensor>;

struct LinearAttentionArgs {
  at::Tensor q, k, v;         // [B, T, H, D] views (any batch/seq/head strides)
  OptTensor g;                // [B, T, H] log gates
  OptTensor decay;            // [H] log decays
  OptTensor doc_start;        // [T] (shared by the batch) or [B, T], nonzero where a document starts
  OptTensor initial_state;    // [N, H, Dk, Dv]: the state entering each sequence (LASP-2)
  double scale = 1.0;
  std::shared_ptr<Communicator> comm;  // null: one device
  int64_t parts_per_rank = 1;          // 2: balanced causal split
  int64_t chunk_size = 64;             // the CPU kernels' chunk length; GPUs pick their own
  // Packed documents with sequence states (N = num_seqs documents, B = 1): per global
  // part, the document ending in its head (-1: no start in the part). Empty: N = B.
  std::vector<int64_t> head_doc;
  int64_t num_seqs = 0;
  bool document_states() const { return doc_start.has_value() && !head_doc.empty(); }

  // The tensors in a fixed order (q, k, v, g, decay, doc_start, initial_state), so an
  // autograd Function can save them with save_for_backward and keep config() aside.
  static constexpr int kNumTensors = 7;
  std::vector<OptTensor> tensors() const;
  LinearAttentionArgs config() const;  // the same arguments without tensors
  LinearAttentionArgs with_tensors(const std::vector<OptTensor>& tensors) const;
};

// Tensors the core reads, in the precision it computes in. The CPU kernels run
// half precisions in fp32; CUDA kernels take them as they are. `params` points
// into these tensors, so a Prepared must outlive every core call made with it.
struct Prepared {
  at::Tensor q, k, v, g, decay, doc_start, initial_state;  // initial_state: fp32 contiguous
  at::ScalarType input_dtype;
  AttentionParams params;
  PartLayout layout;
};

// The sizes and dtype of the params (no tensors): what prepare() starts from, and all
// that the saved-state sizes depend on (lasp2_saved_states_floats / _plan).
AttentionParams shape_params(int64_t batch, int64_t seqlen, int64_t heads, int64_t dim_k, int64_t dim_v,
                             at::ScalarType dtype);

// Checks every argument (raising lasp2::Error that names it) before anything reaches
// the core, then builds the params.
Prepared prepare(const LinearAttentionArgs& a);

// The [N, H, Dk, Dv] shape of the sequences' states (N = B, or the documents).
std::vector<int64_t> state_shape(const AttentionParams& p, const LinearAttentionArgs& a);
// `t` (named `name`) as an fp32 contiguous state of `p` on the device of `like`.
at::Tensor state_tensor(const at::Tensor& t, const char* name, const std::vector<int64_t>& shape,
                        const at::Tensor& like);
// A saved fp32 buffer from forward, checked against the size backward expects.
const at::Tensor& saved_buffer(const at::Tensor& t, const char* name, int64_t floats,
                               const at::Tensor& like);
// What LASP-2's forward keeps for backward, {local_records, prefix_states, maps,
// head_maps} for a family of summary `shape` (head maps only with packed documents'
// states), and the core's view of them, checked against the sizes backward expects
// (the view takes a fifth buffer, the scalar family's segment states, and leaves it to
// its caller).
std::vector<at::Tensor> lasp2_saved_buffers(const SummaryShape& shape, const PartLayout& l,
                                            bool packed, const at::Tensor& like);
Lasp2Saved lasp2_saved_view(const std::vector<at::Tensor>& saved, const SummaryShape& shape,
                            const PartLayout& l, bool packed, const at::Tensor& like);
// dout, checked against v, in the precision the core computes in.
at::Tensor prepare_dout(const at::Tensor& dout, const LinearAttentionArgs& a, const Prepared& r);

// t in the precision the core computes in on its device (half -> fp32 on the CPU).
at::Tensor compute_tensor(const at::Tensor& t);
// n float32 elements on the device of `like`.
at::Tensor floats(int64_t n, const at::Tensor& like);
// At least 8 bytes of scratch on the device of `like`.
at::Tensor scratch(int64_t bytes, const at::Tensor& like);
at::Tensor restore_dtype(const at::Tensor& t, at::ScalarType dtype);
// [B, T, H] for dg, in the decay dtype of `p`.
at::Tensor gate_grad(const AttentionParams& p, const at::Tensor& like);

// The gradients backward returns, each in the dtype of its input: {dq, dk, dv, dg, ddecay}
// (dg for a gate tensor, ddecay = the sum of dg over batch and tokens for a fixed decay).
std::vector<OptTensor> input_grads(const LinearAttentionArgs& a, const Prepared& r,
                                   const at::Tensor& dq, const at::Tensor& dk,
                                   const at::Tensor& dv, const at::Tensor& dg);

}  // namespace lasp2::torch_binding
