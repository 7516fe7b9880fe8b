// The LASP-2 schedule of the delta-rule family (see delta_lasp2.h).
#include "delta_rule/delta_lasp2.h"

#include <memory>

namespace lasp2::delta {
namespace {

int64_t round_up8(int64_t bytes) { return (bytes + 7) / 8 * 8; }

void check(Communicator* comm, const PartLayout& layout, const DeltaParams& p,
           const DeltaSequences& seqs) {
  layout.validate(p.seqlen);
  if (comm == nullptr) {
    LASP2_CHECK(layout.world_size == 1, "a sequence-parallel layout needs a communicator");
  } else {
    LASP2_CHECK(comm->size() == layout.world_size && comm->rank() == layout.rank,
                "the communicator's rank/size differ from the part layout's");
  }
  if (seqs.packed()) {
    LASP2_CHECK(p.batch == 1, "packed documents need batch size 1");
    LASP2_CHECK(static_cast<int64_t>(seqs.head_doc.size()) == layout.total_parts(),
                "head_doc needs one entry per global part");
    LASP2_CHECK(p.doc_start != nullptr && p.doc_id != nullptr,
                "packed documents need doc_start and doc_id");
  } else {
    LASP2_CHECK(seqs.count == p.batch, "without packed documents each batch row is a sequence");
  }
}

// Offsets inside one part's record.
struct Record {
  int64_t bh, me, se;
  explicit Record(const DeltaParams& p) : bh(p.bh()), me(p.map_elems()), se(p.state_elems()) {}
  int64_t size() const { return bh * (2 * me + 2 * se); }
  int64_t A() const { return 0; }
  int64_t M() const { return bh * me; }
  int64_t head_A() const { return bh * (me + se); }
  int64_t head_M() const { return bh * (2 * me + se); }
  int64_t states() const { return bh * se; }
};

int64_t doc_floats(const DeltaParams& p, const DeltaSequences& seqs) {
  return seqs.count * p.heads * p.state_elems();
}

// Gathers `count` floats per rank into recv (recv = send for one device).
void gather(Communicator* comm, const float* send, float* recv, int64_t count, void* stream) {
  if (comm == nullptr || comm->size() == 1) return;
  comm->all_gather(send, recv, count, ScalarType::kFloat32, stream)->wait(stream);
}

}  // namespace

int64_t DeltaSaved::record_floats(const DeltaParams& p) { return Record(p).size(); }
int64_t DeltaSaved::records_floats(const DeltaParams& p, const PartLayout& l) {
  return l.total_parts() * record_floats(p);
}
int64_t DeltaSaved::prefixes_floats(const DeltaParams& p, const PartLayout& l) {
  return (l.total_parts() + 1) * Record(p).states();
}

int64_t delta_lasp2_forward_workspace_bytes(const DeltaParams& p, const PartLayout& l,
                                            const DeltaSequences& seqs, bool want_finals) {
  const int64_t per_rank = l.parts_per_rank * Record(p).size() +
                           (seqs.packed() && want_finals ? doc_floats(p, seqs) : 0);
  return round_up8((1 + l.world_size) * per_rank * 4);
}

int64_t delta_lasp2_backward_workspace_bytes(const DeltaParams& p, const PartLayout& l,
                                             const DeltaSequences& seqs, bool have_final_dstate) {
  const Record rec(p);
  const int64_t per_rank = l.parts_per_rank * rec.states() + (have_final_dstate ? doc_floats(p, seqs) : 0);
  int64_t floats = (1 + l.world_size) * per_rank;
  floats += doc_floats(p, seqs);                          // summed final-state gradients
  floats += (l.parts_per_rank + 1) * rec.states();        // D of local parts, running suffix
  floats += rec.states();                                 // scratch dP
  return round_up8(floats * 4);
}

void delta_lasp2_forward(const DeltaKernelBackend& be, Communicator* comm,
                         const PartLayout& layout, const DeltaParams& p,
                         const DeltaSequences& seqs, const float* initial, MutView o,
                         const DeltaSaved& saved, float* finals, void* workspace, void* stream) {
  check(comm, layout, p, seqs);
  const Record rec(p);
  const int parts = layout.parts_per_rank, total = layout.total_parts();
  const bool inner_finals = seqs.packed() && finals != nullptr;
  const int64_t per_rank = parts * rec.size() + (inner_finals ? doc_floats(p, seqs) : 0);
  float* send = static_cast<float*>(workspace);
  float* recv = layout.world_size == 1 ? send : send + per_rank;

  DocStates doc;
  doc.initial = initial;
  if (inner_finals) {
    doc.finals = send + parts * rec.size();
    be.fill_zero(doc.finals, doc_floats(p, seqs), stream);
  }
  for (int i = 0; i < parts; ++i) {
    float* r = send + i * rec.size();
    be.part_summary(p, layout.local_range(i, p.seqlen), doc, r + rec.A(), r + rec.M(),
                    r + rec.head_A(), r + rec.head_M(), stream);
  }
  gather(comm, send, recv, per_rank, stream);  // the one collective of the forward

  auto gathered_record = [&](int g) {
    const int slot = layout.gather_slot(g);
    return recv + (slot / parts) * per_rank + (slot % parts) * rec.size();
  };
  for (int g = 0; g < total; ++g)
    be.copy(saved.records + g * rec.size(), gathered_record(g), rec.size(), stream);

  // Prefix: the first document's (or each row's) initial state enters part 0.
  const int64_t S = rec.states();
  if (initial != nullptr) {
    be.copy(saved.prefixes, initial, S, stream);
  } else {
    be.fill_zero(saved.prefixes, S, stream);
  }
  for (int g = 0; g < total; ++g) {
    const float* r = saved.records + g * rec.size();
    be.apply_map(r + rec.A(), saved.prefixes + g * S, r + rec.M(), rec.bh, p.dim_k, p.dim_v,
                 saved.prefixes + (g + 1) * S, stream);
  }
  for (int i = 0; i < parts; ++i) {
    const int g = layout.global_part(i);
    be.forward(p, layout.local_range(i, p.seqlen), saved.prefixes + g * S, doc, o, stream);
  }

  if (finals == nullptr) return;
  if (!seqs.packed()) {
    be.copy(finals, saved.prefixes + total * S, S, stream);
    return;
  }
  // Inner documents: each was written by the one rank whose part holds it.
  const int64_t D = doc_floats(p, seqs);
  be.fill_zero(finals, D, stream);
  for (int r = 0; r < layout.world_size; ++r)
    be.add(finals, recv + r * per_rank + parts * rec.size(), D, stream);
  for (int g = 0; g < total; ++g) {
    const int64_t d = seqs.head_doc[g];
    if (d < 0) continue;
    const float* r = saved.records + g * rec.size();
    be.apply_map(r + rec.head_A(), saved.prefixes + g * S, r + rec.head_M(), rec.bh, p.dim_k,
                 p.dim_v, finals + d * S, stream);
  }
  be.copy(finals + (seqs.count - 1) * S, saved.prefixes + total * S, S, stream);
}

void delta_lasp2_backward(const DeltaKernelBackend& be, Communicator* comm,
                          const PartLayout& layout, const DeltaParams& p,
                          const DeltaSequences& seqs, const float* initial, ConstView dout,
                          const DeltaSaved& saved, const float* final_dstate, MutView dq,
                          MutView dk, MutView dv, void* dg, void* dbeta, float* d_initial,
                          void* workspace, void* stream) {
  check(comm, layout, p, seqs);
  const Record rec(p);
  const int parts = layout.parts_per_rank, total = layout.total_parts();
  const int64_t S = rec.states(), D = doc_floats(p, seqs);
  const int64_t per_rank = parts * S + (final_dstate ? D : 0);
  float* send = static_cast<float*>(workspace);
  float* recv = layout.world_size == 1 ? send : send + per_rank;
  float* dF = send + (1 + layout.world_size) * per_rank;  // summed over ranks
  float* leaving = dF + D;                                 // D_g of each local part
  float* suffix = leaving + parts * S;
  float* dP = suffix + S;

  for (int i = 0; i < parts; ++i)
    be.entering_dstate(p, layout.local_range(i, p.seqlen), dout, send + i * S, stream);
  if (final_dstate != nullptr) be.copy(send + parts * S, final_dstate, D, stream);
  gather(comm, send, recv, per_rank, stream);  // the one collective of the backward

  be.fill_zero(dF, D, stream);
  if (final_dstate != nullptr)
    for (int r = 0; r < layout.world_size; ++r) be.add(dF, recv + r * per_rank + parts * S, D, stream);

  // Suffix over the parts in reverse global order.
  be.copy(suffix, dF + (seqs.packed() ? (seqs.count - 1) * S : 0), S, stream);
  for (int g = total - 1; g >= 0; --g) {
    for (int i = 0; i < parts; ++i)
      if (layout.global_part(i) == g) be.copy(leaving + i * S, suffix, S, stream);
    const int slot = layout.gather_slot(g);
    const float* E = recv + (slot / parts) * per_rank + (slot % parts) * S;
    const float* r = saved.records + g * rec.size();
    be.copy(dP, E, S, stream);
    be.apply_map_transposed_add(r + rec.A(), suffix, rec.bh, p.dim_k, p.dim_v, dP, stream);
    if (seqs.packed() && seqs.head_doc[g] >= 0)
      be.apply_map_transposed_add(r + rec.head_A(), dF + seqs.head_doc[g] * S, rec.bh, p.dim_k,
                                  p.dim_v, dP, stream);
    be.copy(suffix, dP, S, stream);
  }

  DocStates doc;
  doc.initial = initial;
  doc.final_dstate = final_dstate != nullptr ? dF : nullptr;
  doc.d_initial = d_initial;
  if (d_initial != nullptr) {
    be.fill_zero(d_initial, D, stream);
    bool holds_first = false;
    for (int i = 0; i < parts; ++i) holds_first = holds_first || layout.global_part(i) == 0;
    if (holds_first) be.copy(d_initial, suffix, S, stream);  // suffix now holds dP_0
  }
  for (int i = 0; i < parts; ++i) {
    const int g = layout.global_part(i);
    be.backward(p, layout.local_range(i, p.seqlen), dout, saved.prefixes + g * S, leaving + i * S,
                doc, dq, dk, dv, dg, dbeta, nullptr, stream);
  }
}

}  // namespace lasp2::delta
