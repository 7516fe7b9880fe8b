// The armed device values of a call (lasp2/call_check.h) and the poisoning of its
// outputs when the ranks' values fail: the CPU path here, the CUDA kernel in
// csrc/core/cuda/call_check_kernels.cu (the same definition, consistency_values.h).
#include "lasp2/call_check.h"

#include <cstring>

#include "consistency_values.h"

#ifdef LASP2_WITH_CUDA
#include "cuda/call_check_kernels.h"
#endif

namespace lasp2 {
namespace {

thread_local CallCheck armed_check;

template <typename Bits>
void put_bits(void* p, Bits bits) {
  std::memcpy(p, &bits, sizeof(bits));
}

// A quiet NaN of the element type, as its bits (float16 and bfloat16 need no arithmetic type).
void fill_nan(void* p, ScalarType t) {
  switch (t) {
    case ScalarType::kFloat32: return put_bits(p, uint32_t{0x7FC00000u});
    case ScalarType::kFloat64: return put_bits(p, uint64_t{0x7FF8000000000000ull});
    case ScalarType::kFloat16: return put_bits(p, uint16_t{0x7E00u});
    case ScalarType::kBFloat16: return put_bits(p, uint16_t{0x7FC0u});
  }
}

void poison_on_cpu(const PoisonTarget& t) {
  const std::size_t size = element_size(t.dtype);
  char* base = static_cast<char*>(t.data);
  for (int64_t b = 0; b < t.batch; ++b)
    for (int64_t s = 0; s < t.seqlen; ++s)
      for (int64_t h = 0; h < t.heads; ++h) {
        char* row = base + t.stride.offset(b, s, h) * static_cast<int64_t>(size);
        for (int64_t d = 0; d < t.dim; ++d) fill_nan(row + d * static_cast<int64_t>(size), t.dtype);
      }
}

}  // namespace

void arm_call_check(const CallCheck& check) {
  LASP2_CHECK(check.count >= 0 && check.count <= kCallCheckWords,
              "a call's check arms at most " + std::to_string(kCallCheckWords) + " words");
  armed_check = check;
}

void disarm_call_check() { armed_check = CallCheck{}; }

CallCheck take_call_check() {
  const CallCheck check = armed_check;
  armed_check = CallCheck{};
  return check;
}

void poison_on_failed_check(Device device, const float* gathered, int64_t rank_stride, int world,
                            const CallCheck& check, const PoisonTarget* targets, int count, void* stream) {
  LASP2_CHECK(count >= 0 && count <= kMaxPoisonTargets, "too many poison targets");
  if (!check.armed()) return;
  if (device == Device::kCPU) {
    if (!consistency::words_fail(gathered, rank_stride, world, check.count, check.max_mask)) return;
    for (int i = 0; i < count; ++i)
      if (targets[i].numel() > 0) poison_on_cpu(targets[i]);
    return;
  }
#ifdef LASP2_WITH_CUDA
  cuda::PoisonArgs args;
  args.gathered = gathered;
  args.rank_stride = rank_stride;
  args.world = world;
  args.words = check.count;
  args.max_mask = check.max_mask;
  for (int i = 0; i < count; ++i) {
    if (targets[i].numel() == 0) continue;
    cuda::PoisonView& v = args.v[args.count++];
    v.ptr = targets[i].data;
    v.elem_bytes = static_cast<int>(element_size(targets[i].dtype));
    v.dtype = static_cast<int>(targets[i].dtype);
    v.batch = targets[i].batch;
    v.seqlen = targets[i].seqlen;
    v.heads = targets[i].heads;
    v.dim = targets[i].dim;
    v.sb = targets[i].stride.batch;
    v.st = targets[i].stride.seq;
    v.sh = targets[i].stride.head;
  }
  if (args.count > 0) cuda::launch_poison(args, static_cast<cudaStream_t>(stream));
#else
  (void)stream;
  fail("lasp2: this build has no CUDA kernels; rebuild with CUDA to run on GPU tensors");
#endif
}

}  // namespace lasp2
