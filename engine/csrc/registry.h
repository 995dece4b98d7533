// Each kernel source registers its Python functions here, so the sources stay independent:
//
//     static attnserve::Register reg([](pybind11::module_& m) { m.def("name", &fn, "doc"); });
//
// module.cpp defines the extension module and runs every registration.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace attnserve {

using Registrar = void (*)(pybind11::module_&);

// A function-local static: safe whatever order the sources' static initializers run in.
inline std::vector<Registrar>& registrars() {
  static std::vector<Registrar> all;
  return all;
}

struct Register {
  explicit Register(Registrar registrar) { registrars().push_back(registrar); }
};

}  // namespace attnserve
