// The registry of csrc/paths.h.
#include "paths.h"

#include <mutex>
#include <vector>

namespace cnnext {
namespace paths {
namespace {

struct Registry {
  std::mutex mu;
  std::vector<Counter*> counters;
};

// Constructed on first use: counters register from other translation units' static
// initialisers, whose order relative to this file's is unspecified.
Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

Counter::Counter(const char* name, Needs needs) : name_(name), needs_(needs) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.counters.push_back(this);
}

std::map<std::string, int64_t> counts() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::map<std::string, int64_t> out;
  for (const Counter* c : r.counters) out[c->name()] += c->count();
  return out;
}

std::map<std::string, Needs> needs() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::map<std::string, Needs> out;
  for (const Counter* c : r.counters) out[c->name()] = c->needs();
  return out;
}

void reset() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  for (Counter* c : r.counters) c->reset();
}

}  // namespace paths
}  // namespace cnnext
