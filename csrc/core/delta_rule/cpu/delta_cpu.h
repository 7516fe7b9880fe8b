// Typed CPU kernels of the delta-rule family (T = float or double); the
// DeltaKernelBackend for the CPU dispatches to them.
#pragma once

#include "delta_rule/delta_params.h"

namespace lasp2::delta::cpu {

template <typename T>
void part_summary(const DeltaParams& p, TokenRange part, const DocStates& doc, float* A,
                  float* M, float* head_A, float* head_M);
template <typename T>
void forward(const DeltaParams& p, TokenRange part, const float* entering, const DocStates& doc,
             MutView o);
template <typename T>
void entering_dstate(const DeltaParams& p, TokenRange part, ConstView dout, float* dentering);
template <typename T>
void backward(const DeltaParams& p, TokenRange part, ConstView dout, const float* entering,
              const float* leaving_dstate, const DocStates& doc, MutView dq, MutView dk,
              MutView dv, void* dg, void* dbeta, float* dentering);

}  // namespace lasp2::delta::cpu
