// The Python module lasp2._C: thin wrappers, no logic of their own.
//
// Errors: every check in the core and the binding throws lasp2::Error, which arrives in
// Python as lasp2._C.Lasp2Error (re-exported as lasp2.Lasp2Error), a subclass of
// ValueError: nearly all of them are argument problems (shapes, dtypes, devices, sizes,
// a communicator that does not match the layout). Device faults the core reports (CUDA,
// NCCL) arrive as the same type, with the failing call in the message.
#include <torch/csrc/utils/pybind.h>
#include <torch/extension.h>

#include "call_check_op.h"
#include "delta_rule_op.h"
#include "group_check.h"
#include "lasp1_op.h"
#include "lasp2/kernel_backend.h"
#include "lasp2_eager_node.h"
#include "lasp2_op.h"
#include "process_group_communicator.h"
#include "qk_l2norm_op.h"
#ifdef LASP2_WITH_NCCL
#include "lasp2/nccl_communicator.h"
#endif

namespace py = pybind11;
using lasp2::Communicator;
using lasp2::torch_binding::LinearAttentionArgs;
using lasp2::torch_binding::OptTensor;
using lasp2::torch_binding::ProcessGroupCommunicator;

namespace {

void bind_communicators(py::module_& m) {
  py::class_<Communicator, std::shared_ptr<Communicator>>(m, "Communicator")
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size);

  py::class_<ProcessGroupCommunicator, Communicator, std::shared_ptr<ProcessGroupCommunicator>>(
      m, "ProcessGroupCommunicator")
      .def(py::init([](const c10::intrusive_ptr<c10d::ProcessGroup>& group, const at::Device& device) {
             return std::make_shared<ProcessGroupCommunicator>(group, device);
           }),
           py::arg("group"), py::arg("device"));

#ifdef LASP2_WITH_NCCL
  m.def("nccl_unique_id", [] {
    const auto id = lasp2::nccl_unique_id();
    return py::bytes(id.data(), id.size());
  });
  py::class_<lasp2::NcclCommunicator, Communicator, std::shared_ptr<lasp2::NcclCommunicator>>(
      m, "NcclCommunicator")
      .def(py::init([](const py::bytes& id, int size, int rank, int device, double timeout_seconds) {
             const std::string raw = id;
             LASP2_CHECK(raw.size() == lasp2::kNcclUniqueIdBytes, "NCCL unique id has the wrong size");
             lasp2::NcclUniqueIdBytes bytes;
             std::copy(raw.begin(), raw.end(), bytes.begin());
             py::gil_scoped_release no_gil;  // init is collective across ranks
             return std::make_shared<lasp2::NcclCommunicator>(bytes, size, rank, device, timeout_seconds);
           }),
           py::arg("unique_id"), py::arg("size"), py::arg("rank"), py::arg("device"),
           py::arg("timeout_seconds") = 0.0)
      .def("abort", &lasp2::NcclCommunicator::abort, py::arg("reason"));
#endif
  m.def("has_nccl_communicator", [] {
#ifdef LASP2_WITH_NCCL
    return true;
#else
    return false;
#endif
  });
}

