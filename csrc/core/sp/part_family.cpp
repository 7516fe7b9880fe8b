// Defaults of the optional PartFamily calls (see part_family.h).
#include "lasp2/part_family.h"

namespace lasp2 {

void PartFamily::add_entering_output(TokenRange, const float*, void*) const {
  fail("lasp2: this family has no separate entering-state output pass (use the fused forward)");
}

// Families without a pass that needs only the entering state do all in backward().
void PartFamily::backward_entering(TokenRange, const float*, const DocStates&, void*, void*) const {}

// One single-part call per part, in local order.
void PartFamily::summarize_parts(const std::vector<TokenRange>& parts, const DocStates& docs,
                                 const std::vector<PartSummary>& out, void* stream) const {
  for (size_t i = 0; i < parts.size(); ++i) summarize(parts[i], docs, out[i], stream);
}

void PartFamily::forward_parts(const std::vector<TokenRange>& parts, const std::vector<const float*>& entering,
                               const DocStates& docs, void* stream) const {
  for (size_t i = 0; i < parts.size(); ++i) forward(parts[i], entering[i], docs, stream);
}

void PartFamily::entering_grads(const std::vector<TokenRange>& parts, const std::vector<float*>& dstates,
                                void* stream) const {
  for (size_t i = 0; i < parts.size(); ++i) entering_grad(parts[i], dstates[i], stream);
}

void PartFamily::backward_entering_parts(const std::vector<TokenRange>& parts,
                                         const std::vector<const float*>& entering, const DocStates& docs,
                                         void* scratch, void* stream) const {
  for (size_t i = 0; i < parts.size(); ++i) backward_entering(parts[i], entering[i], docs, scratch, stream);
}

void PartFamily::backward_parts(const std::vector<TokenRange>& parts, const std::vector<PartStates>& states,
                                const DocStates& docs, void* scratch, void* stream) const {
  for (size_t i = 0; i < parts.size(); ++i) backward(parts[i], states[i], docs, scratch, stream);
}

}  // namespace lasp2
