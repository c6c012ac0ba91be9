// kvsched._bench: the benchmark entry points kvsched-bench needs from C++, kept out of
// kvsched._core (the module every engine imports). `core(ops, threads)` runs the core's own loop
// with no Python in it (core_bench.hpp); `spin(seconds)` is busy CPU work with the GIL released,
// the simulated layer compute of kvsched-bench's engine simulation.
#include <pybind11/pybind11.h>

#include <chrono>
#include <cstdint>

#include "core_bench.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_bench, m) {
  m.doc() = "kvsched benchmark entry points (private: used by kvsched-bench)";
  m.def("core",
        [](long ops, int threads) {
          if (ops < 1 || threads < 1 || threads > 64)
            throw py::value_error("core: ops >= 1 and 1 <= threads <= 64");
          kvsched::bench::CoreBenchResult r;
          {
            py::gil_scoped_release nogil;
            r = kvsched::bench::run_core_bench(ops, threads);
          }
          return py::make_tuple(r.ops, r.seconds);
        },
        py::arg("ops"), py::arg("threads") = 1,
        "Run the core benchmark loop without Python on `threads` threads sharing one scheduler; "
        "returns (ops done, seconds).");
  m.def("spin",
        [](double seconds) {
          py::gil_scoped_release nogil;
          using Clock = std::chrono::steady_clock;
          const auto end = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(seconds));
          volatile uint64_t x = 0;
          while (Clock::now() < end)
            for (int i = 0; i < 256; ++i) x = x + static_cast<uint64_t>(i);
        },
        py::arg("seconds"), "Busy-wait on the CPU for `seconds` with the GIL released.");
}
