// The optional module lasp2._bench: communicator instruments for benchmarks and the
// tests that check what each provider moves. Built by setup.py with LASP2_BUILD_BENCH=1;
// the production extension lasp2._C never contains them. The classes subclass
// lasp2._C.Communicator, so lasp2._C is imported first.
#include <torch/extension.h>

#include "instrumented_communicator.h"

namespace py = pybind11;
using lasp2::Communicator;
using lasp2::bench::NoopCommunicator;
using lasp2::bench::TimedCommunicator;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lasp2 benchmark instruments (communicators that time or skip the exchange)";
  py::module_::import("lasp2._C");
  // lasp2::Error raised here surfaces as the one lasp2 error type.
  static py::handle error = py::object(py::module_::import("lasp2._C").attr("Lasp2Error")).release();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const lasp2::Error& e) {
      PyErr_SetString(error.ptr(), e.what());
    }
  });

  py::class_<TimedCommunicator, Communicator, std::shared_ptr<TimedCommunicator>>(m, "TimedCommunicator")
      .def(py::init<std::shared_ptr<Communicator>>(), py::arg("inner"))
      .def_property_readonly("seconds", &TimedCommunicator::seconds)
      .def_property_readonly("calls", &TimedCommunicator::calls)
      .def_property_readonly("bytes", &TimedCommunicator::bytes)
      .def("reset", &TimedCommunicator::reset);
  py::class_<NoopCommunicator, Communicator, std::shared_ptr<NoopCommunicator>>(m, "NoopCommunicator")
      .def(py::init<const std::shared_ptr<Communicator>&>(), py::arg("like"));
}
