// The extension module: every source's registrations (registry.h), plus what was built.
#include "registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnserve CPU kernels";
#if defined(__AVX512F__)
  m.attr("isa") = "avx512";
#elif defined(__AVX2__)
  m.attr("isa") = "avx2";
#else
  m.attr("isa") = "baseline";
#endif
  for (auto registrar : attnserve::registrars()) registrar(m);
}
