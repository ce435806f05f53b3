// What the nvcc host harnesses of the CUDA kernels share (tests/cuda_host/*_host.cu):
// reading the little-endian int64 records their Python tests write, tensors held
// between guard elements, and writing an output back after checking its guards.
// Each harness defines CNNEXT_HOST_PROGRAM (its name, for error messages) and includes
// this after its kernel file; its main is harness_main with a function that runs one
// record. Host-only, no torch headers.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/conv2d.h"  // Strides4

namespace {

FILE* g_in;
long long g_record = -1;  // index of the record being run, for error messages

[[noreturn]] void die(const char* what) {
  if (g_record >= 0)
    std::fprintf(stderr, "%s: record %lld: %s\n", CNNEXT_HOST_PROGRAM, g_record, what);
  else
    std::fprintf(stderr, "%s: %s\n", CNNEXT_HOST_PROGRAM, what);
  std::exit(2);
}

bool try_read(int64_t* v) { return std::fread(v, sizeof *v, 1, g_in) == 1; }

int64_t read_i64() {
  int64_t v;
  if (!try_read(&v)) die("truncated input");
  return v;
}

// A tensor's elements, between kGuard all-ones elements on either side (NaN in every
// floating type, -1 as an index): a read just outside the tensor yields NaN, a write
// there is reported.
constexpr int64_t kGuard = 64;

template <typename T>
struct Tensor {
  cnnext::Strides4 s{};
  int64_t span = 0;
  std::vector<T> buf;

  T* data() { return buf.data() + kGuard; }
  // nullptr for an empty tensor: the kernels take an absent bias as nullptr.
  const T* data_or_null() { return span > 0 ? data() : nullptr; }
  bool guards_intact() const {
    const auto* b = reinterpret_cast<const unsigned char*>(buf.data());
    const size_t bytes = kGuard * sizeof(T), end = (kGuard + span) * sizeof(T);
    for (size_t k = 0; k < bytes; ++k)
      if (b[k] != 0xFF || b[end + k] != 0xFF) return false;
    return true;
  }
};

// Reads strides and span, and for an input the elements. Every byte starts 0xFF.
template <typename T>
Tensor<T> read_tensor(bool with_data) {
  Tensor<T> t;
  t.s = {read_i64(), read_i64(), read_i64(), read_i64()};
  t.span = read_i64();
  if (t.span < 0) die("negative span");
  t.buf.resize(t.span + 2 * kGuard);
  std::memset(static_cast<void*>(t.buf.data()), 0xFF, t.buf.size() * sizeof(T));
  if (with_data && std::fread(t.data(), sizeof(T), t.span, g_in) != size_t(t.span))
    die("truncated tensor data");
  return t;
}

template <typename T>
void write_output(Tensor<T>& t, FILE* out) {
  if (!t.guards_intact()) die("a kernel wrote outside its output");
  if (std::fwrite(t.data(), sizeof(T), t.span, out) != size_t(t.span)) die("write failed");
}

// A harness's main: `PROGRAM IN OUT`, then record(op, out) for every record of IN, op
// being the record's first int64 (g_record counts the records, for error messages).
template <typename Record>
int harness_main(int argc, char** argv, Record&& record) {
  if (argc != 3) die("usage: " CNNEXT_HOST_PROGRAM " IN OUT");
  g_in = std::fopen(argv[1], "rb");
  FILE* out = std::fopen(argv[2], "wb");
  if (g_in == nullptr || out == nullptr) die("cannot open IN or OUT");
  int64_t op;
  while (try_read(&op)) {
    ++g_record;
    record(op, out);
  }
  if (std::fclose(out) != 0) die("write failed");
  return 0;
}

}  // namespace
