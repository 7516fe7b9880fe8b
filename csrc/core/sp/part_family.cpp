// Defaults of the optional PartFamily calls (see part_family.h).
#include "lasp2/part_family.h"

namespace lasp2 {

void PartFamily::add_entering_output(TokenRange, const float*, void*) const {
  fail("lasp2: this family has no separate entering-state output pass (use the fused forward)");
}

// Families without a pass that needs only the entering state do all in backward().
void PartFamily::backward_entering(TokenRange, const float*, const DocStates&, void*, void*) const {}

}  // namespace lasp2