// The one argument bundle of every linear attention entry point.
void bind_args(py::module_& m) {
  py::class_<LinearAttentionArgs>(m, "LinearAttentionArgs")
      .def(py::init([](at::Tensor q, at::Tensor k, at::Tensor v, OptTensor g, OptTensor decay,
                       OptTensor doc_start, OptTensor initial_state, double scale,
                       std::shared_ptr<Communicator> comm, int64_t parts_per_rank, int64_t chunk_size,
                       std::vector<int64_t> head_doc, int64_t num_seqs) {
             return LinearAttentionArgs{std::move(q), std::move(k), std::move(v), std::move(g),
                                        std::move(decay), std::move(doc_start), std::move(initial_state),
                                        scale, std::move(comm), parts_per_rank, chunk_size,
                                        std::move(head_doc), num_seqs};
           }),
           py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(), py::arg("g") = py::none(),
           py::arg("decay") = py::none(), py::arg("doc_start") = py::none(),
           py::arg("initial_state") = py::none(), py::arg("scale") = 1.0, py::arg("comm") = nullptr,
           py::arg("parts_per_rank") = 1, py::arg("chunk_size") = 64,
           py::arg("head_doc") = std::vector<int64_t>{}, py::arg("num_seqs") = 0)
      .def_readonly("scale", &LinearAttentionArgs::scale)
      .def_readonly("comm", &LinearAttentionArgs::comm)
      .def_readonly("parts_per_rank", &LinearAttentionArgs::parts_per_rank)
      .def_readonly("chunk_size", &LinearAttentionArgs::chunk_size)
      .def_readonly_static("num_tensors", &LinearAttentionArgs::kNumTensors)
      .def("tensors", &LinearAttentionArgs::tensors,
           "(q, k, v, g, decay, doc_start, initial_state), None where absent")
      .def("config", &LinearAttentionArgs::config, "the same arguments without their tensors")
      .def("with_tensors", &LinearAttentionArgs::with_tensors, py::arg("tensors"),
           "the same arguments with the tensors of tensors() replaced");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lasp2 core bindings (use the lasp2 package, not this module)";

  py::register_exception<lasp2::Error>(m, "Lasp2Error", PyExc_ValueError);
  bind_communicators(m);
  bind_args(m);

  lasp2::torch_binding::register_delta_rule(m);  // gated DeltaNet / KDA (delta_rule_op.cpp)
  lasp2::torch_binding::register_group_check(m);  // the per-call cross-rank check (group_check.cpp)
  lasp2::torch_binding::register_call_check(m);  // "NaN at the call" outside the C++ schedules (call_check_op.cpp)
  lasp2::torch_binding::register_qk_l2norm(m);  // the fused L2 norm of q and k (qk_l2norm_op.cpp)

  m.def("has_cuda_kernels", [] {
#ifdef LASP2_WITH_CUDA
    return true;
#else
    return false;
#endif
  });

  // Collectives and P2P transfers may block on other ranks: no GIL while they run.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("lasp2_forward", &lasp2::torch_binding::lasp2_forward, py::arg("args"), py::arg("overlap"),
        py::arg("output_final_state") = false, no_gil,
        "-> (o, final_state or None, saved): LASP-2 forward (final_state [N, H, Dk, Dv] fp32)");
  m.def("lasp2_backward", &lasp2::torch_binding::lasp2_backward, py::arg("args"), py::arg("saved"),
        py::arg("dout"), py::arg("need_dg"), py::arg("d_final_state") = py::none(),
        py::arg("need_dinitial") = false, no_gil,
        "-> [dq, dk, dv, dg, ddecay, dinitial_state] (None where not asked for)");
  // One device without documents or states, in plain eager mode: a C++ autograd node
  // (lasp2_eager_node.h), so forward and backward cross from Python once each.
  m.def("lasp2_one_device", &lasp2::torch_binding::lasp2_one_device, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("g"), py::arg("decay"), py::arg("scale"), py::arg("chunk_size"), py::arg("overlap"), no_gil,
        "-> o, differentiable: lasp2_forward / lasp2_backward on one device behind a C++ autograd node");
  m.def("lasp2_saved_states_floats", &lasp2::torch_binding::lasp2_saved_states_floats, py::arg("batch"),
        py::arg("seqlen"), py::arg("heads"), py::arg("dim_k"), py::arg("dim_v"), py::arg("dtype"),
        py::arg("device"), py::arg("parts_per_rank"),
        "-> float32 values of saved[4] of lasp2_forward (the CUDA kernels' segment states; 0 on the CPU)");
  m.def("lasp2_saved_states_plan", &lasp2::torch_binding::lasp2_saved_states_plan, py::arg("dtype"),
        py::arg("dim_k"), py::arg("dim_v"), py::arg("device"),
        "-> (target_blocks, forced_seg_chunks) that size follows ((0, 0): nothing kept)");
  // LASP-1: the P2P ring schedule.
  m.def("lasp1_forward", &lasp2::torch_binding::lasp1_forward, py::arg("args"),
        py::arg("output_final_state") = false, no_gil,
        "-> (o, final_state or None, saved): LASP-1 forward (final_state [N, H, Dk, Dv] fp32)");
  m.def("lasp1_backward", &lasp2::torch_binding::lasp1_backward, py::arg("args"), py::arg("saved"),
        py::arg("dout"), py::arg("need_dg"), py::arg("d_final_state") = py::none(),
        py::arg("need_dinitial") = false, no_gil,
        "-> [dq, dk, dv, dg, ddecay, dinitial_state] (None where not asked for)");
}
