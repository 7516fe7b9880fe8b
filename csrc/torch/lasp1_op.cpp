#include "lasp1_op.h"

#include <algorithm>

#include "lasp2/scalar_decay.h"
#include "lasp2_op.h"
#include "tensor_views.h"
#include "torch_scratch.h"

namespace lasp2::torch_binding {

std::vector<at::Tensor> lasp1_saved_buffers(const SummaryShape& sh, const PartLayout& l, bool packed,
                                            const at::Tensor& like) {
  const int parts = l.parts_per_rank;
  return {floats(Lasp1Saved::entering_state_floats(sh, parts), like),
          floats(Lasp1Saved::local_record_floats(sh, parts), like),
          floats(std::max<int64_t>(Lasp1Saved::head_maps_floats(sh, parts, packed), 1), like)};
}

Lasp1Saved lasp1_saved_view(const std::vector<at::Tensor>& t, const SummaryShape& sh, const PartLayout& l,
                            bool packed, const at::Tensor& like) {
  LASP2_CHECK(t.size() == 3, "LASP-1 backward needs the 3 saved buffers of forward");
  const int parts = l.parts_per_rank;
  const int64_t head_maps = std::max<int64_t>(Lasp1Saved::head_maps_floats(sh, parts, packed), 1);
  return {saved_buffer(t[0], "entering_state", Lasp1Saved::entering_state_floats(sh, parts), like).data_ptr<float>(),
          saved_buffer(t[1], "local_record", Lasp1Saved::local_record_floats(sh, parts), like).data_ptr<float>(),
          saved_buffer(t[2], "head_maps", head_maps, like).data_ptr<float>()};
}

std::tuple<at::Tensor, OptTensor, std::vector<at::Tensor>> lasp1_forward(const LinearAttentionArgs& args,
                                                                         bool output_final_state) {
  std::vector<at::Tensor> saved;
  auto [o, final_state] = scalar_forward(
      args, output_final_state, [&](ScalarDecay& family, const Prepared& r, SequenceStates& seq) {
        saved = lasp1_saved_buffers(family.shape(), r.layout, seq.packed(), r.q);
        at::Tensor workspace = scratch(lasp1_forward_workspace_bytes(family, r.layout, seq), r.q);
        lasp1_forward(family, args.comm.get(), r.layout,
                      lasp1_saved_view(saved, family.shape(), r.layout, seq.packed(), r.q), seq,
                      workspace.data_ptr(), current_stream(r.q));
      });
  return {o, final_state, saved};
}

std::vector<OptTensor> lasp1_backward(const LinearAttentionArgs& args,
                                      const std::vector<at::Tensor>& saved_tensors,
                                      const at::Tensor& dout, bool need_dg,
                                      const OptTensor& d_final_state, bool need_dinitial) {
  return scalar_backward(
      args, dout, need_dg, d_final_state, need_dinitial,
      [&](ScalarDecay& family, const Prepared& r, SequenceStates& seq) {
        const Lasp1Saved saved = lasp1_saved_view(saved_tensors, family.shape(), r.layout, seq.packed(), r.q);
        at::Tensor workspace = scratch(lasp1_backward_workspace_bytes(family, r.layout, seq), r.q);
        lasp1_backward(family, args.comm.get(), r.layout, saved, seq, workspace.data_ptr(), current_stream(r.q));
      });
}

}  // namespace lasp2::torch_binding
