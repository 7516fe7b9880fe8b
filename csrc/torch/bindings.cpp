// The Python module lasp2._C: thin wrappers, no logic of their own.
#include <torch/csrc/utils/pybind.h>
#include <torch/extension.h>

#include "delta_rule_op.h"
#include "instrumented_communicator.h"
#include "lasp1_op.h"
#include "lasp2/kernel_backend.h"
#include "linear_attention_op.h"
#include "process_group_communicator.h"
#ifdef LASP2_WITH_NCCL
#include "lasp2/nccl_communicator.h"
#endif

namespace py = pybind11;
using lasp2::Communicator;
using lasp2::torch_binding::LinearAttentionArgs;
using lasp2::torch_binding::ProcessGroupCommunicator;

namespace {

LinearAttentionArgs make_args(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> g,
                              std::optional<at::Tensor> decay, std::optional<at::Tensor> doc_start,
                              double scale, int64_t chunk_size, std::shared_ptr<Communicator> comm,
                              int64_t parts_per_rank) {
  LinearAttentionArgs a;
  a.q = std::move(q);
  a.k = std::move(k);
  a.v = std::move(v);
  a.g = std::move(g);
  a.decay = std::move(decay);
  a.doc_start = std::move(doc_start);
  a.scale = scale;
  a.chunk_size = chunk_size;
  a.comm = std::move(comm);
  a.parts_per_rank = parts_per_rank;
  return a;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lasp2 core bindings (use the lasp2 package, not this module)";

  py::register_exception<lasp2::Error>(m, "Lasp2Error", PyExc_ValueError);

  py::class_<Communicator, std::shared_ptr<Communicator>>(m, "Communicator")
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size);

  py::class_<ProcessGroupCommunicator, Communicator, std::shared_ptr<ProcessGroupCommunicator>>(
      m, "ProcessGroupCommunicator")
      .def(py::init([](const c10::intrusive_ptr<c10d::ProcessGroup>& group, const at::Device& device) {
             return std::make_shared<ProcessGroupCommunicator>(group, device);
           }),
           py::arg("group"), py::arg("device"));

  // Benchmark instruments (see instrumented_communicator.h).
  py::class_<lasp2::torch_binding::TimedCommunicator, Communicator,
             std::shared_ptr<lasp2::torch_binding::TimedCommunicator>>(m, "TimedCommunicator")
      .def(py::init<std::shared_ptr<Communicator>>(), py::arg("inner"))
      .def_property_readonly("seconds", &lasp2::torch_binding::TimedCommunicator::seconds)
      .def_property_readonly("calls", &lasp2::torch_binding::TimedCommunicator::calls)
      .def_property_readonly("bytes", &lasp2::torch_binding::TimedCommunicator::bytes)
      .def("reset", &lasp2::torch_binding::TimedCommunicator::reset);
  py::class_<lasp2::torch_binding::NoopCommunicator, Communicator,
             std::shared_ptr<lasp2::torch_binding::NoopCommunicator>>(m, "NoopCommunicator")
      .def(py::init<const std::shared_ptr<Communicator>&>(), py::arg("like"));

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

  lasp2::torch_binding::register_delta_rule(m);  // gated DeltaNet / KDA (delta_rule_op.cpp)

  m.def("has_cuda_kernels", [] {
#ifdef LASP2_WITH_CUDA
    return true;
#else
    return false;
#endif
  });

  m.def(
      "lasp2_forward",
      [](at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> g,
         std::optional<at::Tensor> decay, std::optional<at::Tensor> doc_start, double scale,
         int64_t chunk_size, std::shared_ptr<Communicator> comm, int64_t parts_per_rank,
         bool overlap) {
        py::gil_scoped_release no_gil;  // collectives may block on other ranks
        return lasp2::torch_binding::lasp2_forward(
            make_args(q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts_per_rank), overlap);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"), py::arg("decay"), py::arg("doc_start"),
      py::arg("scale"), py::arg("chunk_size"), py::arg("comm"), py::arg("parts_per_rank"),
      py::arg("overlap"));

  m.def(
      "lasp2_backward",
      [](at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> g,
         std::optional<at::Tensor> decay, std::optional<at::Tensor> doc_start, double scale,
         int64_t chunk_size, std::shared_ptr<Communicator> comm, int64_t parts_per_rank,
         at::Tensor dout, at::Tensor local_records, at::Tensor prefix_states, at::Tensor log_decays,
         bool need_dg) {
        py::gil_scoped_release no_gil;
        return lasp2::torch_binding::lasp2_backward(
            make_args(q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts_per_rank), dout,
            local_records, prefix_states, log_decays, need_dg);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"), py::arg("decay"), py::arg("doc_start"),
      py::arg("scale"), py::arg("chunk_size"), py::arg("comm"), py::arg("parts_per_rank"),
      py::arg("dout"), py::arg("local_records"), py::arg("prefix_states"), py::arg("log_decays"),
      py::arg("need_dg"));

  // LASP-1: the P2P ring schedule (contiguous layout only).
  m.def(
      "lasp1_forward",
      [](at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> g,
         std::optional<at::Tensor> decay, std::optional<at::Tensor> doc_start, double scale,
         int64_t chunk_size, std::shared_ptr<Communicator> comm) {
        py::gil_scoped_release no_gil;  // P2P transfers block on other ranks
        return lasp2::torch_binding::lasp1_forward(
            make_args(q, k, v, g, decay, doc_start, scale, chunk_size, comm, 1));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"), py::arg("decay"), py::arg("doc_start"),
      py::arg("scale"), py::arg("chunk_size"), py::arg("comm"));

  m.def(
      "lasp1_backward",
      [](at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> g,
         std::optional<at::Tensor> decay, std::optional<at::Tensor> doc_start, double scale,
         int64_t chunk_size, std::shared_ptr<Communicator> comm, at::Tensor dout,
         at::Tensor entering_state, at::Tensor local_record, bool need_dg) {
        py::gil_scoped_release no_gil;
        return lasp2::torch_binding::lasp1_backward(
            make_args(q, k, v, g, decay, doc_start, scale, chunk_size, comm, 1), dout,
            entering_state, local_record, need_dg);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"), py::arg("decay"), py::arg("doc_start"),
      py::arg("scale"), py::arg("chunk_size"), py::arg("comm"), py::arg("dout"),
      py::arg("entering_state"), py::arg("local_record"), py::arg("need_dg"));
}
